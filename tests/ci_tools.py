"""Tools that tests need from the system (slurm-wlm, munge, shellcheck): where they are missing, a test
skips with the reason, except in CI as root, where .ci/run installs them and a missing one is a failure
(a skip there would pass silently)."""

from __future__ import annotations

import os

import pytest


def in_ci_as_root() -> bool:
    return os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0


def missing_tool(reason: str) -> None:
    """Skip the test with `reason`; fail it under CI=true as root."""
    if in_ci_as_root():
        pytest.fail(f"{reason}; in CI (CI=true, as root) this test must run: .ci/run installs what it needs",
                    pytrace=False)
    pytest.skip(reason)

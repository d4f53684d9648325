"""Tools that tests need from the system (slurm-wlm, munge, shellcheck, fonts-noto-cjk, a tmpfs mount): where
they are missing, a test skips with the reason, except in CI (CI=true), where .ci/run runs as root and
installs them and a missing one is a failure (a skip there would pass silently)."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing_tool(reason: str) -> None:
    """Skip the test with `reason`; fail it under CI=true."""
    if in_ci():
        pytest.fail(f"{reason}; in CI (CI=true) this test must run: .ci/run runs as root and installs what it "
                    "needs", pytrace=False)
    pytest.skip(reason)

""".ci/run on a root machine where slurm-wlm, munge or shellcheck cannot be installed: it fails at once
with one `error:` line, so the Slurm and shellcheck tests cannot skip silently in CI. The real script runs
with a PATH that holds none of those tools and, in turn, no apt-get, an apt-get that fails (as with no
package sources) and one that succeeds without installing them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

CI_RUN = REPO / ".ci" / "run"
APT_GET = {"failing": "#!/bin/sh\necho 'E: Unable to locate package slurm-wlm' >&2\nexit 100\n",
           "installing nothing": "#!/bin/sh\nexit 0\n"}


def run_ci(tmp_path: Path, apt_get: str | None) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id"):  # what the script uses before its install step
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if apt_get is not None:
        (bin_dir / "apt-get").write_text(APT_GET[apt_get])
        (bin_dir / "apt-get").chmod(0o755)
    return subprocess.run([shutil.which("bash"), str(CI_RUN)], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason=".ci/run installs the tools only as root (CI runs as root)")
@pytest.mark.parametrize("apt_get, says", [
    (None, "no apt-get to install slurm-wlm, munge, shellcheck and fonts-noto-cjk"),
    ("failing", "apt-get could not install slurm-wlm, munge, shellcheck and fonts-noto-cjk"),
    ("installing nothing", "slurmctld slurmd munged shellcheck still not found")])
def test_ci_fails_when_the_test_tools_cannot_be_installed(tmp_path, apt_get, says):
    proc = run_ci(tmp_path, apt_get)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr
    assert proc.stderr.rstrip().endswith(errors[0])


@pytest.mark.skipif(os.geteuid() != 0, reason="the Slurm tests fail rather than skip only as root (as CI runs)")
@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_slurm_tests_fail_instead_of_skipping_in_ci(tmp_path, ci, outcome):
    """Without Slurm's commands on PATH: skipped with the reason on a developer's machine, failed in CI."""
    python_only = tmp_path / "bin"
    python_only.mkdir()
    (python_only / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_slurm.py"), "-k", "multi_node_job_trains"],
                          cwd=tmp_path, env={**env, "PATH": str(python_only), "CI": ci}, capture_output=True,
                          text=True, timeout=120)
    assert outcome in proc.stdout, proc.stdout[-3000:]
    assert "no test Slurm cluster: sbatch, scontrol, squeue, scancel, sinfo not found" in proc.stdout
    assert (proc.returncode != 0) == (ci == "true")

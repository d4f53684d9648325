"""CI cannot pass without running every test. .ci/run refuses to run other than as root, and on a machine
where slurm-wlm, munge, shellcheck or fonts-noto-cjk cannot be installed it fails at once with one `error:`
line: the real script runs with a PATH of stand-ins that holds none of those tools and, in turn, no apt-get,
an apt-get that fails (as with no package sources) and one that succeeds without installing them. And under
CI=true the tests that need those tools fail instead of skipping."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

CI_RUN = REPO / ".ci" / "run"
CJK_FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")  # the file .ci/run looks for
APT_GET = {"failing": "#!/bin/sh\necho 'E: Unable to locate package slurm-wlm' >&2\nexit 100\n",
           "installing nothing": "#!/bin/sh\n: >\"$HOME/apt-get-ran\"\nexit 0\n"}


def run_ci(tmp_path: Path, apt_get: str | None, uid: int = 0) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))  # what the script uses before its checks
    stubs = {"id": f"#!/bin/sh\necho {uid}\n"}  # `id -u`: root, or another user
    if apt_get is not None:
        stubs["apt-get"] = APT_GET[apt_get]
    for name, script in stubs.items():
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    return subprocess.run([shutil.which("bash"), str(CI_RUN)], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)


def the_one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    return errors[0]


def test_ci_refuses_to_run_as_another_user(tmp_path):
    assert ".ci/run must run as root" in the_one_error(run_ci(tmp_path, "installing nothing", uid=1000))
    assert not (tmp_path / "apt-get-ran").exists()  # refused before any install


@pytest.mark.parametrize("apt_get, says", [
    (None, "no apt-get to install slurm-wlm, munge, shellcheck and fonts-noto-cjk"),
    ("failing", "apt-get could not install slurm-wlm, munge, shellcheck and fonts-noto-cjk"),
    ("installing nothing", "still not found after installing")])
def test_ci_fails_when_the_test_tools_cannot_be_installed(tmp_path, apt_get, says):
    error = the_one_error(run_ci(tmp_path, apt_get))
    assert says in error and (tmp_path / "apt-get-ran").exists() == (apt_get == "installing nothing")
    if apt_get == "installing nothing":  # the font is a file, found where this machine has it
        missing = "slurmctld slurmd munged shellcheck" + ("" if CJK_FONT.exists() else " fonts-noto-cjk")
        assert error.startswith(f"error: {missing} still not found"), error


def run_pytest(tmp_path: Path, test_file: str, keyword: str, env: dict) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}, **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
                           str(REPO / "tests" / test_file), "-k", keyword], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_slurm_tests_fail_instead_of_skipping_in_ci(tmp_path, ci, outcome):
    """Without Slurm's commands on PATH: skipped with the reason on a developer's machine, failed in CI."""
    python_only = tmp_path / "bin"
    python_only.mkdir()
    (python_only / "python").symlink_to(sys.executable)
    proc = run_pytest(tmp_path, "test_slurm.py", "multi_node_job_trains", {"PATH": str(python_only), "CI": ci})
    assert outcome in proc.stdout, proc.stdout[-3000:]
    assert "no test Slurm cluster: sbatch, scontrol, squeue, scancel, sinfo not found" in proc.stdout
    assert (proc.returncode != 0) == (ci == "true")


@pytest.mark.parametrize("ci, outcome", [("true", "1 error"), ("", "1 skipped")])
def test_font_tests_fail_instead_of_skipping_in_ci(tmp_path, ci, outcome):
    """Without Noto Sans CJK (a pytest plugin hides it from tl_dist.report): skipped with the reason on a
    developer's machine, failed in CI."""
    (tmp_path / "no_cjk_font.py").write_text("import tl_dist.report\n"
                                             "tl_dist.report.font_families = lambda: ['DejaVu Sans']\n")
    proc = run_pytest(tmp_path, "test_report_fonts.py", "each_character",
                      {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "PYTEST_PLUGINS": "no_cjk_font", "CI": ci})
    assert outcome in proc.stdout, proc.stdout[-3000:]
    assert "no Noto Sans CJK font: fonts-noto-cjk is not installed" in proc.stdout
    assert (proc.returncode != 0) == (ci == "true")

"""A throwaway Slurm cluster on this one machine, in a temporary folder: munged, slurmctld and one slurmd per
node (Debian's slurm-wlm 22.05 runs several slurmd daemons on one host). Each node offers GPUs that do not
exist (gres.conf points them at /dev/null and /dev/zero), so jobs get CUDA_VISIBLE_DEVICES and
SLURM_GPUS_ON_NODE but CUDA finds nothing, and the training runs on the CPU.

Everything (configuration, state, spool, logs, munge key and socket) lives in one folder under the system
temp folder, with free ports chosen at start: two clusters on one machine (two test runs) do not meet.
Needs root (slurmd runs jobs as their user) and the slurm-wlm and munge packages.

    python tests/slurm/cluster.py up          # prints `export SLURM_CONF=...`; the folder is the handle
    eval "$(python tests/slurm/cluster.py up)"; sbatch ...; sinfo
    python tests/slurm/cluster.py down FOLDER # stops the daemons, removes the folder

From Python (the tests): `with SlurmCluster() as cluster: cluster.sbatch(...)`.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def missing_requirements() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    missing = [d for d in DAEMONS if not shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test cluster needs root (slurmd starts jobs as their user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def _free_ports(count: int) -> list[int]:
    """`count` consecutive ports that are free now (slurm.conf takes a node range's ports as a range)."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return list(range(base, base + count))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")


class SlurmCluster:
    """One partition `debug` of `nodes` nodes n1..nN, each with `cpus` CPUs and `gpus` GPUs that do not exist."""

    def __init__(self, nodes: int = 3, cpus: int = 4, gpus: int = 2, root: Path | None = None,
                 hide_real_gpus: bool | None = None):
        self.nodes, self.cpus, self.gpus = nodes, cpus, gpus
        # On a host with NVIDIA GPUs, CUDA_VISIBLE_DEVICES=0,1 would show the jobs real GPU 0: a task
        # prolog empties it there, so the jobs see what they see elsewhere, GPUs without CUDA behind them.
        self.hide_real_gpus = Path("/dev/nvidiactl").exists() if hide_real_gpus is None else hide_real_gpus
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="tl_dist-slurm-"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hostname = socket.gethostname().split(".")[0]

    # ---- environment for clients (sbatch, squeue, ...) and jobs
    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([_which(cmd[0]), *cmd[1:]], env=kw.pop("env", self.env), capture_output=True,
                              text=True, timeout=kw.pop("timeout", 30), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    # ---- up
    def start(self) -> "SlurmCluster":
        reason = missing_requirements()
        if reason:
            raise RuntimeError(reason)
        try:
            self._write_files()
            self._start_munge()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        root = self.root
        os.chmod(root, 0o755)  # munged runs as its own user and must reach its folder
        for sub in ("etc", "state", "log", "spool", "run"):
            (root / sub).mkdir(exist_ok=True)
        for n in range(1, self.nodes + 1):
            (root / "spool" / f"n{n}").mkdir(exist_ok=True)
        ctl_port, *node_ports = _free_ports(self.nodes + 1)
        self.cluster_name = f"tl{os.getpid() % 100000}{random.randrange(1000)}"
        gres = "".join(f"Name=gpu File={dev}\n" for dev in ("/dev/null", "/dev/zero", "/dev/full", "/dev/random",
                                                              "/dev/urandom")[:self.gpus])
        (root / "etc" / "gres.conf").write_text("AutoDetect=off\n" + gres)
        (root / "etc" / "plugstack.conf").write_text("")
        task_prolog = ""
        if self.hide_real_gpus:
            script = root / "etc" / "task_prolog.sh"
            script.write_text("#!/bin/sh\necho 'export CUDA_VISIBLE_DEVICES='\n")
            script.chmod(0o755)
            task_prolog = f"TaskProlog={script}\n"
        self.conf.write_text(f"""\
# A one-machine test cluster: tests/slurm/cluster.py
ClusterName={self.cluster_name}
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
PlugStackConfig={root}/etc/plugstack.conf
{task_prolog}ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/builtin
KillWait=30
MinJobAge=600
SlurmctldDebug=info
SlurmdDebug=info
NodeName=n[1-{self.nodes}] NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={node_ports[0]}-{node_ports[-1]} CPUs={self.cpus} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        folder = self.root / "munge"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)  # munged: clients need to reach its socket
        key = folder / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (folder, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self._spawn("munged", [_which("munged"), "-F", "--socket", str(folder / "munge.socket"),
                               "--key-file", str(key), "--pid-file", str(folder / "munged.pid"),
                               "--log-file", str(folder / "munged.log"), "--seed-file", str(folder / "munged.seed")],
                    user=munge.pw_uid, group=munge.pw_gid, extra_groups=[])
        self._wait(lambda: (folder / "munge.socket").exists(), "munged", 20)

    def _start_slurm(self) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for n in range(1, self.nodes + 1):
            self._spawn(f"slurmd-n{n}", [_which("slurmd"), "-D", "-N", f"n{n}", "-f", str(self.conf)])

        def nodes_idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = [line.split()[1] for line in out.stdout.splitlines() if line.strip()]
            return len(states) == self.nodes and all(s == "idle" for s in states)
        self._wait(nodes_idle, "all nodes idle", 60)

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, **kw)
        log.close()

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"test Slurm cluster: {what} not reached (exited: {dead})\n" + self.logs())
            time.sleep(0.2)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ---- jobs
    def sbatch(self, *args: str, cwd: Path | None = None, env: dict | None = None) -> str:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as {key: value} (empty when Slurm forgot the job)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = {}
        for token in out.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                           "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"),
                 timeout: float = 300, condition=None) -> dict:
        """Poll until the job's state is one of `until` (or `condition(job)` holds); returns the job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in until or (condition and condition(job)):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.get('JobState')} after {timeout} s: {job}")
            time.sleep(0.5)

    # ---- down
    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            out = self.run("squeue", "-h", "-o", "%i", check=False)
            jobs = out.stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.5)
        for name in sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld")):  # slurmd first
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "up":
        cluster = SlurmCluster()
        cluster.start()
        pids = {name: p.pid for name, p in cluster.procs.items()}
        (cluster.root / "run" / "pids").write_text("".join(f"{name} {pid}\n" for name, pid in pids.items()))
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"# test cluster up in {cluster.root}; take it down with: python {__file__} down {cluster.root}",
              file=sys.stderr)
        return 0
    if len(argv) == 2 and argv[0] == "down":
        root = Path(argv[1])
        conf = root / "etc" / "slurm.conf"
        if not conf.is_file():
            print(f"{root} is not a test cluster folder", file=sys.stderr)
            return 1
        env = {**os.environ, "SLURM_CONF": str(conf)}
        jobs = subprocess.run([_which("squeue"), "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout
        if jobs.split():
            subprocess.run([_which("scancel"), *jobs.split()], env=env)
            time.sleep(5)
        pids_file = root / "run" / "pids"
        lines = pids_file.read_text().splitlines() if pids_file.is_file() else []
        for line in sorted(lines, key=lambda l: (l.startswith("munged"), l.startswith("slurmctld"))):
            name, pid = line.split()
            if _pid_alive(int(pid)):
                os.kill(int(pid), signal.SIGTERM)
                for _ in range(50):
                    if not _pid_alive(int(pid)):
                        break
                    time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

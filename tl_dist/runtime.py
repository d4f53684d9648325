"""The training process: its Accelerator, threads and memory, and how it stops.

Everything here is about the process, not the recipe: how many CPU threads it uses, how glibc keeps its
memory, which Accelerator it builds from the options, and the ways a run is asked to stop (a signal, the
run folder's STOP file, the death of its launcher) with the exit code that says "checkpointed, run the same
command again" (EXIT_STOPPED). `accelerate_launch` is the one place that spells an `accelerate launch` command
(the sweep's children, the tests); the Slurm scripts spell theirs in launch/slurm_common.sh.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Imports of torch and Accelerate are inside the functions that use them: the options' checks
# (config.py) call usable_cores, and `python -m tl_dist.sweep --count` must stay instant.
EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpointed on a signal or STOP file; run again with --resume auto
EXIT_PRUNED = 76  # a sweep's pruner ended the run after an epoch, with a checkpoint: not a failure
REPO = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO / "tl_dist" / "train.py"
LAUNCHER_GRACE_SECONDS = 20.0  # how long a worker whose launcher died may take to checkpoint and exit


# ---------------------------------------------------------------- the Accelerator


def gradient_accumulation(cfg) -> int:
    """--gradient-accumulation-steps, else Accelerate's environment variable, else 1."""
    return cfg.gradient_accumulation_steps or int(os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", 1))


def build_accelerator(cfg, log_with: str | None):
    """The Accelerator the options ask for. Raises ValueError for fp16 on a CPU (Accelerate would silently
    train in fp32)."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, GradientAccumulationPlugin

    on_cpu = not torch.cuda.is_available()
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and on_cpu:
        raise ValueError("argument --mixed-precision: fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    handlers = []
    if cfg.grad_compression != "none":  # halves the all-reduce of the gradients
        hook = DDPCommunicationHookType[cfg.grad_compression.upper()]
        handlers.append(DistributedDataParallelKwargs(comm_hook=hook))
    # cpu=True on a machine without CUDA: several processes then talk over gloo.
    # non_blocking: the prepared (evaluation, feature) loaders copy their pinned batches to the GPU
    # asynchronously, as the training loader does; a blocking copy would idle the GPU at every batch.
    # Gradient accumulation as a plugin, so that --gradient-accumulation-steps wins over Accelerate's
    # environment; the steps are counted by the loop's micro-batches, not by the (unprepared) train loader.
    accumulation = GradientAccumulationPlugin(num_steps=gradient_accumulation(cfg), sync_with_dataloader=False)
    return Accelerator(cpu=on_cpu, mixed_precision=cfg.mixed_precision, log_with=log_with,
                       kwargs_handlers=handlers, step_scheduler_with_optimizer=False,
                       gradient_accumulation_plugin=accumulation,
                       dataloader_config=DataLoaderConfiguration(non_blocking=True))


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state (its singletons), so that another run in this process builds
    its Accelerator afresh: what a sweep does between the runs it trains in its own process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which Slurm and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_threads(cfg, device) -> int:
    """On a CPU use every core this process may run on, shared among the node's processes: `accelerate
    launch` sets OMP_NUM_THREADS=1 when it finds no GPU, which would leave all but one core idle. Returns
    the number of threads (also what the decoder uses)."""
    import torch

    threads = cfg.num_threads or max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cpu":
        torch.set_num_threads(threads)
        keep_freed_memory()
    else:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return threads


def keep_freed_memory() -> None:
    """glibc hands every freed block over 32 MB back to the kernel, which page-faults it in again, zeroed,
    at the next allocation: on a CPU that is every batch's activations and every step's gradients, a large
    share of the CPU time (benchmarks/RESULTS.md). Keep freed memory in the process for reuse instead
    (M_MMAP_MAX 0: large blocks come from the heap; M_TRIM_THRESHOLD -1, read as the largest size: it is
    never trimmed). Peak memory stays about the same. glibc only."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)


def accelerate_launch(num_processes: int, config_file: Path | str, mixed_precision: str = "no",
                      port: int = 0) -> list[str]:
    """`accelerate launch` of tl_dist/train.py on this machine with an explicit config file (never the
    user's default config, which may pin GPUs); the training options follow. Port 0: a free one."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_machines", "1", "--num_processes", str(num_processes), "--main_process_port", str(port),
            "--mixed_precision", mixed_precision, str(TRAIN_SCRIPT)]


def together(work: Callable[[], object], folder: Path) -> list:
    """Run `work()` on every process and return what each returned, by process index. When it failed on any
    process, every process raises: run_dir.DiskFullError(folder) when one ran out of space in `folder`, else
    the failure itself (the others a copy of it). So processes stop together, each with the error that
    main() reports, instead of waiting in their next collective for one that is gone."""
    from accelerate.utils import gather_object

    from tl_dist.run_dir import DiskFullError, is_disk_full

    result, error = None, None
    try:
        result = work()
    except Interrupted:  # a signal: every process that got it stops on its own
        raise
    except Exception as exc:  # noqa: BLE001 - every process must hear of it before anyone raises
        error = exc
    shared = error
    if error is not None:  # an error of this package already says what is wrong; another may be a full disk
        ours = type(error).__module__.startswith("tl_dist.")
        shared = DiskFullError(folder) if not ours and is_disk_full(error, folder) else _picklable(error)
    outcomes = gather_object([(result, shared)])
    failures = [e for _, e in outcomes if e is not None]
    if not failures:
        return [r for r, _ in outcomes]
    if error is None:
        raise next((e for e in failures if isinstance(e, DiskFullError)), failures[0])
    if isinstance(shared, DiskFullError):
        raise shared from error
    raise error


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception that does not travel: its type and message do
        return RuntimeError(f"{type(error).__name__}: {error}")


# ---------------------------------------------------------------- stopping


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a phase that has nothing to checkpoint (decoding, the feature pass)."""


@contextlib.contextmanager
def stop_on_signals(during: str) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into `Interrupted` in the main thread for the duration of the block, so
    that the code unwinding it removes what it was writing; Python's default for SIGTERM would end the
    process on the spot, leaving its temp files behind. A signal the process was started ignoring (as a
    shell does with SIGINT for background jobs) stays ignored. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted(f"{signal.Signals(signum).name} while {during}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """Set by SIGUSR1/SIGTERM/SIGINT or a STOP file in the run folder while training; all processes agree
    on it through Accelerate's trigger, so they all stop after the same step."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, stop_file: Path):
        self.stop_file = Path(stop_file)
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.stop_file.unlink(missing_ok=True)

    def _handle(self, signum, frame) -> None:
        if self.signal_name and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signal_name is not None or self.stop_file.exists()

    def reason(self) -> str:
        """The signal, or the STOP file: by the signal it names when the process that wrote it relayed one
        (a sweep, a job script), since either may be seen first."""
        if self.signal_name:
            return self.signal_name
        try:
            said = self.stop_file.read_text(errors="replace").strip()
        except OSError:
            said = ""
        return said if said in {s.name for s in self.SIGNALS} else f"{self.stop_file} exists"


def stop_with_launcher() -> None:
    """A training process started by `accelerate launch` (or torchrun) stops when its launcher dies, even by
    SIGKILL: the kernel sends it SIGTERM (prctl PR_SET_PDEATHSIG), which StopRequest turns into a checkpoint
    and exit at the next step, and a watchdog thread exits the process if that has not happened within
    LAUNCHER_GRACE_SECONDS (blocked in a collective whose partner is gone, say). Plain `python -m
    tl_dist.train` under a shell or nohup is left alone. Linux only."""
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return
    if not any(name in cmdline for name in (b"accelerate", b"torchrun", b"torch.distributed")):
        return
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        time.sleep(LAUNCHER_GRACE_SECONDS)
        print("error: the launcher of this process is gone and the run did not stop in time; exiting. "
              "Continue with --resume auto.", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; elsewhere nothing). Used
    as a child's preexec_fn too: a process the package starts never outlives the one that started it."""
    if sys.platform != "linux":
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(sig))

"""Test support, not part of tl_dist. Python imports this file at start-up in every process whose PYTHONPATH
begins with tests/distributed_fakes/, which is how tests/test_distributed.py watches and perturbs the
workers of `accelerate launch`. Each part below is off unless its environment variable is set, and acts
only in a launched worker (RANK set), never in the launcher:

TL_DIST_TEST_AUDIT=DIR          log every file or folder this process creates, writes, renames or removes
                                under TL_DIST_TEST_AUDIT_ROOT into DIR/audit-<rank>.log (a Python audit
                                hook: it sees Python-level I/O, not files written from C++ or Rust), and
                                whether the process group was still up when the process exited into
                                DIR/exit-<rank>.log
TL_DIST_TEST_SKEW_CLOCKS=1      process r's local time runs r hours ahead (its time zone), so that any
                                date-time folder name chosen by each process on its own would differ
TL_DIST_TEST_FAKE_HUB=LOG       torch.hub "downloads" write a tiny stand-in VGG16 state_dict instead of
                                going to the network, after appending a line to LOG and waiting a second

kagglehub/ beside this file is a stand-in for the Kaggle download client, for the same tests.
"""

import atexit
import os
import sys
import time

_rank = os.environ.get("RANK")

if _rank is not None and os.environ.get("TL_DIST_TEST_SKEW_CLOCKS"):
    os.environ["TZ"] = f"Etc/GMT-{int(_rank)}"  # POSIX sign: Etc/GMT-2 is two hours ahead of UTC
    time.tzset()

if _rank is not None and os.environ.get("TL_DIST_TEST_AUDIT"):
    _root = os.path.realpath(os.environ["TL_DIST_TEST_AUDIT_ROOT"])
    # Opened once, before the hook exists: writing to it raises no event (opening it again would).
    _log = open(os.path.join(os.environ["TL_DIST_TEST_AUDIT"], f"audit-{_rank}.log"), "a",  # noqa: SIM115
                buffering=1)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        path = os.fsdecode(path)
        return os.path.realpath(path).startswith(_root + os.sep)

    _CHANGES = ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree")

    def _audit(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            if writes and _inside(path):
                _log.write(f"write\t{os.fsdecode(path)}\n")
        elif event in _CHANGES and _inside(args[0]):
            _log.write(f"{event}\t{os.fsdecode(args[0])}\n")

    sys.addaudithook(_audit)

    def _at_exit():  # registered first, so it runs last of the atexit handlers
        dist = sys.modules.get("torch.distributed")
        alive = dist is not None and dist.is_available() and dist.is_initialized()
        with open(os.path.join(os.environ["TL_DIST_TEST_AUDIT"], f"exit-{_rank}.log"), "w") as log:
            log.write("process group still initialized\n" if alive else "process group destroyed\n")

    atexit.register(_at_exit)

if _rank is not None and os.environ.get("TL_DIST_TEST_FAKE_HUB"):
    import torch.hub

    def _fake_download_url_to_file(url, dst, hash_prefix=None, progress=True):
        with open(os.environ["TL_DIST_TEST_FAKE_HUB"], "a") as log:
            log.write(f"rank {_rank} pid {os.getpid()} {url}\n")
        time.sleep(1.0)  # a slow download: processes that do not wait would start their own meanwhile
        from torchvision.models import vgg16

        with torch.device("meta"):
            shapes = {k: v.shape for k, v in vgg16().state_dict().items()}
        # One stored number per tensor, expanded: a few bytes on disk, a VGG16 state_dict when loaded.
        state = {k: torch.full((1,), 1.0 / max(1, s[1:].numel()) if k.endswith("weight") else 0.0).expand(s)
                 for k, s in shapes.items()}
        torch.save(state, dst + ".partial")
        os.replace(dst + ".partial", dst)

    torch.hub.download_url_to_file = _fake_download_url_to_file

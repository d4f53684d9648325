"""Refuse, at start, the distributed set-ups tl_dist does not support.

tl_dist trains with DDP: on the CPU, one GPU, several GPUs of one node, several nodes (Accelerate's NO,
MULTI_CPU and MULTI_GPU). `accelerate launch` also offers DeepSpeed, FSDP, Megatron-LM and XLA (TPU);
under those the checkpoint and feature code would fail late, after the data is decoded and files are
written. They are refused here instead, with one line, before anything is written.
"""

from __future__ import annotations

import os
import time

from accelerate.utils import is_torch_xla_available, parse_flag_from_env

from tl_dist.console import RunConsole

EXIT_UNSUPPORTED = 1  # as any other input the run cannot use
# torchrun stops every process as soon as one fails: the others wait this long, so that rank 0 is not
# stopped before it has said why (it exits at once, and torchrun then stops them).
OTHER_RANKS_WAIT_S = 30
SUPPORTED = "DDP on the CPU, one GPU, several GPUs of one node or several nodes"
# What `accelerate launch --use_deepspeed / --use_fsdp / --use_megatron_lm` (or a config file's
# distributed_type) sets in every training process; Accelerate's state reads the same variables.
UNSUPPORTED_FLAGS = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP",
                     "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def unsupported_setup() -> str | None:
    """The unsupported set-up this process was launched into and how it shows, or None."""
    for variable, name in UNSUPPORTED_FLAGS.items():
        if parse_flag_from_env(variable):
            return f"{name} ({variable} is set)"
    if is_torch_xla_available():  # Accelerate then runs on XLA whatever the launch said
        return "XLA/TPU (torch_xla is installed; USE_TORCH_XLA=0 hides it from Accelerate)"
    return None


def exit_if_unsupported_setup() -> None:
    """One `error:` line (from rank 0 only: Accelerate is not set up yet) and exit, for an unsupported set-up."""
    setup = unsupported_setup()
    if setup is None:
        return
    if os.environ.get("RANK", "0") != "0":
        time.sleep(OTHER_RANKS_WAIT_S)
        raise SystemExit(EXIT_UNSUPPORTED)
    RunConsole(is_main=True).error(
        f"{setup} is not supported: tl_dist trains with {SUPPORTED}. Launch without it, for example "
        "`accelerate launch --config_file accelerate_configs/multi_gpu.yaml tl_dist/train.py` "
        "(README, \"Accelerate configs\").")
    raise SystemExit(EXIT_UNSUPPORTED)

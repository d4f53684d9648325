"""A user's own Accelerate default config, as `accelerate config` writes it on a one-GPU workstation: the
file that `accelerate launch` without --config_file merges into every launch. The job scripts must not
let it in (tests/test_slurm.py, tests/test_launch_scripts.py, tests/test_accelerate_edges.py)."""

from __future__ import annotations

from pathlib import Path

# `accelerate config` on one GPU, with CPU affinity and fp16 chosen: gpu_ids '0' stops any multi-process
# launch ("Less than two GPU ids were configured"); fp16 would stop a CPU run ("fp16 needs a CUDA GPU").
ONE_GPU_WORKSTATION = """\
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: 'NO'
downcast_bf16: 'no'
enable_cpu_affinity: true
gpu_ids: '0'
machine_rank: 0
main_training_function: main
mixed_precision: fp16
num_machines: 1
num_processes: 1
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""


def write_user_default_config(hf_home: Path) -> Path:
    """Write it where Accelerate looks with HF_HOME=hf_home; returns HF_HOME's folder."""
    path = Path(hf_home) / "accelerate" / "default_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ONE_GPU_WORKSTATION)
    return Path(hf_home)

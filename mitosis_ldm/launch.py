"""The `accelerate launch` command line the demo and the benches run training stages with.

    cmd = accelerate_launch("autoencoder.train", "--config", "configs/demo/autoencoder.yaml")
    subprocess.run(cmd, check=True)

One process, every core this process may use (accelerate otherwise gives a
process launched without `--cpu` one thread), no mixed precision, no dynamo, and
accelerate's `--quiet`: a stage that exits non-zero (a bad recipe's one-line error,
exit 2) leaves only its own output, not the launcher's traceback of the exit.
"""

from __future__ import annotations

import os
import sys


def cpu_threads() -> int:
    """The cores this process may use: `accelerate launch` otherwise gives a non-`--cpu` process one thread."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def accelerate_launch(module: str, *args: str, threads: int | None = None) -> list[str]:
    """`python -m accelerate.commands.launch ... -m MODULE ARGS...` for one process on `threads` threads."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet",
            "--num_processes", "1", "--num_machines", "1",
            "--num_cpu_threads_per_process", str(threads or cpu_threads()),
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module, *map(str, args)]


def process_state():
    """accelerate's PartialState of this process: its rank among the launched processes and its device, a GPU
    when there is one (without one, `--multi_gpu` processes join over gloo on the CPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def release_processes() -> None:
    """After a command's last collective: every process waits for the others, then all leave the process group.

    A process that exits while its peers still hold their gloo connections to it closes them from under them, and
    a peer can then abort (SIGABRT) on its way out. A no-op in a single process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

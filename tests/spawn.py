"""Spawn a function in several CPU processes for ``torch.distributed`` (gloo) tests."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float = 240.0) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes; a failure in one re-raises here,
    and no process outlives the call."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)


def gloo_runs(worker: Callable[..., None], reference: Callable[[], Any], out_dir: Any, nprocs: int,
              timeout_s: float = 240.0) -> tuple[Any, list[Any]]:
    """Run ``worker(rank, port, out_dir)`` on ``nprocs`` single-threaded gloo workers, then ``reference()``
    in this process with the workers' thread count; returns (reference, each rank's ``rank{r}.pt``).

    Skips the calling test when this torch build has no gloo backend.
    """
    from pathlib import Path

    import pytest
    import torch
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        spawn(worker, (free_port(), str(out_dir)), nprocs, timeout_s=timeout_s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference with the workers' thread count (products are then the same calls)
    try:
        ref = reference()
    finally:
        torch.set_num_threads(threads)
    return ref, [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(nprocs)]

"""Several processes on one CPU machine, for context-parallel tests and smoke runs (gloo backend).

    >>> from dit_accel.testing.distributed import run_on_ranks
    >>> results = run_on_ranks(my_worker, world_size=2, args=("flux",))   # my_worker(rank, world_size, *args)

``run_on_ranks`` spawns the processes, initialises a gloo process group in each, and returns each rank's
return value (pickled back), or raises if a rank fails or the ranks do not finish in ``timeout`` seconds
(a hang — mismatched collectives — becomes an error naming the ranks that did not answer).

diffusers places a context-parallel model on ``rank % torch.accelerator.device_count()``, which is 0 on
a machine without accelerators; each rank here answers the world size instead (CPU only).
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        torch.accelerator.device_count = lambda: world_size  # diffusers: rank % device_count
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; their results by rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    answers: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            answers[rank] = value
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(answers))
        raise TimeoutError(f"ranks {missing} did not finish in {timeout:.0f} s (a hang: the ranks' collectives "
                           "did not match)") from None
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return [answers[r] for r in range(world_size)]

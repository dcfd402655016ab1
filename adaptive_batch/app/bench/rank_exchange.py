"""What one step's feedback exchange costs under DDP: a pickled object gather (the sampler's
exchange before 0.3) against one fixed-size frame gather (its exchange now), side by side.

Two processes on this machine (gloo), one torch thread each, swap a batch's feedback (its
indices, losses and three statistics) ``steps`` times per round, each way in alternating rounds;
figures are medians over rounds, per exchange, waited for at once (a training run overlaps the
frame's gather with the next step, so its wall time is an upper bound there).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adaptive_batch import Feedback

from .common import markdown_table

__all__ = ["format_rank_exchange", "measure_rank_exchange"]


def _feedback(rank: int, batch: int) -> Feedback:
    stats = {"loss": 1.0, "grad_sq_norm": 2.0, "grad_variance": 3.0}
    kept = torch.arange(batch) + rank * batch
    return Feedback(kept, kept[:0], "keep_all", stats, torch.rand(batch))


def _object_exchange(feedback: Feedback, rank: int, world: int) -> list[Any]:
    gathered: list[Any] = [None] * world
    payload = {"kept": feedback.kept, "losses": feedback.losses, "stats": dict(feedback.stats)}
    dist.all_gather_object(gathered, ("feedback", rank, payload))
    return gathered


def _frame_exchange(feedback: Feedback, rank: int, world: int, capacity: int) -> list[Any]:
    from adaptive_batch.sample.rank_frames import decode_frame, encode_frame

    frame = encode_frame("feedback", rank, (1, 0, 0), capacity, feedback)
    gathered = [torch.empty_like(frame) for _ in range(world)]
    dist.all_gather(gathered, frame, async_op=True).wait()
    names = sorted(feedback.stats)
    return [decode_frame(row, capacity, names) for row in torch.stack(gathered).numpy()]


def _worker(rank: int, world: int, port: int, settings: dict[str, int], results: Any) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feedback = _feedback(rank, settings["batch"])
        ways = {
            "pickled object (all_gather_object)": lambda: _object_exchange(feedback, rank, world),
            "one frame (all_gather)": lambda: _frame_exchange(
                feedback, rank, world, settings["capacity"]
            ),
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for _ in range(settings["rounds"]):
            for name, exchange in ways.items():
                dist.barrier()
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(settings["steps"]):
                    exchange()
                steps = settings["steps"]
                times[name].append(
                    ((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps)
                )
        results.put((rank, times))
    finally:
        dist.destroy_process_group()


def measure_rank_exchange(
    batch: int = 256, capacity: int = 1010, rounds: int = 5, steps: int = 200
) -> dict[str, tuple[float, float]]:
    """``{way: (wall us, CPU us)}`` per exchange on rank 0, medians over ``rounds``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    settings = {"batch": batch, "capacity": capacity, "rounds": rounds, "steps": steps}
    processes = [
        context.Process(target=_worker, args=(r, 2, port, settings, results)) for r in range(2)
    ]
    for p in processes:
        p.start()
    gathered = dict(results.get(timeout=600) for _ in processes)
    for p in processes:
        p.join(30)
    return {
        name: (
            statistics.median(w for w, _ in runs) * 1e6,
            statistics.median(c for _, c in runs) * 1e6,
        )
        for name, runs in gathered[0].items()
    }


def format_rank_exchange(figures: dict[str, tuple[float, float]], batch: int) -> str:
    (old_wall, old_cpu), (new_wall, new_cpu) = figures.values()
    rows = [[name, f"{wall:.0f}", f"{cpu:.0f}"] for name, (wall, cpu) in figures.items()]
    rows.append(
        ["ratio (object / frame)", f"{old_wall / new_wall:.2f}x", f"{old_cpu / new_cpu:.2f}x"]
    )
    header = [f"one step's feedback, 2 ranks (gloo), batch {batch}", "wall us", "CPU us"]
    return markdown_table(header, rows)

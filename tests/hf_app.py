"""The Hugging Face Trainer with InfoBatch on two processes (gloo, CPU); run by test_transformers:

    python -m torch.distributed.run --nproc_per_node=2 tests/hf_app.py OUT_DIR

writes what each rank trained on, step by step, and its sampler's scores to OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the tests' helpers are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from adaptive_batch.policies import InfoBatch
from tests.test_transformers import Sequences, trainer


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    run = trainer(out / "run", policy=InfoBatch(prune_ratio=0.5), data=Sequences(96))
    run.train()
    scores = run.sampler.scores
    digest = hashlib.sha1(
        scores.losses.nan_to_num(-1).numpy().tobytes() + scores.times_kept.numpy().tobytes()
    ).hexdigest()
    rank = int(os.environ["RANK"])
    report = {
        "world": run.accelerator.num_processes,
        "steps": run.steps,
        "global_step": run.state.global_step,
        "epochs": [len(run.sampler.order.decide(e).drawn.nonzero()) for e in range(3)],
        "scores": digest,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    # gloo's worker threads can abort a DDP process at interpreter exit (docs/scaling.md,
    # "DistributedDataParallel"): leave once the report is written
    sys.stdout.flush()
    os._exit(0)

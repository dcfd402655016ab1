"""A LightningModule trained with either stage; run as a script for the 2-rank DDP test.

    python tests/lightning_app.py STAGE OUT_DIR [DEVICES]

trains without interruption (checkpointing every ``CHECKPOINT_EVERY`` steps), then again from the
checkpoint, and writes what each rank trained on to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: the tests' helpers are one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, StepFeedback, SubsetFilter
from adaptive_batch.integrations.lightning import AdaptiveBatchCallback
from adaptive_batch.policies import EDBA, GradientNoiseScale, InfoBatch, Policy
from tests.synthetic import blobs

EPOCHS = 3
CHECKPOINT_EVERY = 5


class Classifier(L.LightningModule):
    """An MLP on Gaussian blobs, its batches from an adaptive sampler with either stage."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.stage_kind = stage
        self.data = IndexedDataset(blobs(160))
        self.log_rows: list[dict] = []  # what each step trained on
        self.stage = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self):
        if self.stage_kind == "look_ahead":
            policy = EDBA(seed=2, factor=1.5)
        else:
            # No num_epochs: the callback gives the plan the trainer's max_epochs.
            policy = Policy(sizing=GradientNoiseScale(overhead_samples=512.0), plan=InfoBatch())
        sampler = AdaptiveBatchSampler(
            self.data, policy=policy, batch_size=12, min_batch_size=6, max_batch_size=36, seed=4
        )
        loader = DataLoader(self.data, batch_sampler=sampler)
        kind = SubsetFilter if self.stage_kind == "look_ahead" else StepFeedback
        self.stage = kind(loader, self, sampler=sampler, fetched_ahead=True)
        return self.stage

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        if self.stage_kind == "look_ahead":
            feedback = self.stage.last_feedback
            indices = feedback.kept
            extra = {"candidates": sorted(feedback.candidates.tolist())}
        else:
            indices = self.stage.current_indices
            extra = {}
        self.log_rows.append(
            {
                "indices": indices.tolist(),
                "losses": losses.detach().tolist(),
                "epoch": self.current_epoch,
                **extra,
            }
        )
        if self.stage_kind == "look_ahead":
            return losses.mean()
        return self.stage.weighted(
            lambda out, target: F.cross_entropy(out, target, reduction="none")
        )(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def trainer(root: Path, devices: int = 1, **kwargs) -> L.Trainer:
    extra = {"strategy": "ddp", "devices": devices} if devices > 1 else {"devices": 1}
    return L.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        callbacks=[AdaptiveBatchCallback(), *kwargs.pop("callbacks", [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(kwargs.get("checkpoints")),
        default_root_dir=str(root),
        num_sanity_val_steps=0,
        **{k: v for k, v in kwargs.items() if k != "checkpoints"},
        **extra,
    )


def uninterrupted_and_resumed(
    stage: str, root: Path, devices: int = 1, step: int = CHECKPOINT_EVERY
) -> tuple[list, list, int]:
    """(rows of the uninterrupted run, rows after resuming from its checkpoint at ``step``, that
    step)."""
    every = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=step, save_top_k=-1)
    first = Classifier(stage)
    trainer(root, devices, callbacks=[every], checkpoints=True).fit(first)
    checkpoint = next((root / "checkpoints").glob(f"*step={step}.ckpt"))
    resumed = Classifier(stage)
    trainer(root / "resumed", devices).fit(resumed, ckpt_path=str(checkpoint))
    return first.log_rows, resumed.log_rows, step


def main() -> None:
    stage, out = sys.argv[1], Path(sys.argv[2])
    devices = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.set_num_threads(1)
    first, resumed, step = uninterrupted_and_resumed(stage, out / "run", devices)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(
        json.dumps({"first": first, "resumed": resumed, "step": step})
    )


if __name__ == "__main__":
    main()

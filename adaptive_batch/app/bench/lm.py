"""Pruning a causal language model at equal tokens, under the Hugging Face Trainer.

The text is Python's own standard library (its ``.py`` sources as bytes: 256 tokens, nothing to
download), cut into sequences; a share of the training sequences is replaced by random bytes.
A 2-layer GPT-2, randomly initialised, trains with AdamW at a constant learning rate (the same
schedule however many steps an arm takes) through
:class:`~adaptive_batch.integrations.transformers.AdaptiveBatchTrainer`. Each pruning arm sits
beside the cheapest ways of spending its tokens: the fixed run stopped at the same number of
steps (``short@``: at a constant rate, the shortened schedule) and RS2 at the same fraction
(``rs2@``). The score is the loss per token on held-out clean sequences (lower is better).
"""

from __future__ import annotations

import statistics
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptive_batch.optional import require
from adaptive_batch.policies import InfoBatch, RandomSubset, SmallLoss

from .common import Results, floats, markdown_table, mean_std

__all__ = ["ARMS", "FIELDS", "LmSetup", "format_lm", "lm_data", "run_lm"]

FIELDS = (
    "arm",
    "seed",
    "setup",
    "held_out_loss",
    "tokens",
    "steps",
    "noise_share",
    "cpu_seconds",
    "wall_seconds",
)
ARMS = ("fixed", "infobatch", "small-loss")
CONTROLS = ("short", "rs2")


@dataclass(frozen=True)
class LmSetup:
    sequences: int = 2400
    length: int = 64  # bytes per sequence
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    corrupt: float = 0.2  # share of training sequences replaced by random bytes

    def key(self) -> str:
        return f"{self.sequences}/{self.length}/{self.epochs}/{self.batch_size}/{self.lr}/{self.corrupt}"

    def describe(self) -> str:
        return (
            f"{self.sequences} sequences of {self.length} bytes of the standard library, "
            f"{self.corrupt:.0%} replaced by random bytes, 2-layer GPT-2 (64 wide), "
            f"{self.epochs} epochs, batch {self.batch_size}, AdamW at a constant {self.lr:g}"
        )


class ByteSequences(torch.utils.data.Dataset):
    """Consecutive sequences of ``data``; ``corrupted`` of them (seeded) are random bytes."""

    def __init__(self, data: bytes, length: int, corrupt: float = 0.0, seed: int = 0) -> None:
        count = len(data) // length
        tokens = torch.frombuffer(bytearray(data[: count * length]), dtype=torch.uint8)
        self.ids = tokens.view(count, length).long()
        generator = torch.Generator().manual_seed(seed)
        self.corrupted = torch.randperm(count, generator=generator)[: round(corrupt * count)]
        noise = torch.randint(0, 256, (len(self.corrupted), length), generator=generator)
        self.ids[self.corrupted] = noise

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def lm_data(setup: LmSetup, seed: int) -> tuple[ByteSequences, ByteSequences]:
    """The training sequences (corrupted by ``seed``) and the held-out ones (the next quarter)."""
    wanted = (setup.sequences + setup.sequences // 4) * setup.length
    chunks, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
        if size >= wanted:
            break
    data = b"".join(chunks)
    cut = setup.sequences * setup.length
    train = ByteSequences(data[:cut], setup.length, setup.corrupt, seed)
    return train, ByteSequences(data[cut:wanted], setup.length)


def _policy(arm: str, setup: LmSetup) -> Any:
    if arm in ("fixed", "short"):
        return None
    if arm == "infobatch":
        return InfoBatch(prune_ratio=0.5, num_epochs=setup.epochs)
    if arm == "small-loss":  # random bytes stay near ln 256 while text is learned: 1 epoch shows it
        return SmallLoss(warmup_epochs=1)
    if arm.startswith("rs2-"):
        return RandomSubset(float(arm.removeprefix("rs2-")), num_epochs=setup.epochs)
    raise ValueError(f"unknown arm {arm!r}")


def train_lm(
    arm: str, setup: LmSetup, seed: int, device: torch.device, max_steps: int | None = None
) -> dict[str, Any]:
    """One run; ``max_steps`` stops the fixed run early (the shortened schedule)."""
    transformers = require("transformers", "transformers", "the lm benchmark")
    from adaptive_batch.integrations.transformers import AdaptiveBatchTrainer

    transformers.logging.set_verbosity_error()  # (its notes on the tiny config's defaults)

    train, held_out = lm_data(setup, seed)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=setup.length, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        args = transformers.TrainingArguments(
            output_dir=folder, per_device_train_batch_size=setup.batch_size,
            per_device_eval_batch_size=128, num_train_epochs=setup.epochs,
            max_steps=max_steps or -1, learning_rate=setup.lr, lr_scheduler_type="constant",
            report_to="none", use_cpu=device.type == "cpu", seed=seed, disable_tqdm=True,
            save_strategy="no", logging_strategy="no",
        )  # fmt: skip
        trainer = AdaptiveBatchTrainer(
            model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=train,
            eval_dataset=held_out, data_collator=transformers.default_data_collator,
            policy=_policy(arm, setup),
        )  # fmt: skip
        trainer.remove_callback(transformers.PrinterCallback)
        cpu, wall = time.process_time(), time.perf_counter()
        trainer.train()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        loss = trainer.evaluate()["eval_loss"]
    kept = trainer.sampler.times_kept
    trained = int(kept.sum())
    return {
        "held_out_loss": f"{loss:.5f}",
        "tokens": trained * (setup.length - 1),  # each sequence predicts length - 1 tokens
        "steps": trainer.state.global_step,
        "noise_share": f"{int(kept[train.corrupted].sum()) / max(trained, 1):.4f}",
        "cpu_seconds": f"{cpu:.2f}",
        "wall_seconds": f"{wall:.2f}",
    }


def run_lm(
    arms: Sequence[str],
    seeds: Sequence[int],
    *,
    setup: LmSetup,
    out_dir: str | Path,
    device: torch.device,
    show_progress: bool = True,
) -> Results:
    """Per seed: every arm, then each arm that trained on fewer tokens than the fixed run beside
    the fixed run stopped at its steps (``short@P``) and RS2 at its fraction (``rs2@P``);
    resumable."""
    results = Results(out_dir, "lm", FIELDS, key=("arm", "seed", "setup"))
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    key = setup.key()
    runs = ["fixed", *(a for a in arms if a != "fixed")]
    with tqdm(total=len(seeds) * len(runs) * 3, desc="lm", disable=not show_progress) as bar:
        for seed in seeds:
            todo: list[tuple[str, str, int | None]] = [(a, a, None) for a in runs]
            while todo:
                name, arm, steps = todo.pop(0)
                if not results.has(arm=name, seed=seed, setup=key):
                    row = train_lm(arm, setup, seed, device, steps)
                    results.add({"arm": name, "seed": seed, "setup": key, **row})
                bar.update(1)
                if name in runs and name != "fixed":
                    todo += _controls(results, name, seed, key)
    return results


def _controls(results: Results, arm: str, seed: int, key: str) -> list[tuple[str, str, int]]:
    """The fixed run cut to ``arm``'s steps, and RS2 at its fraction of the fixed run's tokens."""
    (full,) = results.select(arm="fixed", seed=seed, setup=key)
    (own,) = results.select(arm=arm, seed=seed, setup=key)
    fraction = int(own["tokens"]) / int(full["tokens"])
    if fraction > 0.98:
        return []
    return [
        (f"short@{arm}", "short", int(own["steps"])),
        (f"rs2@{arm}", f"rs2-{fraction:.4f}", None),  # type: ignore[list-item]
    ]


def format_lm(results: Results, arms: Sequence[str], setup: LmSetup) -> str:
    """One line per arm and control: held-out loss per token (mean ± std over seeds), its
    difference to the fixed run's (paired by seed), tokens (x the fixed run's), steps, time."""
    key = setup.key()
    full = {r["seed"]: float(r["held_out_loss"]) for r in results.select(arm="fixed", setup=key)}
    tokens = {r["seed"]: int(r["tokens"]) for r in results.select(arm="fixed", setup=key)}
    names = ["fixed"]
    for arm in (a for a in arms if a != "fixed"):
        names += [arm, f"short@{arm}", f"rs2@{arm}"]
    header = ["arm", "seeds", "held-out loss/token", "vs fixed", "tokens (x fixed)", "steps"]
    header += ["noise trained %", "train CPU s", "train wall s"]
    table = []
    for name in names:
        rows = [r for r in results.select(arm=name, setup=key) if r["seed"] in full]
        if not rows:
            continue
        deltas = [float(r["held_out_loss"]) - full[r["seed"]] for r in rows]
        ratio = [int(r["tokens"]) / tokens[r["seed"]] for r in rows]
        table.append(
            [
                name,
                len(rows),
                mean_std(floats(rows, "held_out_loss"), digits=3),
                f"{statistics.fmean(deltas):+.3f}",
                f"{statistics.fmean(ratio):.2f}",
                f"{statistics.fmean(floats(rows, 'steps')):.0f}",
                mean_std(floats(rows, "noise_share"), 100, digits=1),
                mean_std(floats(rows, "cpu_seconds"), digits=0),
                mean_std(floats(rows, "wall_seconds"), digits=0),
            ]
        )
    return markdown_table(header, table)

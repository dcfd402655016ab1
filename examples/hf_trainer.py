"""Train a small causal language model with the Hugging Face Trainer and adaptive batches.

The text is Python's own standard library (its ``.py`` sources, read as bytes: a 256-token
vocabulary, no tokenizer to download), cut into sequences; a share of the training sequences is
replaced by random bytes (noise a filter should leave out). A 2-layer GPT-2, randomly
initialised, trains on them with the same ``TrainingArguments`` under each policy: fixed batches
(the plain ``Trainer``'s), InfoBatch, and the small-loss plan. The table gives the loss per token
on held-out sequences (clean), the sequences and tokens trained, and the time::

    python examples/hf_trainer.py                      # three policies, one process
    torchrun --nproc_per_node=2 examples/hf_trainer.py --policies infobatch

Needs ``pip install 'adaptive-batch[transformers]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset

from adaptive_batch.integrations.transformers import AdaptiveBatchTrainer
from adaptive_batch.policies import InfoBatch, SmallLoss

POLICIES = {
    "fixed": lambda: None,
    "infobatch": lambda: InfoBatch(prune_ratio=0.5),
    "small-loss": lambda: SmallLoss(warmup_epochs=1),  # noise stays near ln 256 from epoch 1
}


def stdlib_bytes(limit: int) -> bytes:
    """Up to ``limit`` bytes of the standard library's sources, in a fixed file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes()
        chunks.append(text)
        size += len(text)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


class ByteSequences(Dataset):
    """Consecutive ``length``-byte sequences; ``corrupt`` of them (seeded) are random bytes."""

    def __init__(self, data: bytes, length: int, corrupt: float = 0.0, seed: int = 0) -> None:
        count = len(data) // length
        tokens = torch.frombuffer(bytearray(data[: count * length]), dtype=torch.uint8)
        self.ids = tokens.view(count, length).long()
        generator = torch.Generator().manual_seed(seed)
        self.corrupted = torch.randperm(count, generator=generator)[: round(corrupt * count)]
        self.ids[self.corrupted] = torch.randint(
            0, 256, (len(self.corrupted), length), generator=generator
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        return {"input_ids": ids, "labels": ids}


def tiny_gpt2(length: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=length, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def train(name: str, args: argparse.Namespace, train_set: Dataset, held_out: Dataset) -> dict:
    folder = tempfile.mkdtemp(prefix=f"hf-{name}-")
    arguments = transformers.TrainingArguments(
        output_dir=folder,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # the same schedule however many steps a policy takes
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = AdaptiveBatchTrainer(
        model=tiny_gpt2(args.length),
        args=arguments,
        train_dataset=train_set,
        eval_dataset=held_out,
        data_collator=transformers.default_data_collator,
        policy=POLICIES[name](),
    )
    trainer.remove_callback(transformers.PrinterCallback)  # the table below says it all
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    sampler = trainer.sampler
    kept = sampler.times_kept  # per sequence: the steps it was trained in (every rank's)
    noisy = int(kept[train_set.corrupted].sum())
    return {
        "policy": name,
        "held_out_loss": trainer.evaluate()["eval_loss"],
        "sequences": int(kept.sum()),
        "tokens": int(kept.sum()) * (args.length - 1),  # each sequence predicts length - 1
        "corrupted_share": noisy / max(int(kept.sum()), 1),
        "steps": trainer.state.global_step,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="fixed,infobatch,small-loss",
                        help=f"comma-separated, of {', '.join(POLICIES)}")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=4, help="training epochs")
    parser.add_argument("--sequences", type=int, default=2400, help="training sequences")
    parser.add_argument("--length", type=int, default=64, help="bytes per sequence")
    parser.add_argument("--corrupt", type=float, default=0.2, help="share of noise sequences")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the training")
    parser.add_argument("--report", help="write each policy's figures to REPORT-<rank>.json")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # (its notes on the tiny config's defaults)
    names = args.policies.split(",")
    for name in names:
        if name not in POLICIES:
            parser.error(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    data = stdlib_bytes((args.sequences + args.sequences // 4) * args.length)
    cut = args.sequences * args.length
    train_set = ByteSequences(data[:cut], args.length, args.corrupt, args.seed)
    held_out = ByteSequences(data[cut:], args.length)
    results = [train(name, args, train_set, held_out) for name in names]
    rank = int(os.environ.get("RANK", 0))
    if args.report:
        Path(f"{args.report}-{rank}.json").write_text(json.dumps(results))
    if rank == 0:
        print(f"{'policy':<12}{'held-out loss/token':>21}{'sequences':>11}{'tokens':>10}"
              f"{'noise share':>13}{'steps':>7}{'seconds':>9}")  # fmt: skip
        for r in results:
            print(f"{r['policy']:<12}{r['held_out_loss']:>21.3f}{r['sequences']:>11}"
                  f"{r['tokens']:>10}{r['corrupted_share']:>13.1%}{r['steps']:>7}"
                  f"{r['seconds']:>9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # gloo's worker threads can abort a DDP process at interpreter exit (docs/scaling.md,
        # "DistributedDataParallel"): leave once everything is written
        sys.stdout.flush()
        os._exit(0)

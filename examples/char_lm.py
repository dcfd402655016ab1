"""A character-level language model that picks which sequences it trains on, per sequence.

    python examples/char_lm.py                 # fixed batches vs small-loss, about a minute on a CPU
    python examples/char_lm.py --corrupt 0.4   # more of the training sequences are noise

The text is Python's own source (``textwrap`` and ``argparse``, read with ``inspect``: nothing to
download), cut into sequences of random length padded to a common one (padding targets are -100,
left out of every loss). A share of the training sequences (``--corrupt``) is replaced by random
characters, which no model can predict: the noisy-data case. Two runs from the same start: fixed
batches, and ``SmallLoss`` as an epoch plan, which after a warm-up drops the sequences whose loss
the training step itself reported as highest (a two-component mixture decides how many; no extra
forward). The table shows the share of noise among the sequences each run trained on, and its
loss per character on held-out clean text.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, StepFeedback
from adaptive_batch.policies import SmallLoss

PAD = -100  # the targets' padding: torch's ignore_index, and the sequence loss's default


def corpus() -> str:
    import argparse as argparse_module
    import textwrap

    text = "".join(inspect.getsource(m) for m in (textwrap, argparse_module))
    return "".join(c for c in text if 32 <= ord(c) < 127 or c == "\n")


def sequences(text: str, vocab: list[str], length: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Non-overlapping windows as (inputs [N, L], next-character targets [N, L]); each keeps a
    random number of characters (at least half), the rest of its targets padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([vocab.index(c) for c in text])
    count = (len(ids) - 1) // length
    windows = ids[: count * length + 1]
    inputs = windows[:-1].view(count, length)
    targets = windows[1:].view(count, length).clone()
    keep = torch.randint(length // 2, length + 1, (count,), generator=gen)
    targets[torch.arange(length) >= keep[:, None]] = PAD
    return inputs, targets


class CharLM(nn.Module):
    def __init__(self, vocab_size: int, width: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 48)
        self.rnn = nn.GRU(48, width, batch_first=True)
        self.head = nn.Linear(width, vocab_size)  # logits [B, L, V]: one per position

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD)


def sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean loss over its characters that are not padding: ``[B]``."""
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none")
    return per_token.sum(1) / (targets != PAD).sum(1).clamp_min(1)


def run(name: str, policy, train, corrupted, test, vocab_size, args) -> dict:
    torch.manual_seed(args.seed)  # the same initial weights for every run
    model = CharLM(vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = AdaptiveBatchSampler(train, policy=policy, batch_size=32, seed=args.seed)
    loader = DataLoader(IndexedDataset(train), batch_sampler=sampler)
    # The sequence loss: each sequence's mean over its characters that are not padding.
    batches = StepFeedback(loader, model, sampler=sampler, loss="sequence_cross_entropy")
    # The plan's weights (0 for the dropped sequences it only scores again) reach the loss here.
    loss_fn = batches.weighted(sequence_losses)
    trained = torch.zeros(len(train), dtype=torch.long)
    late = torch.zeros(len(train), dtype=torch.long)  # trained after the warm-up
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y in batches:  # the loop body is the usual one
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            weights = batches.batch_weights()
            indices = batches.current_indices
            if weights is not None:
                indices = indices[weights > 0]  # weight 0: scored, not trained
            trained[indices] += 1
            if epoch >= args.warmup:
                late[indices] += 1
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        test_loss = token_loss(model(test[0]), test[1]).item()

    def noise_share(counts: torch.Tensor) -> float:
        return (counts * corrupted).sum().item() / max(counts.sum().item(), 1)

    return {
        "run": name,
        "noise in trained": noise_share(trained),
        "after warm-up": noise_share(late),
        "sequences trained": int(trained.sum()),
        "test loss/char": test_loss,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=8, help="passes over the data (8)")
    parser.add_argument("--warmup", type=int, default=2, help="small-loss warm-up epochs (2)")
    parser.add_argument("--corrupt", type=float, default=0.2, help="noise share (0.2)")
    parser.add_argument("--length", type=int, default=64, help="characters per sequence (64)")
    parser.add_argument("--limit", type=int, default=None, help="use only this many sequences")
    parser.add_argument("--seed", type=int, default=0, help="model, data and policy seed (0)")
    args = parser.parse_args()

    text = corpus()
    vocab = sorted(set(text))
    inputs, targets = sequences(text, vocab, args.length, args.seed)
    if args.limit:
        inputs, targets = inputs[: args.limit], targets[: args.limit]
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(inputs), generator=gen)
    held_out = order[: len(order) // 10]
    train_rows = order[len(order) // 10 :]
    x, y = inputs[train_rows].clone(), targets[train_rows].clone()
    corrupted = (torch.rand(len(x), generator=gen) < args.corrupt).long()
    noise = torch.randint(0, len(vocab), x.shape, generator=gen)
    x[corrupted.bool()] = noise[corrupted.bool()]
    y[corrupted.bool(), :-1] = noise[corrupted.bool(), 1:]  # noise predicts noise
    y[corrupted.bool(), -1] = torch.randint(0, len(vocab), (int(corrupted.sum()),), generator=gen)
    y[targets[train_rows] == PAD] = PAD  # the same padding as before
    train = TensorDataset(x, y)
    test = (inputs[held_out], targets[held_out])
    print(
        f"{len(text)} characters, {len(vocab)} symbols: {len(train)} training sequences "
        f"({int(corrupted.sum())} noise), {len(held_out)} held out"
    )
    rows = [
        run("fixed", None, train, corrupted, test, len(vocab), args),
        run(
            "small-loss",
            SmallLoss(warmup_epochs=args.warmup),
            train,
            corrupted,
            test,
            len(vocab),
            args,
        ),
    ]
    columns = list(rows[0])
    print(" | ".join(f"{c:>17}" for c in columns))
    for row in rows:
        cells = [f"{v:>17.3f}" if isinstance(v, float) else f"{v:>17}" for v in row.values()]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()

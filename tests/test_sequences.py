"""Beyond classifiers: sequence models (logits [B, T, V], padding masked) and regression ([B] and
[B, k] targets), through both probes, checked against per-sample autograd loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    HeadProbe,
    IndexedDataset,
    StepFeedback,
)
from adaptive_batch.policies import GradientNoiseScale
from adaptive_batch.probe import (
    functorch_gram,
    linear_head_gram,
    linear_head_moments,
    resolve_loss,
    sequence_cross_entropy,
)

from .reference import per_sample_head_grads

PAD = -100
VOCAB, WIDTH, STEPS = 7, 5, 6


def reference_sequence_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sequence on its own: the mean cross-entropy over its tokens that are not padding."""
    losses = []
    for row_logits, row_targets in zip(logits, targets, strict=True):
        kept = row_targets != PAD
        if not kept.any():
            losses.append((row_logits * 0).sum())  # 0, and no gradient
            continue
        token_losses = [
            F.cross_entropy(row_logits[t : t + 1], row_targets[t : t + 1])
            for t in range(len(row_targets))
            if kept[t]
        ]
        losses.append(torch.stack(token_losses).mean())
    return torch.stack(losses)


class TinyLM(nn.Module):
    """Embedding, a GRU and a linear head over the vocabulary at every position."""

    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = nn.GRU(8, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.flatten = flatten

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.rnn(self.embed(tokens))[0])
        return logits.flatten(0, 1) if self.flatten else logits  # [B * T, V]: the usual LM code


def token_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, the targets padded from a random length on."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, STEPS + 1), generator=gen)
    targets = tokens[:, 1:].clone()
    lengths = torch.randint(0, STEPS + 1, (batch,), generator=gen)
    targets[torch.arange(STEPS) >= lengths[:, None]] = PAD
    return tokens[:, :-1], targets


@given(
    batch=st.integers(1, 4),
    steps=st.integers(1, 6),
    width=st.integers(1, 5),
    classes=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_head_statistics_over_positions_match_a_per_sample_loop(
    batch, steps, width, classes, bias, seed
):
    # Both ways of computing them (pairs of positions, gradients written out) are reached by
    # these shapes; each must equal the per-sample gradients summed over positions.
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, steps, width, generator=gen, dtype=torch.float64)
    delta = torch.randn(batch, steps, classes, generator=gen, dtype=torch.float64)
    grads = torch.einsum("btc,btd->bcd", delta, features).flatten(1)
    if bias:
        grads = torch.cat([grads, delta.sum(1)], dim=1)
    expected_gram = grads @ grads.T
    gram = linear_head_gram(features, delta, bias_term=bias)
    torch.testing.assert_close(gram, expected_gram)
    sq_norms, mean_sq = linear_head_moments(features, delta, bias_term=bias)
    torch.testing.assert_close(sq_norms, grads.square().sum(1))
    torch.testing.assert_close(mean_sq, grads.mean(0).square().sum())


@pytest.mark.parametrize("weight, bias", [(True, True), (True, False), (False, True)])
def test_linear_head_statistics_of_flat_inputs_match_a_per_sample_loop(weight, bias):
    # [B, D] inputs take their own short path: each sample's gradient written out by hand
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    delta = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    grads = []
    for a, d in zip(features, delta, strict=True):
        parts = ([torch.outer(d, a).flatten()] if weight else []) + ([d] if bias else [])
        grads.append(torch.cat(parts))
    grads = torch.stack(grads)
    sq_norms, mean_sq = linear_head_moments(features, delta, weight_term=weight, bias_term=bias)
    torch.testing.assert_close(sq_norms, grads.square().sum(1))
    torch.testing.assert_close(mean_sq, grads.mean(0).square().sum())


def test_sequence_losses_and_their_gradients_match_a_per_sequence_loop():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, STEPS, VOCAB, generator=gen, dtype=torch.float64)
    _, targets = token_batch(5)
    targets[0] = PAD  # a sequence with no token at all: loss 0, no gradient (not NaN)
    loss = resolve_loss("sequence_cross_entropy")
    torch.testing.assert_close(
        loss.losses(logits, targets), reference_sequence_losses(logits, targets)
    )
    leaf = logits.clone().requires_grad_(True)
    reference_sequence_losses(leaf, targets).sum().backward()
    torch.testing.assert_close(loss.gradients(logits, targets), leaf.grad)
    assert not loss.gradients(logits, targets)[0].any()


def test_another_padding_id_is_masked_the_same_way():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, STEPS, VOCAB, generator=gen)
    _, targets = token_batch(3)
    pad_id = VOCAB - 1  # padding written as a vocabulary id
    padded = targets.clone()
    padded[targets == PAD] = pad_id
    padded[targets == pad_id] = 0  # keep the real tokens off the padding id
    expected_targets = padded.clone()
    expected_targets[padded == pad_id] = PAD
    loss = sequence_cross_entropy(ignore_index=pad_id)
    torch.testing.assert_close(
        loss.losses(logits, padded), reference_sequence_losses(logits, expected_targets)
    )


@pytest.mark.parametrize("flatten", [False, True])
def test_look_ahead_probe_of_a_language_model_matches_a_per_sample_loop(flatten):
    torch.manual_seed(0)
    model = TinyLM(flatten=flatten)
    tokens, targets = token_batch(6, seed=3)

    def per_sequence(out, y):  # the reference sees the model's output, flattened or not
        return reference_sequence_losses(out.view(y.shape[0], STEPS, VOCAB), y)

    grads, losses = per_sample_head_grads(model, model.head, tokens, targets, per_sequence)
    result = HeadProbe(model, loss="sequence_cross_entropy")(tokens, targets)
    torch.testing.assert_close(result.losses, losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.gram, grads @ grads.T, atol=1e-5, rtol=1e-4)
    by_func = HeadProbe(model, loss="sequence_cross_entropy", method="func")(tokens, targets)
    torch.testing.assert_close(by_func.gram, result.gram, atol=1e-5, rtol=1e-4)


def test_training_step_feedback_of_a_language_model_matches_a_per_sample_loop():
    torch.manual_seed(0)
    tokens, targets = token_batch(32, seed=4)
    data = TensorDataset(tokens, targets)
    model = TinyLM()
    sampler = AdaptiveBatchSampler(
        data, policy=GradientNoiseScale(), batch_size=8, min_batch_size=4, seed=0
    )
    loader = DataLoader(IndexedDataset(data), batch_sampler=sampler)
    batches = StepFeedback(loader, model, sampler=sampler, loss="sequence_cross_entropy")
    checked = 0
    for x, y in batches:
        indices = batches.current_indices.clone()
        grads, losses = per_sample_head_grads(model, model.head, x, y, reference_sequence_losses)
        logits = model(x)
        loss = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=PAD)
        loss.backward()  # no step: the next batch's reference is at the same parameters
        model.zero_grad()
        checked += 1
    batches.flush()  # the epoch's last batch is reported (no next batch asked for)
    last = batches.last_feedback
    torch.testing.assert_close(last.losses, losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler.ledger.losses[indices], losses, atol=1e-5, rtol=1e-5)
    mean = grads.mean(0)
    assert last.stats["grad_sq_norm"] == pytest.approx(mean.square().sum().item(), rel=1e-4)
    variance = grads.square().sum(1).mean() - mean.square().sum()
    assert last.stats["grad_variance"] == pytest.approx(variance.item(), rel=1e-4)
    assert checked == batches.num_batches


def test_a_sequence_loss_on_the_wrong_shapes_says_what_it_needs():
    model = TinyLM()
    tokens, targets = token_batch(4)
    with pytest.raises(AdaptiveBatchError, match="sequence_cross_entropy"):
        HeadProbe(model)(tokens, targets)  # the default cross-entropy names the fix
    with pytest.raises(AdaptiveBatchError, match=r"\[B, T\]"):
        HeadProbe(model, loss="sequence_cross_entropy")(tokens, targets[:, :2])


class Regressor(nn.Module):
    def __init__(self, outputs: int, squeeze: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, outputs)
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x))
        return out.squeeze(-1) if self.squeeze else out


@pytest.mark.parametrize(
    ("outputs", "squeeze", "target_shape"),
    [(1, True, (12,)), (1, False, (12,)), (1, False, (12, 1)), (3, False, (12, 3))],
    ids=["squeezed-[B]", "[B,1]-head-[B]-targets", "[B,1]", "[B,k]"],
)
def test_regression_through_both_probes_matches_a_per_sample_loop(outputs, squeeze, target_shape):
    torch.manual_seed(0)
    model = Regressor(outputs, squeeze)
    x = torch.randn(12, 4)
    y = torch.randn(target_shape)

    def per_sample_mse(out, target):
        out = out.reshape(out.shape[0], -1)
        return (out - target.reshape(out.shape)).square().mean(1)

    grads, losses = per_sample_head_grads(model, model.head, x, y, per_sample_mse)
    result = HeadProbe(model, loss="mse")(x, y)
    torch.testing.assert_close(result.losses, losses, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(result.gram, grads @ grads.T, atol=1e-6, rtol=1e-4)

    data = TensorDataset(x, y)
    sampler = AdaptiveBatchSampler(data, policy=GradientNoiseScale(), batch_size=12, seed=0)
    loader = DataLoader(IndexedDataset(data), batch_sampler=sampler)
    batches = StepFeedback(loader, model, sampler=sampler, loss="mse")
    for xb, yb in batches:
        out = model(xb)
        F.mse_loss(out, yb.reshape(out.shape)).backward()
    batches.flush()
    torch.testing.assert_close(sampler.ledger.losses, losses, atol=1e-6, rtol=1e-5)
    mean = grads.mean(0)
    stats = batches.last_feedback.stats
    assert stats["grad_sq_norm"] == pytest.approx(mean.square().sum().item(), rel=1e-4)


def test_the_reference_agrees_with_torch_func_for_a_head_at_every_position():
    # The closed form for [B, T, D] inputs and torch.func's per-sample gradients: one formula.
    torch.manual_seed(0)
    head = nn.Linear(WIDTH, VOCAB)
    features = torch.randn(4, STEPS, WIDTH)
    _, targets = token_batch(4, seed=5)
    loss = resolve_loss("sequence_cross_entropy")
    closed = linear_head_gram(features, loss.gradients(head(features).detach(), targets))
    by_func = functorch_gram(head, features, targets, loss.per_sample)
    torch.testing.assert_close(closed, by_func, atol=1e-5, rtol=1e-4)

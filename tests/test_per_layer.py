"""Per-sample gradients of every layer, DBA's greedy subsets, and PerLayerBackward writing .grad."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from adaptive_batch import (
    AdaptiveBatchSampler,
    AdaptiveBatchWarning,
    HeadProbe,
    IndexedSample,
    PerLayerBackward,
    SubsetFilter,
)
from adaptive_batch.policies import CABS, DBA
from adaptive_batch.policies.dba import greedy_margin_subset
from adaptive_batch.probe import PerSampleGradients


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class SmallCNN(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.GroupNorm(1, 3)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.norm(self.conv(x)))).flatten(1))


def naive_per_sample(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """``{parameter: [B, ...]}`` by one autograd.grad call per sample."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        rows.append(torch.autograd.grad(ce(model(x[i : i + 1]), y[i : i + 1]).sum(), params))
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (9, 5), 3),
    "cnn": (SmallCNN, (8, 2, 4, 4), 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("budget", [2**26, 150])
def test_layer_grams_and_weighted_sums_match_a_per_sample_loop(case, budget):
    build, shape, classes = CASES[case]
    model = build().eval()
    x, y = torch.randn(*shape), torch.randint(0, classes, shape[:1])
    grads = PerSampleGradients(model, ce, max_grad_numel=budget)
    grams, losses = grads.layer_grams(x, y)
    naive = naive_per_sample(model, x, y)
    torch.testing.assert_close(losses, ce(model(x), y).detach(), atol=1e-6, rtol=1e-5)
    weights = {layer: torch.rand(shape[0]) for layer in grads.layers}
    sums = grads.weighted_sums(x, y, weights)
    for layer, names in grads.layers.items():
        flat = torch.cat([naive[n].flatten(1) for n in names], dim=1)
        torch.testing.assert_close(grams[layer], flat @ flat.T, atol=1e-5, rtol=1e-4)
        for n in names:
            expected = torch.tensordot(weights[layer], naive[n], dims=1)
            torch.testing.assert_close(sums[n], expected, atol=1e-6, rtol=1e-5)
    if budget == 150:
        assert len(grads.chunk_slices(shape[0])) > 1


def test_chunks_see_the_same_dropout_masks_in_both_passes():
    model = SmallCNN(dropout=0.5).train()
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 4, (6,))
    grads = PerSampleGradients(
        model, ce, max_grad_numel=200
    )  # several chunks, recomputed for Grams
    seeds = grads.new_seeds(6)
    grams, _ = grads.layer_grams(x, y, seeds=seeds)
    # One-hot weights recover each g_i; their dot products must be the Gram entries.
    rows = [
        grads.weighted_sums(x, y, {layer: torch.eye(6)[i] for layer in grads.layers}, seeds=seeds)
        for i in range(6)
    ]
    for layer, names in grads.layers.items():
        g = torch.stack([torch.cat([r[n].flatten() for n in names]) for r in rows])
        torch.testing.assert_close(grams[layer], g @ g.T, atol=1e-5, rtol=1e-4)


def test_batchnorm_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="BatchNorm layer in training mode"):
        PerSampleGradients(model, ce)
    PerSampleGradients(model.eval(), ce)  # eval mode uses running statistics: fine


def slow_greedy(grads: torch.Tensor, loss_delta: float, grad_ema: float, min_size: int):
    """DBA's sequential removal then addition, with explicit mean gradients and Python loops."""
    size = grads.shape[0]

    def margin(members):
        if not members:
            return math.inf
        norm = math.sqrt(
            sum(v * v for v in (sum(grads[i] for i in members) / len(members)).tolist())
        )
        if abs(norm - grad_ema) <= 1e-6 * max(grad_ema, 1e-12):
            return math.inf
        return abs(loss_delta / (norm - grad_ema) - 1)

    members = set(range(size))
    current = margin(members)
    for removing in (True, False):
        while (len(members) > min_size) if removing else (len(members) < size):
            pool = sorted(members) if removing else sorted(set(range(size)) - members)
            scores = [
                (margin(members - {j}) if removing else margin(members | {j}), j) for j in pool
            ]
            best, j = min(scores)
            if not best < current:
                break
            members = members - {j} if removing else members | {j}
            current = best
    return sorted(members), current


@given(
    seed=st.integers(0, 5000),
    size=st.integers(1, 12),
    loss_delta=st.floats(-2, 2),
    grad_ema=st.floats(0.05, 2),
    min_size=st.integers(1, 4),
)
def test_greedy_subset_equals_the_slow_reference(seed, size, loss_delta, grad_ema, min_size):
    grads = torch.randn(size, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask, margin = greedy_margin_subset(
        grads @ grads.T, loss_delta, grad_ema, min_kept=min(min_size, size)
    )
    members, expected = slow_greedy(grads, loss_delta, grad_ema, min(min_size, size))
    if math.isinf(expected):
        assert math.isinf(margin)
    else:
        assert mask.nonzero().flatten().tolist() == members
        assert margin == pytest.approx(expected, rel=1e-9)


def test_per_layer_backward_writes_each_layers_subset_mean():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    backward = PerLayerBackward(model, DBA())
    for _ in range(2):  # the first batch warms up the running averages
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        model.zero_grad()
        loss = backward((x, y))
    selection = backward.last_selection
    assert selection.reason == "selected"
    naive = naive_per_sample(model, x, y)
    assert loss.item() == pytest.approx(ce(model(x), y).mean().item(), rel=1e-5)
    for name, parameter in model.named_parameters():
        mask = selection.masks[name.rpartition(".")[0]]
        torch.testing.assert_close(parameter.grad, naive[name][mask].mean(0), atol=1e-6, rtol=1e-5)
    assert any(m.sum() < 16 for m in selection.masks.values())  # some layer dropped samples


def test_per_layer_backward_accumulates_and_leaves_the_optimizer_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    existing = {n: p.grad.clone() for n, p in model.named_parameters()}
    backward = PerLayerBackward(model, DBA())
    backward((x, y))  # warm-up: every layer uses the whole batch
    for name, parameter in model.named_parameters():
        expected = existing[name] + naive_per_sample(model, x, y)[name].mean(0)
        torch.testing.assert_close(parameter.grad, expected, atol=1e-6, rtol=1e-5)
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, state in before["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][key][field]), torch.as_tensor(value))


def test_per_layer_backward_reports_to_the_sampler():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    policy = DBA()
    sampler = AdaptiveBatchSampler(40, policy=policy, batch_size=10, min_batch_size=4)
    backward = PerLayerBackward(model, policy, sampler=sampler)
    data_x, data_y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    batches = 0
    for batch in sampler:
        index = torch.tensor(batch)
        backward(IndexedSample(index, (data_x[index], data_y[index])))
        batches += 1
        used = backward.last_feedback.kept.tolist()
        assert set(used) <= set(batch) and len(used) >= 1
    assert sampler.num_feedback == batches
    assert (sampler.times_kept + sampler.times_dropped).tolist() == [1] * 40
    with pytest.raises(ValueError, match="IndexedDataset"):
        backward((data_x[:4], data_y[:4]))
    with pytest.raises(TypeError, match="PerLayerBackward"):
        SubsetFilter(None, model, sampler=sampler)


def test_whole_model_probe_gives_exact_variance():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    naive = naive_per_sample(model, x, y)
    flat = torch.cat([g.flatten(1) for g in naive.values()], dim=1)
    exact = HeadProbe(model, head=model)(x, y)
    torch.testing.assert_close(exact.gram, flat @ flat.T, atol=1e-5, rtol=1e-4)
    # A SubsetFilter given the model and an exact-variance CABS probes the whole model.
    with pytest.warns(AdaptiveBatchWarning, match="never run"):  # no sampler here: a probe only
        filt = SubsetFilter(None, model, policy=CABS(lr=0.1))
    assert filt.probe.head is model
    filt.filter_batch((x, y))
    variance = (flat - flat.mean(0)).square().sum(1).mean().item()
    assert filt.last_feedback.stats["grad_variance"] == pytest.approx(variance, rel=1e-4)


def test_per_layer_backward_state_round_trip():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    batches = [(torch.randn(12, 5), torch.randint(0, 3, (12,))) for _ in range(6)]
    first = PerLayerBackward(model, DBA())
    for batch in batches[:3]:
        first(batch)
    second = PerLayerBackward(model, DBA())
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for batch in batches[3:]:
        first(batch)
        second(batch)
        for layer, mask in first.last_selection.masks.items():
            assert torch.equal(mask, second.last_selection.masks[layer])
    assert first.rule.state_dict() == second.rule.state_dict()

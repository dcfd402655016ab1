"""StepFeedback: the hook sees exactly the training forward of each yielded batch, and what it
reports equals a slow per-sample reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    AdaptiveBatchWarning,
    IndexedDataset,
    Reason,
    StepFeedback,
    SubsetFilter,
)
from adaptive_batch.policies import (
    CABS,
    EDBA,
    GradientNoiseScale,
    InfoBatch,
    SelectiveBackprop,
    SmallLoss,
)

from .reference import per_sample_head_grads
from .synthetic import blobs


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def setup(samples: int = 48, policy=None, workers: int = 0, chunk_size=None, **sampler_kwargs):
    torch.manual_seed(0)
    data = blobs(samples)
    model = mlp()
    sampler = AdaptiveBatchSampler(
        data,
        policy=policy,
        batch_size=sampler_kwargs.pop("batch_size", 16),
        min_batch_size=sampler_kwargs.pop("min_batch_size", 8),
        chunk_size=chunk_size,
        **sampler_kwargs,
    )
    extra = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
    loader = DataLoader(IndexedDataset(data), batch_sampler=sampler, **extra)
    return data, model, sampler, StepFeedback(loader, model, sampler=sampler)


def reference_feedback(model: nn.Module, data: TensorDataset, indices: torch.Tensor, params=None):
    """Per-sample losses, mean ||g_i||^2 and ||mean g||^2 of the head, one autograd call each,
    at the parameters the model had when the batch was trained."""
    x, y = data.tensors[0][indices], data.tensors[1][indices]
    was = model.training
    grads, losses = per_sample_head_grads(model, model[-1], x, y)
    model.train(was)
    mean = grads.mean(0)
    return losses, grads.square().sum(1).mean(), mean.square().sum()


def test_reports_what_a_per_sample_loop_measures_for_each_batch():
    data, model, sampler, batches = setup()
    sampler.add_listener(lambda sampler, feedback: None)  # a reader of the statistics
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for x, y in batches:
        indices = batches.current_indices.clone()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        snapshot = mlp()
        snapshot.load_state_dict(before)
        expected.append((indices, *reference_feedback(snapshot.eval(), data, indices)))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    # Every batch's losses reached the sampler's score table (each index once in the epoch).
    for indices, losses, _, _ in expected:
        torch.testing.assert_close(sampler.ledger.losses[indices], losses, atol=1e-5, rtol=1e-5)
    assert sampler.num_feedback == len(expected) == batches.num_batches
    last = batches.last_feedback
    indices, losses, sq_norm, mean_sq = expected[-1]
    assert torch.equal(last.kept, indices)  # the epoch's last batch was not lost
    torch.testing.assert_close(last.losses, losses, atol=1e-5, rtol=1e-5)
    assert last.stats["grad_sq_norm"] == pytest.approx(mean_sq.item(), rel=1e-4)
    assert last.stats["grad_variance"] == pytest.approx((sq_norm - mean_sq).item(), rel=1e-4)
    assert last.stats["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)


def test_each_batch_s_own_forward_is_measured():
    # Batch by batch: the feedback of batch k (reported when batch k+1 is asked for) equals the
    # reference at the parameters batch k was trained with.
    data, model, sampler, batches = setup()
    sampler.add_listener(lambda sampler, feedback: None)  # a reader of the statistics
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pending = None
    for x, y in batches:
        if pending is not None:
            feedback = batches.last_feedback
            torch.testing.assert_close(feedback.losses, pending[1], atol=1e-5, rtol=1e-5)
            assert feedback.stats["grad_sq_norm"] == pytest.approx(pending[3].item(), rel=1e-4)
        frozen = mlp()
        frozen.load_state_dict(model.state_dict())
        frozen.train()  # the training forward, in train mode (no dropout or BatchNorm here)
        pending = (
            batches.current_indices,
            *reference_feedback(frozen, data, batches.current_indices),
        )
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.testing.assert_close(batches.last_feedback.losses, pending[1], atol=1e-5, rtol=1e-5)


def test_evaluation_forwards_in_the_loop_are_ignored():
    _data, model, _sampler, batches = setup()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    probe_x = torch.randn(5, 8)
    for x, y in batches:
        model.eval()
        with torch.no_grad():
            model(probe_x)  # evaluation inside the loop: ignored
        model.train()
        with torch.no_grad():
            model(probe_x)  # no gradients: ignored
        optimizer.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        optimizer.step()
        model(x[:2])  # a second training-mode forward: more rows than the batch, ignored
    assert batches.num_unmeasured == 0
    assert batches.last_feedback.losses.shape == (batches.last_feedback.batch_size,)


def test_micro_batches_of_gradient_accumulation_are_joined():
    data, model, sampler, batches = setup()
    seen = []
    for x, y in batches:
        for part_x, part_y in zip(x.chunk(3), y.chunk(3), strict=True):  # accumulation
            (F.cross_entropy(model(part_x), part_y) / 3).backward()
        seen.append(batches.current_indices.clone())
    assert batches.num_unmeasured == 0 and sampler.num_feedback == len(seen)
    losses, _, _ = reference_feedback(model.eval(), data, seen[-1])
    torch.testing.assert_close(batches.last_feedback.losses, losses, atol=1e-5, rtol=1e-5)


def test_a_ddp_wrapped_model_is_followed_through_its_wrapper():
    class Wrapper(nn.Module):  # as DDP does: the module is a child, the head deeper inside
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    data, model, sampler, _ = setup()
    wrapped = Wrapper(model)
    batches = StepFeedback(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), wrapped, sampler=sampler
    )
    for x, y in batches:
        F.cross_entropy(wrapped(x), y).backward()
    assert batches.head is model[-1] and batches.num_unmeasured == 0


def test_autocast_forwards_are_measured_in_float32():
    data, model, _sampler, batches = setup()
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
    feedback = batches.last_feedback
    assert feedback.losses.dtype == torch.float32 and batches.num_unmeasured == 0
    exact, _, _ = reference_feedback(model.eval(), data, feedback.kept)
    torch.testing.assert_close(feedback.losses, exact, atol=0.05, rtol=0.05)


def test_a_compiled_model_is_measured():
    torch._dynamo.reset()
    _data, model, sampler, batches = setup()
    compiled = torch.compile(model, backend="eager")
    for x, y in batches:
        F.cross_entropy(compiled(x), y).backward()
    assert batches.num_unmeasured == 0 and sampler.num_feedback == batches.num_batches


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_workers_prefetching_and_chunks(chunk_size):
    _data, model, sampler, batches = setup(
        96, policy=GradientNoiseScale(), workers=2, chunk_size=chunk_size, max_batch_size=48
    )
    for _ in range(2):
        candidates = 0
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            candidates += len(y)
        assert candidates == 96
    assert sampler.ledger.num_scored == 192 and batches.num_unmeasured == 0


def test_reported_losses_need_no_hook():
    data = blobs(40)
    sampler = AdaptiveBatchSampler(data, batch_size=10, min_batch_size=5)
    batches = StepFeedback(DataLoader(IndexedDataset(data), batch_sampler=sampler), sampler=sampler)
    model = mlp()
    for x, y in batches:
        losses = F.cross_entropy(model(x), y, reduction="none")
        batches.report_losses(losses)
        losses.mean().backward()
    assert sampler.ledger.num_scored == 40
    with pytest.raises(AdaptiveBatchError, match="10 per-sample losses"):
        batches.hand_out(next(iter(DataLoader(IndexedDataset(data), batch_sampler=sampler))))
        batches.report_losses(torch.zeros(3))


def test_a_batch_whose_forward_is_not_seen_is_reported_unmeasured_with_a_warning():
    _data, model, sampler, batches = setup()
    with pytest.warns(AdaptiveBatchWarning, match="report_losses"):
        for step, (x, y) in enumerate(batches):
            if step != 1:  # step 1 is skipped
                F.cross_entropy(model(x), y).backward()
    assert batches.num_unmeasured == 1 and sampler.num_feedback == 3


def test_rules_that_need_a_look_ahead_probe_are_refused():
    data = blobs(40)
    for policy, name in ((EDBA(), "EDBASizing"), (CABS(lr=0.1), "CABS")):
        sampler = AdaptiveBatchSampler(data, policy=policy, batch_size=10, min_batch_size=5)
        with pytest.raises(
            AdaptiveBatchError, match=f"{name} runs only on feedback from a look-ahead"
        ):
            StepFeedback(None, mlp(), sampler=sampler)
    sampler = AdaptiveBatchSampler(
        data, policy=CABS(lr=0.1, variance="head"), batch_size=16, min_batch_size=16
    )
    StepFeedback(None, mlp(), sampler=sampler)  # head variance: fine


@pytest.mark.parametrize(
    "policy",
    [SmallLoss(stage="look_ahead", epoch_size=40), SelectiveBackprop(), EDBA().selection],
    ids=["small-loss-look-ahead", "selective-backprop", "edba-selection"],
)
def test_a_look_ahead_selection_rule_is_refused_not_ignored(policy):
    sampler = AdaptiveBatchSampler(blobs(40), policy=policy, batch_size=10, min_batch_size=5)
    with pytest.raises(
        AdaptiveBatchError, match=r"StepFeedback trains on every sample.*SubsetFilter"
    ):
        StepFeedback(None, mlp(), sampler=sampler)


def test_an_in_batch_rule_trains_on_the_smallest_losses_of_each_batch():
    policy = SmallLoss(stage="in_batch", fraction=0.25, warmup_epochs=0)
    _data, model, sampler, batches = setup(samples=48, policy=policy, batch_size=16)
    criterion = batches.weighted(lambda out, y: F.cross_entropy(out, y, reduction="none"))
    trained = []
    for x, y in batches:
        indices = batches.current_indices
        loss = criterion(model(x), y)
        # The slow reference: sort the batch's losses in Python, average the 12 smallest.
        per_sample = F.cross_entropy(model(x), y, reduction="none").tolist()
        order = sorted(range(len(per_sample)), key=per_sample.__getitem__)[:12]
        assert loss.item() == pytest.approx(sum(per_sample[i] for i in order) / 12, rel=1e-6)
        assert batches.trained_rows == 12
        trained.append({int(indices[i]) for i in order})
        loss.backward()
    batches.close()
    assert sampler.num_feedback == 3
    kept = sampler.times_kept.nonzero().flatten().tolist()
    assert set(kept) == set().union(*trained)  # the sampler counts the kept as trained
    assert int(sampler.times_dropped.sum()) == 3 * 4
    assert batches.last_feedback.reason == Reason.SELECTED


def test_an_in_batch_rule_without_the_weighted_loss_warns_and_elsewhere_is_refused():
    policy = SmallLoss(stage="in_batch", fraction=0.25, warmup_epochs=0)
    _data, model, _sampler, batches = setup(policy=policy)
    with pytest.warns(AdaptiveBatchWarning, match=r"batches.weighted\(...\)"):
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
    sampler = AdaptiveBatchSampler(blobs(40), policy=policy, batch_size=10, min_batch_size=5)
    with pytest.raises(AdaptiveBatchError, match="only StepFeedback's weighted loss"):
        SubsetFilter(None, mlp(), sampler=sampler)
    with pytest.raises(AdaptiveBatchError, match="give fraction="):
        SmallLoss(stage="in_batch")


def test_the_weighted_loss_applies_the_plan_weights():
    _data, model, _sampler, batches = setup(
        policy=InfoBatch(prune_ratio=0.5, num_epochs=10), batch_size=8
    )
    criterion = batches.weighted(lambda out, y: F.cross_entropy(out, y, reduction="none"))
    for epoch in range(2):
        for x, y in batches:
            loss = criterion(model(x), y)
            weights = batches.batch_weights()
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            expected = per_sample.mean() if weights is None else (per_sample * weights).mean()
            assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
            loss.backward()
            if epoch == 1:
                assert weights is not None and set(weights.tolist()) <= {1.0, 2.0}
    with pytest.raises(AdaptiveBatchError, match="reduction='none'"):
        batches.weighted(F.cross_entropy)(torch.randn(2, 3), torch.tensor([0, 1]))


def test_state_dict_reports_the_batch_just_trained_first():
    _data, model, sampler, batches = setup()
    iterator = iter(batches)
    x, y = next(iterator)
    F.cross_entropy(model(x), y).backward()
    assert sampler.num_feedback == 0
    state = batches.state_dict()
    assert sampler.num_feedback == 1 and state["num_batches"] == 1
    assert not math.isnan(batches.last_feedback.stats["loss"])
    assert batches.last_feedback.reason == Reason.KEEP_ALL


def test_computes_the_statistics_only_when_something_reads_them():
    # An epoch plan reads per-sample losses only: no head-gradient statistics are computed.
    _, model, _, batches = setup(policy=InfoBatch(num_epochs=10))
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    assert set(batches.last_feedback.stats) == {"loss"}
    assert not batches.wants_statistics
    # A sizing rule reads them.
    _, model, _, batches = setup(policy=GradientNoiseScale())
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    assert {"grad_sq_norm", "grad_variance"} <= set(batches.last_feedback.stats)


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_a_report_lag_delays_feedback_but_an_epoch_ends_with_all_of_it(lag):
    data, model, sampler, _ = setup(policy=InfoBatch(num_epochs=10))
    loader = DataLoader(IndexedDataset(data), batch_sampler=sampler)
    batches = StepFeedback(loader, model, sampler=sampler, report_lag=lag)
    seen = 0
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        seen += 1
        # the batch just trained and ``lag`` before it are still on their way
        assert sampler.num_feedback == max(seen - 1 - lag, 0)
    assert sampler.num_feedback == seen  # the epoch's end waits for all of it
    assert sampler.ledger.num_scored == len(data)


class HeadAsFunction(nn.Module):
    """A custom head written as ``x @ W``: its last nn.Linear is not what it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.weight = nn.Parameter(torch.randn(16, 3))

    def forward(self, x):
        return torch.relu(self.body(x)) @ self.weight


@pytest.mark.parametrize(
    "policy", [InfoBatch(num_epochs=10), GradientNoiseScale()], ids=["plan", "sizing"]
)
@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.LayerNorm(3)),
        HeadAsFunction,
    ],
    ids=["layernorm-after-head", "head-as-function"],
)
def test_a_model_whose_output_is_not_its_head_s_is_refused_naming_head(model, policy):
    data = blobs(32)
    sampler = AdaptiveBatchSampler(data, policy=policy, batch_size=16, min_batch_size=8)
    net = model()
    batches = StepFeedback(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), net, sampler=sampler
    )
    with pytest.raises(AdaptiveBatchError, match="head="):
        for x, y in batches:
            F.cross_entropy(net(x), y).backward()


def test_nan_losses_warn_once_and_eval_mode_says_so():
    data = blobs(32)
    data.tensors[0][5] = float("nan")
    sampler = AdaptiveBatchSampler(
        data, policy=InfoBatch(num_epochs=10), batch_size=16, min_batch_size=8
    )
    net = mlp()
    batches = StepFeedback(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), net, sampler=sampler
    )
    with pytest.warns(AdaptiveBatchWarning, match="NaN or infinite"):
        for x, y in batches:
            F.cross_entropy(net(x), y).backward()
    net.eval()  # a slip: the training forward in eval mode
    with pytest.warns(AdaptiveBatchWarning, match=r"eval mode \(model.eval\(\)\)"):
        for x, y in batches:
            F.cross_entropy(net(x), y).backward()

"""Each sizing and selection rule against its formula worked by hand, and the shared invariants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    Feedback,
    ProbeResult,
    Progress,
    Reason,
)
from adaptive_batch.policies import (
    CABS,
    DBA,
    EDBA,
    AdaDamp,
    Arbiter,
    Constant,
    DBASizing,
    GeoDamp,
    GradientNoiseScale,
    InBatchSmallLoss,
    InfoBatch,
    KeepAll,
    PadaDamp,
    Policy,
    SelectiveBackprop,
    StaleSelectiveBackprop,
)
from adaptive_batch.policies.arbiter import arbiter_objective, fit_curvature
from adaptive_batch.policies.gns import goodput


def fb(batch: int = 10, reason: str = Reason.SELECTED, **stats: float) -> Feedback:
    return Feedback(torch.arange(batch), torch.arange(batch, batch), reason, stats)


def progress(updates: int, samples: int = 0, epoch_size: int = 100) -> Progress:
    return Progress(updates, samples, epoch_size)


def test_constant():
    assert Constant(64).next_batch_size(100, fb(), progress(1)) == 64
    assert Constant().next_batch_size(100, fb(), progress(1)) == 100
    with pytest.raises(ValueError):
        Constant(0)


def test_cabs_by_hand():
    rule = CABS(lr=10.0)  # decay 0.95, L_avg from 1.0, xi_avg from 0
    # L = 0.95 + 0.05 * 2 = 1.05, xi = 0.05 * 40 = 2.0 -> 10 * 2.0 / 1.05 = 19.05
    assert rule.next_batch_size(16, fb(loss=2.0, grad_variance=40.0), progress(1)) == 19
    # L = 0.95 * 1.05 + 0.05 = 1.0475, xi = 0.95 * 2 + 0.05 * 20 = 2.9 -> 27.68
    assert rule.next_batch_size(19, fb(loss=1.0, grad_variance=20.0), progress(2)) == 28
    # A NaN statistic changes nothing.
    assert rule.next_batch_size(28, fb(loss=math.nan, grad_variance=1.0), progress(3)) == 28
    assert (rule.loss_avg, rule.variance_avg) == pytest.approx((1.0475, 2.9))
    lr = [10.0]
    follows = CABS(lr=lambda: lr[0])
    lr[0] = 20.0  # a scheduler changed it
    assert follows.next_batch_size(16, fb(loss=2.0, grad_variance=40.0), progress(1)) == 38


def test_cabs_asks_for_the_right_probe():
    assert (
        CABS(lr=0.1).probe_scope == "model" and CABS(lr=0.1, variance="head").probe_scope == "head"
    )


def test_adadamp_by_hand():
    rule = AdaDamp(wait=2, dwell=2)
    losses = [2.0, 1.5, 1.0, 0.8, 0.5]
    sizes = [rule.next_batch_size(10, fb(loss=v), progress(k + 1)) for k, v in enumerate(losses)]
    # F0 = 2.0; at update 2: F = (2 + 1.5) / 2 -> ceil(10 * 2 / 1.75) = 12;
    # at update 4: F = (1.0 + 0.8) / 2 -> ceil(10 * 2 / 0.9) = 23.
    assert sizes == [10, 12, 12, 23, 23]
    floor = AdaDamp(wait=1, dwell=1, min_loss=0.5)
    floor.next_batch_size(10, fb(loss=1.0), progress(1))
    # Below F* the formula has no answer: the last size is kept (never an infinite batch).
    assert floor.next_batch_size(10, fb(loss=0.4), progress(2)) == 10


def test_padadamp_by_hand():
    rule = PadaDamp(rate=0.5, wait=2, dwell=2)
    sizes = [rule.next_batch_size(10, fb(), progress(k)) for k in range(1, 6)]
    assert sizes == [10, 11, 11, 12, 12]  # ceil(10 + 0.5 k) at k = 2, 4


def test_geodamp_by_hand():
    rule = GeoDamp(factor=2, delay=2)
    assert rule.next_batch_size(8, fb(), progress(1, 5, 10)) == 8
    assert rule.next_batch_size(8, fb(), progress(2, 20, 10)) == 16  # 2 epochs done
    assert rule.next_batch_size(16, fb(), progress(3, 45, 10)) == 32  # 4 epochs done


def test_gradient_noise_scale_by_hand():
    rule = GradientNoiseScale(ema_decay=0.5, overhead_samples=100.0)
    # var = 0.9 * 10 / 9 = 1.0, sqr = 0.2 - 1.0 / 10 = 0.1 -> phi = 10 -> B* = sqrt(100 * 10)
    first = rule.next_batch_size(10, fb(10, grad_variance=0.9, grad_sq_norm=0.2), progress(1))
    assert rule.noise_scale() == pytest.approx(10.0) and first == round(math.sqrt(1000))
    assert goodput(31.62, 10, 10, 100) / goodput(10, 10, 10, 100) > 1.05
    # Near the optimum the predicted gain is under 5%: no switch (no thrashing).
    same = fb(32, grad_variance=31 / 32, grad_sq_norm=0.1 + 1.0 / 32)  # var 1.0, sqr 0.1 again
    assert rule.next_batch_size(30, same, progress(2)) == 30
    assert rule.noise_scale() == pytest.approx(10.0)
    noisy = GradientNoiseScale()
    assert (
        noisy.next_batch_size(10, fb(10, grad_variance=1.0, grad_sq_norm=0.0), progress(1))
        == math.inf
    )


def test_selective_backprop_keeps_high_losses_more_often():
    rule = SelectiveBackprop(keep=0.5, seed=0)
    result = ProbeResult(losses=torch.tensor([0.1, 2.0]), gram=torch.eye(2))
    kept_high = sum(rule.select(result).kept.tolist() == [1] for _ in range(4000))
    # Percentiles 0.25 and 0.75, weights q ** (1 / keep - 1) = q: the high loss wins 75% of draws.
    assert kept_high / 4000 == pytest.approx(0.75, abs=0.03)


def test_selective_backprop_active_window():
    rule = SelectiveBackprop(keep=0.3, start=0.5, end=0.9, total_candidates=100)
    result = ProbeResult(losses=torch.arange(10.0), gram=torch.eye(10))
    reasons = [rule.select(result).reason for _ in range(10)]
    assert reasons == [Reason.KEEP_ALL] * 5 + [Reason.SELECTED] * 4 + [Reason.KEEP_ALL]
    assert SelectiveBackprop(keep=0.3).select(result).kept.numel() == 3


def test_dba_sizing_by_hand():
    rule = DBASizing(target_fraction=0.5, ema_decay=0.5)
    assert (
        rule.next_batch_size(10, fb(10, kept_fraction=0.8), progress(1)) == 16
    )  # kept 8 -> 8 / 0.5
    assert (
        rule.next_batch_size(16, fb(16, kept_fraction=0.25), progress(2)) == 12
    )  # avg (8 + 4) / 2
    assert rule.next_batch_size(12, fb(12, Reason.WARMUP, kept_fraction=1.0), progress(3)) == 12


def test_arbiter_maps_its_agent_output_to_a_size():
    rule = Arbiter(lr=0.1, min_batch_size=8, max_batch_size=512)
    with torch.no_grad():
        rule.agent[2].weight.zero_()
        rule.agent[2].bias.fill_(0.5)
    size = rule.next_batch_size(
        100, fb(100, loss=2.0, grad_sq_norm=0.5, grad_variance=1.0), progress(1)
    )
    assert size == math.floor((512 - 8) / (1 + math.exp(-0.5)) + 8)


def test_arbiter_objective_and_curvature_formulas():
    lr, sqr, var, h = 0.1, 2.0, 50.0, 4.0
    for s in (8.0, 64.0):
        expected = (lr * sqr - lr**2 * h / 2 * (sqr + var / s)) / s / (lr * sqr)
        assert float(arbiter_objective(torch.tensor(s), lr, sqr, var, h)) == pytest.approx(expected)
    decrease = lr * sqr - lr**2 * h / 2 * (sqr + var / 16)
    assert fit_curvature(lr, sqr, var, 16, decrease) == pytest.approx(h)
    assert (
        fit_curvature(lr, sqr, var, 16, decrease=10.0) == 0.0
    )  # faster than predicted: no curvature


def run_arbiter(rule: Arbiter, losses, sqr: float, var: float, size: int) -> list[float]:
    """Feed back batches of the sizes the rule asks for, with the given gradient statistics."""
    sizes = []
    for k, loss in enumerate(losses):
        stats = {
            "loss": loss,
            "grad_sq_norm": sqr + var / size,
            "grad_variance": var * (size - 1) / size,
        }
        sizes.append(rule.next_batch_size(size, fb(size, **stats), progress(k + 1)))
        size = int(sizes[-1])
    return sizes


@pytest.mark.parametrize(("slope", "larger"), [(-1e-4, True), (-0.2, False)])
def test_arbiter_learns_toward_the_better_size(slope, larger):
    # A loss that barely falls fits a curvature at which the per-sample objective peaks at twice
    # the measured size: the agent grows the batch. A loss falling as fast as a noiseless step
    # predicts fits no curvature: the smallest batch gains most per sample.
    rule = Arbiter(lr=0.1, window=5, meta_lr=0.05, seed=1)
    losses = [2.0 + slope * k for k in range(41)]
    sizes = run_arbiter(rule, losses, sqr=2.0, var=200.0, size=64)
    assert sizes[1:5] == [sizes[0]] * 4  # held for a window
    assert rule.meta_updates == 8
    assert (sizes[-1] > sizes[0]) is larger


def sizing_rules():
    return [
        Constant(),
        EDBA().sizing,
        CABS(lr=0.5),
        AdaDamp(wait=1, dwell=1),
        PadaDamp(rate=5.0, wait=1, dwell=1),
        GeoDamp(delay=1),
        GradientNoiseScale(),
        Arbiter(lr=0.1, window=3),
        DBASizing(),
    ]


stat_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0))
stats_strategy = st.fixed_dictionaries(
    {},
    optional={
        k: stat_values
        for k in (
            "loss",
            "grad_sq_norm",
            "grad_variance",
            "kept_fraction",
            "margin",
            "target_grad_norm",
            "min_grad_norm",
            "max_grad_norm",
        )
    },
)


@given(rule_index=st.integers(0, 8), stats=st.lists(stats_strategy, min_size=1, max_size=8))
def test_every_sizing_rule_stays_within_the_caps_for_any_feedback(rule_index, stats):
    rule = sizing_rules()[rule_index]
    sampler = AdaptiveBatchSampler(
        200, policy=rule, batch_size=20, min_batch_size=5, max_batch_size=60
    )
    sizes = []
    for batch, feedback_stats in zip(sampler, stats * 10, strict=False):
        sizes.append(len(batch))
        kept = torch.tensor(batch)
        sampler.feedback(Feedback(kept, kept[:0], Reason.SELECTED, feedback_stats))
    assert all(5 <= s <= 60 for s in sizes[:-1]) and sizes[-1] <= 60


def probe_results(seed: int, size: int, poison: str) -> ProbeResult:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(size, 4, generator=gen)
    losses = torch.rand(size, generator=gen)
    if poison == "nan":
        losses[0] = math.nan
    elif poison == "inf":
        grads[-1, 0] = math.inf
    elif poison == "zero":
        grads.zero_()
    return ProbeResult(losses=losses, gram=grads @ grads.T)


@given(
    rule_index=st.integers(0, 2),
    seed=st.integers(0, 1000),
    size=st.integers(1, 50),
    poison=st.sampled_from(["none", "nan", "inf", "zero"]),
)
def test_every_selection_rule_keeps_a_nonempty_subset(rule_index, seed, size, poison):
    rule = [EDBA(seed=seed).selection, SelectiveBackprop(keep=0.2, seed=seed), KeepAll()][
        rule_index
    ]
    for step in range(3):
        selection = rule.select(probe_results(seed + step, size, poison))
        kept = selection.kept.tolist()
        assert (
            1 <= len(kept) <= size
            and kept == sorted(set(kept))
            and kept[0] >= 0
            and kept[-1] < size
        )


FEEDBACK = [
    fb(
        12,
        loss=2.0 - 0.1 * k,
        grad_sq_norm=0.5 + 0.01 * k,
        grad_variance=3.0 - 0.1 * k,
        kept_fraction=0.5 + 0.02 * k,
    )
    for k in range(16)
]


@pytest.mark.parametrize("rule_index", range(9))
def test_sizing_state_round_trip_continues_identically(rule_index):
    original = sizing_rules()[rule_index]
    answers = [
        original.next_batch_size(12, f, progress(k + 1, 12 * (k + 1), 30))
        for k, f in enumerate(FEEDBACK[:7])
    ]
    restored = sizing_rules()[rule_index]
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    for k, f in enumerate(FEEDBACK[7:], start=7):
        p = progress(k + 1, 12 * (k + 1), 30)
        assert restored.next_batch_size(12, f, p) == original.next_batch_size(12, f, p)
    assert answers  # the first half ran


def test_selective_backprop_state_round_trip():
    original = SelectiveBackprop(keep=0.4, seed=3)
    for s in range(3):
        original.select(probe_results(s, 20, "none"))
    restored = SelectiveBackprop(keep=0.4, seed=99)
    restored.load_state_dict(original.state_dict())
    for s in range(3, 6):
        assert (
            restored.select(probe_results(s, 20, "none")).kept.tolist()
            == original.select(probe_results(s, 20, "none")).kept.tolist()
        )


def test_policies_compose():
    mixed = Policy(selection=EDBA().selection, sizing=CABS(lr=0.1))
    sampler = AdaptiveBatchSampler(
        100, policy=mixed, batch_size=16, min_batch_size=16, max_batch_size=64
    )
    assert sampler.sizing is mixed.sizing
    with pytest.raises(TypeError, match="not a selection rule"):
        Policy(selection=CABS(lr=0.1))
    with pytest.raises(TypeError, match="not a sizing rule"):
        Policy(sizing=KeepAll())
    assert DBA().selection is None and DBA().per_layer is not None


def test_bad_parameters_are_refused():
    bad = [
        lambda: CABS(lr=0.0),
        lambda: CABS(lr=0.1, ema_decay=1.0),
        lambda: CABS(lr=0.1, variance="approx"),
        lambda: AdaDamp(dwell=0),
        lambda: PadaDamp(rate=-1.0),
        lambda: GeoDamp(delay=0),
        lambda: GradientNoiseScale(overhead_samples=0),
        lambda: GradientNoiseScale(scope="layer"),
        lambda: SelectiveBackprop(keep=0.0),
        lambda: SelectiveBackprop(start=0.9, end=0.5),
        lambda: Arbiter(lr=0.1, min_batch_size=10, max_batch_size=10),
        lambda: Arbiter(lr=0.1, window=1),
        lambda: DBASizing(target_fraction=0.0),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


@given(
    losses=st.lists(st.floats(0, 10, allow_nan=False) | st.just(math.nan), min_size=1, max_size=40),
    forget_rate=st.floats(0, 0.95),
    epoch=st.integers(0, 20),
)
def test_in_batch_small_loss_keeps_the_scheduled_count_of_smallest_losses(
    losses, forget_rate, epoch
):
    rule = InBatchSmallLoss(forget_rate, ramp_epochs=10)
    values = torch.tensor(losses)
    mask, kept = rule.keep_mask(values, epoch)
    # Co-teaching's schedule, by hand: 1 - min(t / T_k, 1) * tau of the batch, at least one.
    expected = max(1, math.ceil((1 - min(epoch / 10, 1) * forget_rate) * len(losses) - 1e-9))
    assert kept == min(expected, len(losses)) == int(mask.sum())
    finite = torch.nan_to_num(values, nan=math.inf)
    if kept < len(losses):
        assert finite[mask].max() <= finite[~mask].min()  # nothing dropped is smaller


def _every_rule():
    from adaptive_batch.policies import (
        DBASelection,
        DBASizing,
        EDBASelection,
        EDBASizing,
        RandomSubset,
        SmallLossPlan,
        SmallLossSelection,
    )

    return [
        CABS(lr=0.1),
        AdaDamp(),
        PadaDamp(),
        GeoDamp(),
        Arbiter(lr=0.1),
        GradientNoiseScale(),
        InfoBatch(num_epochs=3),
        RandomSubset(0.5),
        StaleSelectiveBackprop(num_epochs=3),
        SmallLossPlan(),
        SmallLossSelection(),
        InBatchSmallLoss(0.2),
        DBASelection(),
        DBASizing(),
        EDBASelection(),
        EDBASizing(),
        SelectiveBackprop(),
    ]


def test_a_rule_refuses_the_state_of_another_kind_of_rule_by_name():
    rules = _every_rule()
    for saved in rules:
        state = saved.state_dict()
        for loading in rules:
            if type(loading) is type(saved):
                loading.load_state_dict(state)  # its own kind: fine
            elif state or loading.state_dict():  # two stateless rules have nothing to mix up
                with pytest.raises(AdaptiveBatchError, match=type(loading).__name__):
                    loading.load_state_dict(state)

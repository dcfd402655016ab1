"""What adaptive batching costs: per-step overhead, probe math against a training step, sampler
throughput. Every ratio compares figures measured side by side in the same run.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler

from adaptive_batch import (
    AdaptiveBatchSampler,
    Feedback,
    IndexedSample,
    ProbeResult,
    StepFeedback,
    SubsetFilter,
)
from adaptive_batch.policies import EDBA, KeepAll
from adaptive_batch.probe import LOSSES, linear_head_gram

from .common import synchronize
from .models import cifar_resnet, mlp

__all__ = ["Measurement", "math_vs_step", "sampler_throughput", "step_overhead"]


@dataclass
class Measurement:
    section: str
    item: str
    value: float
    unit: str
    note: str = ""


def _median_seconds(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def step_overhead(device: torch.device, *, batch: int = 256, repeats: int = 7) -> list[Measurement]:
    """A plain step on a candidate batch vs probe + filter + step on what it keeps.

    ``keep-all`` keeps every sample (the pure cost of probing and filtering); ``edba`` trains on
    the subset EDBA keeps, so it can be cheaper than a plain step; ``edba, buckets of 32`` rounds
    the kept size so the step sees few distinct shapes.
    """
    models = {"MLP 3072-512-10": lambda: mlp(3072, 512, 10), "ResNet-8": cifar_resnet}
    return [
        m
        for name, build in models.items()
        for m in _step_overhead(name, build, device, batch, repeats)
    ]


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each function, timed in alternating rounds so that every ratio between
    them sees the same machine conditions (clock, cache, other load)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[label].append(time.perf_counter() - start)
    return {label: sorted(t)[len(t) // 2] for label, t in times.items()}


STEP_FEEDBACK = "feedback from the training step"


def _step_feedback(
    model: nn.Module,
    step: Callable[[torch.Tensor, torch.Tensor], None],
    x: torch.Tensor,
    y: torch.Tensor,
) -> Callable[[], None]:
    """A plain step whose batch comes from a sampler through StepFeedback: the hook on the head,
    the closed-form statistics, the feedback and the sampler's bookkeeping, every step."""
    batch = y.numel()
    sampler = AdaptiveBatchSampler(
        batch, batch_size=batch, min_batch_size=batch, max_batch_size=batch, shuffle=False
    )
    stage = StepFeedback(None, model, sampler=sampler)

    def run() -> None:
        indices = torch.tensor(next(iter(sampler)))  # one batch: one pass (and its feedback)
        xs, ys = stage.hand_out(IndexedSample(indices, (x, y)))  # reports the previous batch
        step(xs, ys)

    return run


def _step_overhead(
    name: str, build: Callable[[], nn.Module], device: torch.device, batch: int, repeats: int
) -> list[Measurement]:
    torch.manual_seed(0)
    model = build().to(device)
    step = _train_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def forward_only() -> None:
        # The probe's floor: keep-all cannot cost less than one extra forward pass.
        model.eval()
        with torch.no_grad():
            model(x)

    fns: dict[str, Callable[[], object]] = {
        "plain step": lambda: step(x, y),
        "forward, no grad": forward_only,
    }
    kept: dict[str, list[int]] = {}
    variants = (
        ("keep-all", KeepAll(), None),
        ("edba", EDBA(seed=0).selection, None),
        ("edba, buckets of 32", EDBA(seed=0).selection, 32),
    )
    for label, policy, buckets in variants:
        filt = SubsetFilter(None, model, policy=policy, buckets=buckets)
        kept[label] = []

        def filtered(filt: SubsetFilter = filt, sizes: list[int] = kept[label]) -> None:
            xs, ys = filt.filter_batch((x, y))
            sizes.append(len(ys))
            step(xs, ys)

        fns[label] = filtered
    fns[STEP_FEEDBACK] = _step_feedback(model, step, x, y)
    kept[STEP_FEEDBACK] = [batch]
    seconds = _interleaved_medians(fns, device, repeats)
    plain = seconds["plain step"]
    prefix = f"{name}, B={batch}"
    out = [
        Measurement("step", f"{prefix}: plain step", 1000 * plain, "ms"),
        Measurement(
            "step",
            f"{prefix}: ratio (plain step + forward, no grad) / plain",
            1 + seconds["forward, no grad"] / plain,
            "x",
            "the floor for keep-all",
        ),
    ]
    for label, sizes in kept.items():
        note = f"keeps {sum(sizes) / max(len(sizes), 1):.0f} of {batch} on average"
        item = (
            f"step with {label}" if label == STEP_FEEDBACK else f"probe + filter ({label}) + step"
        )
        out.append(Measurement("step", f"{prefix}: {item}", 1000 * seconds[label], "ms", note))
        out.append(
            Measurement(
                "step", f"{prefix}: ratio {label} / plain", seconds[label] / plain, "x", note
            )
        )
    return out


def _probe_math(
    batch: int, features: int, classes: int, device: torch.device
) -> Callable[[], object]:
    """Gram matrix in closed form and EDBA's selection over 64 subsets (host decision included)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, features, generator=gen).to(device)
    z = torch.randn(batch, classes, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    rule = EDBA(seed=0).selection
    rule.loss_ema, rule.grad_ema = 2.0, 1.0  # past warm-up: a full selection each call

    def run() -> object:
        losses = F.cross_entropy(z, y, reduction="none")
        gram = linear_head_gram(a, LOSSES["cross_entropy"].gradients(z, y))
        return rule.select(ProbeResult(losses=losses, gram=gram))

    return run


def math_vs_step(
    device: torch.device, *, quick: bool = False, repeats: int = 5
) -> list[Measurement]:
    """Probe + selection math against one training step of real networks with these heads:
    ResNet-18 (D=512, C=10) at B=1000 and ResNet-50 (D=2048, C=1000) at B=256, on 32x32 inputs;
    and against the cheapest network with the head, a linear trunk (the worst case)."""
    shapes = (
        [(100, 512, 10, "resnet18")]
        if quick
        else [(1000, 512, 10, "resnet18"), (256, 2048, 1000, "resnet50")]
    )
    return [m for shape in shapes for m in _math_vs_step(*shape, device=device, repeats=repeats)]


def _math_vs_step(
    batch: int, features: int, classes: int, net: str, *, device: torch.device, repeats: int
) -> list[Measurement]:
    shape = f"B={batch}, D={features}, C={classes}"
    math = _median_seconds(_probe_math(batch, features, classes, device), device, repeats)
    out = [Measurement("math", f"{shape}: probe + selection math", 1000 * math, "ms")]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    trunks: dict[str, Callable[[], nn.Module]] = {
        "linear trunk 3072-D": lambda: nn.Sequential(
            nn.Flatten(), nn.Linear(3072, features), nn.ReLU(), nn.Linear(features, classes)
        )
    }
    try:
        models = importlib.import_module("torchvision.models")  # the one matching your torch
        trunks[f"torchvision {net}"] = lambda: getattr(models, net)(num_classes=classes)
    except ImportError:
        out.append(
            Measurement(
                "math",
                f"{shape}: torchvision {net}",
                float("nan"),
                "ms",
                "torchvision not installed",
            )
        )
    for trunk, build in trunks.items():
        torch.manual_seed(0)
        model = build().to(device)
        step = _train_step(model, torch.optim.SGD(model.parameters(), lr=0.01))
        seconds = _median_seconds(
            lambda step=step: step(x, y), device, 1 if "torchvision" in trunk else repeats
        )
        out.append(Measurement("math", f"{shape}: {trunk} step", 1000 * seconds, "ms"))
        out.append(Measurement("math", f"{shape}: math / {trunk} step", 100 * math / seconds, "%"))
    return out


def sampler_throughput(*, num_samples: int = 1_000_000, batch: int = 256) -> list[Measurement]:
    """Indices per second handed out (with feedback after every batch) vs torch's BatchSampler."""
    out = []
    start = time.perf_counter()
    count = sum(
        len(b) for b in BatchSampler(RandomSampler(range(num_samples)), batch, drop_last=False)
    )
    torch_rate = count / (time.perf_counter() - start)
    out.append(
        Measurement(
            "sampler",
            f"torch BatchSampler(RandomSampler), B={batch}",
            torch_rate / 1e6,
            "M indices/s",
        )
    )
    for label, kwargs in (("whole batches", {}), ("chunks of 32", {"chunk_size": 32})):
        sampler = AdaptiveBatchSampler(
            num_samples, batch_size=batch, min_batch_size=32, max_batch_size=1024, **kwargs
        )
        start = time.perf_counter()
        count = 0
        for indices in sampler:
            tensor = torch.tensor(indices)
            sampler.feedback(Feedback(tensor, tensor[:0]))
            count += len(indices)
        rate = count / (time.perf_counter() - start)
        out.append(
            Measurement(
                "sampler",
                f"AdaptiveBatchSampler, {label}, with feedback",
                rate / 1e6,
                "M indices/s",
            )
        )
        out.append(
            Measurement("sampler", f"AdaptiveBatchSampler, {label} / torch", rate / torch_rate, "x")
        )
    return out

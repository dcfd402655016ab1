"""``adaptive-batch bench``: the benchmark parts, their settings, and where results go.

Each part writes ``<out>/<part>.csv`` (rows appended as runs finish: a later call resumes) and
``<out>/<part>.md`` (the table, with the machine and the command), plus plots where they help.
``--quick`` runs every part with tiny settings (synthetic CIFAR-shaped data when no ``--data`` is
given) in about a minute: a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from ..paths import user_cache_dir
from .common import describe_machine, markdown_table, pick_device

__all__ = ["PARTS", "run_parts"]

SCARCE_CIFAR_PARTS = {
    "scarce-cifar-100": "100-samples",
    "scarce-cifar-1pct": "1pct",
    "scarce-cifar-10pct": "10pct",
}
CIFAR_PARTS = ("time-to-accuracy", "sizing", "noisy-cifar", *SCARCE_CIFAR_PARTS)
PARTS = (
    "overhead",
    "probe",
    "lag",
    "policies",
    "time-to-accuracy",
    "sizing",
    "noisy-cifar",
    *SCARCE_CIFAR_PARTS,
    "scarce-digits",
    "lm",
)


def _write(out: Path, part: str, title: str, body: str, device: torch.device) -> None:
    command = "adaptive-batch " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    text = f"# {title}\n\nMachine: {describe_machine(device)}. Command: `{command}`.\n\n{body}\n"
    (out / f"{part}.md").write_text(text)
    print(f"\n## {title}\n\n{body}\n")


def run_parts(args: argparse.Namespace) -> None:
    parts = args.parts or list(PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown benchmark parts {unknown}; choose from {', '.join(PARTS)}")
    quick = args.quick
    if not quick and not args.data and any(p in CIFAR_PARTS for p in parts):
        needs = [p for p in parts if p in CIFAR_PARTS]
        raise SystemExit(
            f"the parts {', '.join(needs)} need CIFAR-10: give --data PATH (the "
            "cifar10-jpg.tar.gz archive or its folder), or leave them out"
        )
    if args.data and not Path(args.data).exists():
        raise SystemExit(f"--data {args.data}: no such file or folder")
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or ((0,) if quick else (0, 1, 2))
    show = not args.no_progress
    for part in parts:
        if part == "overhead":
            _overhead(out, device, quick)
        elif part == "probe":
            _probe(out, device, quick, args)
        elif part == "lag":
            _lag(out, device, quick, args)
        elif part == "policies":
            _policies(out, device, quick, args, seeds, show)
        elif part == "time-to-accuracy":
            _time_to_accuracy(out, device, quick, args, seeds, show)
        elif part == "sizing":
            _sizing(out, device, quick, args, seeds, show)
        elif part == "noisy-cifar":
            _noisy(out, device, quick, args, seeds, show)
        elif part in SCARCE_CIFAR_PARTS:
            _scarce_cifar(out, device, quick, args, seeds, show, SCARCE_CIFAR_PARTS[part])
        elif part == "scarce-digits":
            _scarce_digits(out, device, quick, args, seeds, show)
        elif part == "lm":
            _lm(out, device, quick, args, seeds, show)


def _overhead(out: Path, device: torch.device, quick: bool) -> None:
    from .host_cost import format_host_cost, measure_host_cost, score_table_bytes
    from .overhead import math_vs_step, sampler_throughput, step_overhead

    sizes = (5_000,) if quick else (50_000, 1_000_000, 10_000_000, 100_000_000)
    costs = measure_host_cost(sizes, rounds=2 if quick else 15, steps=5 if quick else 20, log=print)
    _write(
        out,
        "host-cost",
        "What the library adds to a step, by dataset size (CPU time of the training thread)",
        format_host_cost(costs, score_table_bytes()),
        device,
    )
    from .rank_exchange import format_rank_exchange, measure_rank_exchange

    batch = 64 if quick else 256
    exchange = measure_rank_exchange(batch, rounds=2 if quick else 5, steps=10 if quick else 200)
    _write(
        out,
        "rank-exchange",
        "One step's feedback exchange under DDP, before and after 0.3 (2 local processes)",
        format_rank_exchange(exchange, batch),
        device,
    )
    measurements = step_overhead(device, batch=batch, repeats=2 if quick else 7)
    measurements += math_vs_step(device, quick=quick, repeats=2 if quick else 5)
    measurements += sampler_throughput(num_samples=50_000 if quick else 1_000_000)
    rows = [[m.section, m.item, f"{m.value:.3g}", m.unit, m.note] for m in measurements]
    import csv

    with (out / "overhead.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["section", "item", "value", "unit", "note"])
        writer.writerows(rows)
    _write(
        out,
        "overhead",
        "Overhead",
        markdown_table(["section", "measure", "value", "unit", "note"], rows),
        device,
    )


def _probe(out: Path, device: torch.device, quick: bool, args: argparse.Namespace) -> None:
    from .probe_cost import DEFAULT_SHAPES, format_probe_cost, measure_probe_cost

    shapes = args.shape or ([(64, 32, 10), (128, 64, 10)] if quick else DEFAULT_SHAPES)
    costs = [
        measure_probe_cost(
            *s, device=device, repeats=args.repeats, max_grad_numel=args.max_grad_numel
        )
        for s in shapes
    ]
    _write(
        out,
        "probe",
        "Probe math: closed form vs torch.func",
        "```\n" + format_probe_cost(costs, str(device), torch.get_num_threads()) + "\n```",
        device,
    )


def _lag(out: Path, device: torch.device, quick: bool, args: argparse.Namespace) -> None:
    from .lag import format_lag, measure_lag

    workers = (0, 2) if quick else args.workers
    samples = 512 if quick else 2048
    results = [
        measure_lag(w, chunk_size=c, prefetch_factor=args.prefetch_factor, samples=samples)
        for c in (None, 8)
        for w in workers
    ]
    _write(out, "lag", "Feedback lag with DataLoader workers", format_lag(results), device)


def _policies(
    out: Path, device: torch.device, quick: bool, args: argparse.Namespace, seeds, show: bool
) -> None:
    from .policies import format_policy_table, run_policy_bench

    policies = ("fixed", "edba", "dba") if quick else args.policies
    epochs, fraction = (2, 0.2) if quick else (args.epochs, args.data_fraction)
    rows = run_policy_bench(
        policies, seeds, epochs=epochs, data_fraction=fraction, out_dir=out, show_progress=show
    )
    title = f"Every policy on digits: {epochs} epochs, data fraction {fraction:g}, seeds {','.join(map(str, seeds))}"
    _write(out, "policies", title, format_policy_table(rows, policies), device)


def _cifar(args: argparse.Namespace, out: Path, quick: bool):
    from .cifar import load_cifar10, synthetic_cifar

    if args.data:
        return load_cifar10(args.data, args.cache or user_cache_dir())
    if quick:
        return synthetic_cifar(1000, 300)
    raise SystemExit(
        "the CIFAR-10 parts need --data PATH (the cifar10-jpg.tar.gz archive or its folder)"
    )


def _epoch_setup(args: argparse.Namespace, quick: bool):
    from .schedule import EpochSetup

    optimizer = {
        "lr": args.lr,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": args.weight_decay,
    }
    if quick:
        return EpochSetup(
            subset=200, epochs=2, batch_size=32, optimizer=optimizer, model=args.tta_model
        )
    subset = None if args.subset >= 50_000 else args.subset
    return EpochSetup(
        subset=subset,
        epochs=args.tta_epochs,
        batch_size=args.batch_size,
        optimizer=optimizer,
        model=args.tta_model,
        augment=not args.no_augment,
    )


def _time_to_accuracy(
    out: Path, device: torch.device, quick: bool, args: argparse.Namespace, seeds, show: bool
) -> None:
    from .time_to_accuracy import format_time_to_accuracy, plot_curves, run_time_to_accuracy

    data = _cifar(args, out, quick)
    setup = _epoch_setup(args, quick)
    policies = ("infobatch",) if quick else args.tta_policies
    results = run_time_to_accuracy(
        data,
        policies,
        seeds,
        setup=setup,
        out_dir=out,
        device=device,
        show_progress=show,
        controls=() if args.no_controls else ("short", "rs2"),
    )
    plot_curves(results, setup, out / "time-to-accuracy.png")
    title = f"Time to the fixed baseline's final accuracy: {setup.describe()} ({data.source})"
    _write(
        out, "time-to-accuracy", title, format_time_to_accuracy(results, policies, setup), device
    )


def _sizing(
    out: Path, device: torch.device, quick: bool, args: argparse.Namespace, seeds, show: bool
) -> None:
    from .schedule import fixed_alternatives
    from .sizing import ARMS, format_sizing, run_sizing

    data = _cifar(args, out, quick)
    setup = _epoch_setup(args, quick)
    arms = (
        ("fixed", "geodamp")
        if quick
        else args.sizing_arms or ("fixed", *fixed_alternatives(setup), *ARMS)
    )
    results = run_sizing(
        data, arms, seeds, setup=setup, out_dir=out, device=device, show_progress=show
    )
    title = f"Does adaptive sizing pay? {setup.describe()} ({data.source})"
    table = format_sizing(results, arms, setup, args.saturation_batch)
    _write(out, "sizing", title, table, device)


def _noisy(
    out: Path, device: torch.device, quick: bool, args: argparse.Namespace, seeds, show: bool
) -> None:
    from .noisy import format_noisy, run_noisy

    data = _cifar(args, out, quick)
    setup = _epoch_setup(args, quick)
    policies = ("small-loss", "small-loss-inbatch") if quick else args.noisy_policies
    rates = (0.4,) if quick else args.noise
    controls = () if args.no_controls else ("short", "rs2")
    results = run_noisy(
        data, rates, policies, seeds, setup=setup, out_dir=out, device=device,
        show_progress=show, controls=controls,
    )  # fmt: skip
    title = f"Noisy labels (symmetric): {setup.describe()} ({data.source})"
    _write(out, "noisy-cifar", title, format_noisy(results, rates, policies, setup), device)


def _scarce_cifar(
    out: Path,
    device: torch.device,
    quick: bool,
    args: argparse.Namespace,
    seeds,
    show: bool,
    subset: str,
) -> None:
    """One subset per part (each within an hour on 2 CPU cores); the table shows every subset
    run so far."""
    from .scarce import (
        CIFAR_POLICIES,
        CIFAR_SUBSETS,
        PAPER_CIFAR,
        format_scarce,
        plot_scarce,
        run_cifar_scarce,
    )

    data = _cifar(args, out, quick)
    policies = ("fixed", "edba") if quick else args.scarce_policies or CIFAR_POLICIES
    budget = 800 if quick else args.budget
    results = run_cifar_scarce(
        data,
        [subset],
        policies,
        seeds,
        budget=budget,
        out_dir=out,
        device=device,
        show_progress=show,
    )
    subsets = [s for s in CIFAR_SUBSETS if results.select(subset=s, budget=budget)]
    title = f"Data-scarce CIFAR-10 ({data.source}), ResNet-8, {budget} candidates per run"
    table = format_scarce(results, subsets, policies, budget, paper=PAPER_CIFAR)
    plot_scarce(results, subsets, policies, budget, out / "scarce-cifar.png")
    _write(out, "scarce-cifar", title + ": test accuracy %", table, device)


def _scarce_digits(
    out: Path, device: torch.device, quick: bool, args: argparse.Namespace, seeds, show: bool
) -> None:
    from .scarce import (
        DIGITS_POLICIES,
        DIGITS_SUBSETS,
        format_scarce,
        plot_scarce,
        run_digits_scarce,
    )

    policies = ("fixed", "dba") if quick else DIGITS_POLICIES
    subsets = tuple(DIGITS_SUBSETS)
    budget = 400 if quick else args.digits_budget
    results = run_digits_scarce(
        subsets, policies, seeds, budget=budget, out_dir=out, show_progress=show
    )
    title = f"DBA's data-scarce analog on digits: one-hidden-layer MLP, {budget} candidates per run, test accuracy %"
    plot_scarce(results, subsets, policies, budget, out / "scarce-digits.png")
    _write(out, "scarce-digits", title, format_scarce(results, subsets, policies, budget), device)


def _lm(
    out: Path, device: torch.device, quick: bool, args: argparse.Namespace, seeds, show: bool
) -> None:
    from .lm import ARMS, LmSetup, format_lm, run_lm

    setup = (
        LmSetup(sequences=160, length=32, epochs=2)
        if quick
        else LmSetup(sequences=args.lm_sequences, epochs=args.lm_epochs)
    )
    results = run_lm(ARMS, seeds, setup=setup, out_dir=out, device=device, show_progress=show)
    title = f"A causal LM under the Hugging Face Trainer, at equal tokens: {setup.describe()}"
    _write(out, "lm", title, format_lm(results, ARMS, setup), device)

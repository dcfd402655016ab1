"""The ``adaptive-batch`` command."""

from __future__ import annotations

import argparse
import sys

import torch

from .demo import fixed_batch_size
from .recipes import POLICY_NAMES


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1]; got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {text}")
    return value


def _shape(text: str) -> tuple[int, int, int]:
    try:
        batch, features, classes = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected B,D,C such as 256,2048,1000; got {text}"
        ) from None
    return batch, features, classes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptive-batch", description="Adaptive batch size and composition for PyTorch."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="fixed batches vs an adaptive policy on scikit-learn's digits"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the split, model and sampling (default 0)"
    )
    demo.add_argument(
        "--data-fraction",
        type=_fraction,
        default=1.0,
        help="fraction of the training split to use (default 1)",
    )
    demo.add_argument("--epochs", type=_positive, default=30, help="epochs per run (default 30)")
    demo.add_argument(
        "--out",
        default="demo-output",
        help="folder for demo.png and results.json (default demo-output)",
    )
    demo.add_argument(
        "--policy", default="edba", choices=POLICY_NAMES, help="the adaptive policy (default edba)"
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    bench = commands.add_parser("bench", help="measure costs, printed side by side")
    parts = bench.add_subparsers(dest="part", required=True)
    probe = parts.add_parser(
        "probe", help="probe math: closed-form Gram vs torch.func, per (B, D, C)"
    )
    probe.add_argument(
        "--shape",
        type=_shape,
        action="append",
        help="B,D,C (repeatable; default the three reference shapes)",
    )
    probe.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda when present",
    )
    probe.add_argument(
        "--repeats", type=_positive, default=5, help="timed repeats per figure (median reported)"
    )
    probe.add_argument(
        "--max-grad-numel",
        type=_positive,
        default=2**26,
        help="torch.func path memory bound (numbers)",
    )
    lag = parts.add_parser(
        "lag", help="feedback lag with DataLoader workers, sized when handed out vs where consumed"
    )
    lag.add_argument(
        "--workers", type=_ints, default=(0, 2, 4), help="num_workers values (default 0,2,4)"
    )
    lag.add_argument(
        "--prefetch-factor", type=_positive, default=2, help="DataLoader prefetch_factor"
    )

    policies = parts.add_parser(
        "policies", help="every policy on digits over several seeds (resumable)"
    )
    policies.add_argument(
        "--policies",
        type=_names,
        default=("fixed", *POLICY_NAMES),
        help="comma-separated names: fixed (batch 100), fixed-<size>, or a policy (default: fixed and every policy)",
    )
    policies.add_argument(
        "--seeds", type=_ints, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)"
    )
    policies.add_argument(
        "--epochs", type=_positive, default=30, help="epochs per run (default 30)"
    )
    policies.add_argument(
        "--data-fraction",
        type=_fraction,
        default=1.0,
        help="fraction of the training split (default 1)",
    )
    policies.add_argument(
        "--out", default="bench-output", help="folder for policies.csv and policies.md"
    )
    policies.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in POLICY_NAMES and fixed_batch_size(n) is None]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policies {unknown}; choose from fixed, fixed-<size>, {', '.join(POLICY_NAMES)}"
        )
    return names


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(
            seed=args.seed,
            data_fraction=args.data_fraction,
            epochs=args.epochs,
            out_dir=args.out,
            policy=args.policy,
            show_progress=not args.no_progress,
        )
    elif args.command == "bench" and args.part == "probe":
        from .bench.probe_cost import DEFAULT_SHAPES, format_probe_cost, measure_probe_cost

        costs = [
            measure_probe_cost(
                *shape, device=args.device, repeats=args.repeats, max_grad_numel=args.max_grad_numel
            )
            for shape in args.shape or DEFAULT_SHAPES
        ]
        print(format_probe_cost(costs, args.device, torch.get_num_threads()))
    elif args.command == "bench" and args.part == "lag":
        from .bench.lag import format_lag, measure_lag

        results = [
            measure_lag(w, chunk_size=chunk, prefetch_factor=args.prefetch_factor)
            for chunk in (None, 8)
            for w in args.workers
        ]
        print(format_lag(results))
    elif args.command == "bench" and args.part == "policies":
        from pathlib import Path

        from .bench.policies import format_policy_table, run_policy_bench

        rows = run_policy_bench(
            args.policies,
            args.seeds,
            epochs=args.epochs,
            data_fraction=args.data_fraction,
            out_dir=args.out,
            show_progress=not args.no_progress,
        )
        table = format_policy_table(rows, args.policies)
        header = (
            f"digits, {args.epochs} epochs, data fraction {args.data_fraction:g}, seeds "
            f"{','.join(map(str, args.seeds))}, {torch.get_num_threads()} torch threads, device cpu"
        )
        print(header)
        print(table)
        (Path(args.out) / "policies.md").write_text(header + "\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

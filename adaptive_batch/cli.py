"""The ``adaptive-batch`` command."""

from __future__ import annotations

import argparse
import sys

import torch


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
        "--policy", default="edba", choices=["edba"], help="the adaptive policy (default edba)"
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
    return parser


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
    return 0


if __name__ == "__main__":
    sys.exit(main())

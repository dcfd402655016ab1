"""The ``adaptive-batch`` command: ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import sys

from adaptive_batch import __version__

from .paths import user_cache_dir
from .recipes import DEFAULT_POLICY, POLICY_NAMES
from .runner import check_run_name


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


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text}") from None


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates; got {text}") from None
    if not all(0.0 <= r < 1.0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must lie in [0, 1); got {text}")
    return rates


def _list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = []
    for name in names:
        try:
            check_run_name(name)
        except ValueError:
            unknown.append(name)
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policies {unknown}; choose from fixed, fixed-<size>, rs2-<fraction>, "
            f"{', '.join(POLICY_NAMES)}"
        )
    return names


DEMO_DESCRIPTION = (
    "Train the same small network on scikit-learn's digits twice, with the same seed, optimizer, "
    "learning-rate schedule and number of epochs: once on plain fixed batches (a shuffled "
    "DataLoader), once with the adaptive sampler and --policy. Shows a progress bar, prints a "
    "table (test accuracy, steps, samples trained on and candidates, training seconds), and saves "
    "to --out a plot of test accuracy, loss and batch size against samples processed, the "
    "policy's batch-by-batch trajectory (CSV) and the runs' numbers (JSON). Runs in well under a "
    "minute on a laptop CPU."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptive-batch", description="Adaptive batch size and composition for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="fixed batches vs an adaptive policy on scikit-learn's digits",
        description=DEMO_DESCRIPTION,
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the split, model and sampling (default 0)"
    )
    demo.add_argument(
        "--data-fraction",
        type=_fraction,
        default=1.0,
        help="fraction of the training split (default 1)",
    )
    demo.add_argument("--epochs", type=_positive, default=30, help="epochs per run (default 30)")
    demo.add_argument(
        "--out",
        default="demo-output",
        help="folder for demo.png and results.json (default demo-output)",
    )
    demo.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        choices=POLICY_NAMES,
        help=f"the adaptive policy (default {DEFAULT_POLICY}, the one that paid best on digits)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    from .bench.suite import PARTS

    bench = commands.add_parser(
        "bench",
        help="benchmarks: costs, time to accuracy, data-scarce tables",
        description=f"Run benchmark parts (default: all of {', '.join(PARTS)}). Results go to --out as CSV, "
        "markdown and plots; rerunning resumes where a part stopped.",
    )
    bench.add_argument(
        "parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)"
    )
    bench.add_argument(
        "--quick", action="store_true", help="tiny settings, about a minute: a smoke test"
    )
    bench.add_argument(
        "--out", default="bench-output", help="results folder (default bench-output)"
    )
    bench.add_argument(
        "--data", default=None, help="CIFAR-10: the cifar10-jpg.tar.gz archive or its folder"
    )
    bench.add_argument(
        "--cache",
        default=None,
        help=f"decoded CIFAR-10 cache folder (default {user_cache_dir()}; set "
        "ADAPTIVE_BATCH_CACHE to move it)",
    )
    bench.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    bench.add_argument(
        "--seeds", type=_ints, default=None, help="comma-separated seeds (default 0,1,2; quick: 0)"
    )
    bench.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group = bench.add_argument_group("probe")
    group.add_argument(
        "--shape",
        type=_shape,
        action="append",
        help="B,D,C (repeatable; default the three reference shapes)",
    )
    group.add_argument(
        "--repeats", type=_positive, default=5, help="timed repeats per figure (median reported)"
    )
    group.add_argument(
        "--max-grad-numel",
        type=_positive,
        default=2**26,
        help="torch.func path memory bound (numbers)",
    )
    group = bench.add_argument_group("lag")
    group.add_argument(
        "--workers", type=_ints, default=(0, 2, 4), help="num_workers values (default 0,2,4)"
    )
    group.add_argument(
        "--prefetch-factor",
        type=_positive,
        default=2,
        help="DataLoader prefetch_factor (default 2)",
    )
    group = bench.add_argument_group("policies (digits)")
    group.add_argument(
        "--policies",
        type=_names,
        default=("fixed", *POLICY_NAMES),
        help="names (default: fixed and all)",
    )
    group.add_argument("--epochs", type=_positive, default=30, help="epochs per run (default 30)")
    group.add_argument(
        "--data-fraction", type=_fraction, default=1.0, help="fraction of the training split"
    )
    group = bench.add_argument_group("time-to-accuracy, sizing, noisy-cifar (CIFAR-10)")
    group.add_argument(
        "--tta-epochs", type=_positive, default=32, help="epochs per run (default 32)"
    )
    group.add_argument(
        "--tta-model",
        choices=("convnet", "resnet8"),
        default="convnet",
        help="network (default convnet: 3 stride-2 conv stages of 16/32/64 channels, 24k "
        "parameters; resnet8: 78k parameters, about 3x slower)",
    )
    group.add_argument(
        "--subset",
        type=_positive,
        default=10_000,
        help="class-balanced training images (default 10000; 50000: all)",
    )
    group.add_argument("--batch-size", type=_positive, default=128, help="baseline batch (128)")
    group.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    group.add_argument(
        "--weight-decay", type=float, default=5e-4, help="SGD weight decay (default 5e-4)"
    )
    group.add_argument(
        "--no-augment", action="store_true", help="train without random crop and flip"
    )
    group.add_argument(
        "--tta-policies",
        type=_names,
        default=("infobatch", "stale-sb"),
        help="policies compared with the full fixed run and, at the samples each trains on, with "
        "the shortened schedule and RS2 (default infobatch,stale-sb)",
    )
    group.add_argument(
        "--no-controls",
        action="store_true",
        help="time-to-accuracy and noisy-cifar without the shortened-schedule and RS2 controls "
        "(an ablation beside policies already run with theirs)",
    )
    group.add_argument(
        "--sizing-arms",
        type=_list,
        default=None,
        help="sizing arms (default: fixed at the baseline batch, 4x smaller and larger, and every "
        "sizing rule: gns, cabs, cabs-constant, adadamp, padadamp, geodamp, adadamp-cosine, "
        "geodamp-cosine, arbiter)",
    )
    group.add_argument(
        "--saturation-batch",
        type=_positive,
        default=512,
        help="the sizing table's projected time: a step costs the same up to this batch, "
        "proportionally more beyond (a model of a GPU, not a measurement; default 512)",
    )
    group.add_argument(
        "--noise", type=_rates, default=(0.2, 0.4), help="label-noise rates (default 0.2,0.4)"
    )
    group.add_argument(
        "--noisy-policies",
        type=_list,
        default=("small-loss", "small-loss-inbatch", "small-loss-lookahead"),
        help="policies run on noisy labels beside the fixed baselines (the baseline batch, 4x "
        "smaller and larger; default: small-loss as a plan, in-batch and look-ahead; "
        "small-loss-told: the plan told the noise rate)",
    )
    group = bench.add_argument_group("scarce-cifar, scarce-digits")
    group.add_argument(
        "--scarce-policies",
        type=_names,
        default=None,
        help="CIFAR policies (default: all that apply)",
    )
    group.add_argument(
        "--budget", type=_positive, default=40_000, help="candidates per CIFAR run (default 40000)"
    )
    group.add_argument(
        "--digits-budget",
        type=_positive,
        default=20_000,
        help="candidates per digits run (default 20000)",
    )
    group = bench.add_argument_group("lm (the Hugging Face Trainer)")
    group.add_argument("--lm-epochs", type=_positive, default=4, help="epochs per run (default 4)")
    group.add_argument(
        "--lm-sequences", type=_positive, default=2400, help="training sequences (default 2400)"
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
    elif args.command == "bench":
        from .bench.suite import run_parts

        run_parts(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

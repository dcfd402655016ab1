"""The adaptive-batch command: demo options, outputs and argument errors; bench probe."""

from __future__ import annotations

import csv
import json
import math

import pytest
from tqdm import tqdm

from adaptive_batch.app.bench.probe_cost import measure_probe_cost
from adaptive_batch.app.cli import main
from adaptive_batch.app.demo import demo_figure, load_digits_split, run_demo, train_run
from adaptive_batch.app.recipes import DEFAULT_POLICY, POLICY_NAMES


def test_demo_writes_table_plot_trajectory_and_results(tmp_path, capsys):
    results = run_demo(seed=1, data_fraction=0.3, epochs=4, out_dir=tmp_path, show_progress=False)
    out = capsys.readouterr().out
    assert DEFAULT_POLICY == "stale-sb"
    assert "test acc %" in out and "fixed" in out and "stale-sb" in out
    assert "404 training samples (30% of the split)" in out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in saved] == ["fixed", "stale-sb"]
    fixed, pruned = results
    assert fixed.trained == 4 * 404  # four epochs over the subset, nothing filtered
    assert pruned.trained == pruned.candidates < fixed.trained  # epochs were pruned
    assert saved[1]["steps"] == pruned.steps and 0.0 <= pruned.test_accuracy <= 1.0
    # Test accuracy after every epoch, at the samples processed by then.
    assert [c for _, c, _, _ in fixed.curve] == [404, 808, 1212, 1616]
    assert len(pruned.curve) == 4 and pruned.curve[-1][1] == pruned.candidates
    # The policy's trajectory: one row per batch, the kept samples adding up to what it trained.
    with (tmp_path / "trajectory-stale-sb.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == pruned.steps
    assert int(rows[-1]["kept_total"]) == pruned.trained
    assert "trained vs fixed" in out and f"{pruned.trained / fixed.trained:.2f}x" in out
    # The plot says what ran and shows time beside samples.
    figure = demo_figure(results, title="fixed vs stale-sb, seed 1")
    assert figure.get_suptitle() == "fixed vs stale-sb, seed 1"
    timed = [a for a in figure.axes if "seconds" in a.get_xlabel()]
    assert len(timed) == 2
    accuracy_by_time = timed[0].get_lines()[0]
    assert list(accuracy_by_time.get_xdata()) == [t for t, _, _, _ in fixed.curve]


def test_demo_is_reproducible(tmp_path):
    first = run_demo(seed=3, data_fraction=0.2, epochs=1, out_dir=tmp_path, show_progress=False)
    second = run_demo(seed=3, data_fraction=0.2, epochs=1, out_dir=tmp_path, show_progress=False)
    assert [r.losses for r in first] == [r.losses for r in second]


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--data-fraction", "0"],
        ["demo", "--data-fraction", "1.5"],
        ["demo", "--epochs", "0"],
        ["demo", "--policy", "magic"],
        ["bench", "probe", "--shape", "10,20"],
        ["bench", "policies", "--policies", "edba,magic"],
        ["bench", "policies", "--seeds", "a,b"],
        [],
    ],
)
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_run_demo_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="data_fraction"):
        run_demo(data_fraction=0.0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="policy"):
        run_demo(policy="nope", out_dir=tmp_path)


def test_bench_probe_prints_both_paths_and_writes_its_table(tmp_path, capsys):
    argv = ["bench", "probe", "--shape", "20,8,3", "--repeats", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "closed form" in out and "torch.func" in out and "    20      8      3" in out
    assert "torch.func" in (tmp_path / "probe.md").read_text()


def test_probe_cost_paths_agree_and_chunking_is_counted():
    cost = measure_probe_cost(24, 6, 4, repeats=1, max_grad_numel=100)
    assert cost.max_abs_diff < 1e-5
    assert cost.func_chunks == 24  # 28 parameters, 100 numbers: one sample per chunk


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_trains_in_the_demo_loop(policy):
    train, test, allowed = load_digits_split(seed=0, data_fraction=0.15)
    with tqdm(total=1, disable=True) as progress:
        result = train_run(policy, train, test, allowed, seed=0, epochs=1, progress=progress)
    # RS2 draws its fraction of the epoch (0.5); every other policy sees all of it once
    drawn = round(0.5 * len(allowed)) if policy == "rs2" else len(allowed)
    assert result.steps >= 1 and result.candidates == drawn
    assert 1 <= result.trained <= result.candidates
    assert 0.0 <= result.test_accuracy <= 1.0 and all(map(math.isfinite, result.losses))


def test_bench_policies_is_resumable_and_prints_mean_and_spread(tmp_path, capsys):
    argv = ["bench", "policies", "--policies", "fixed,edba", "--seeds", "0,1", "--epochs", "1"]
    assert main([*argv, "--data-fraction", "0.2", "--out", str(tmp_path), "--no-progress"]) == 0
    first = (tmp_path / "policies.csv").read_text()
    assert main([*argv, "--data-fraction", "0.2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "policies.csv").read_text() == first  # nothing run twice
    assert len(first.strip().splitlines()) == 1 + 4
    out = capsys.readouterr().out
    assert "| edba | 2 |" in out and "±" in out
    assert (tmp_path / "policies.md").read_text().count("\n| ") == 3


def test_bench_policies_resumes_a_whole_number_data_fraction(tmp_path):
    argv = ["bench", "policies", "--policies", "fixed", "--seeds", "0", "--epochs", "1"]
    argv += ["--data-fraction", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    first = (tmp_path / "policies.csv").read_text()
    assert main(argv) == 0
    assert (tmp_path / "policies.csv").read_text() == first
    assert "| fixed | 1 |" in (tmp_path / "policies.md").read_text()

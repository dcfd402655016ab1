"""The adaptive-batch command: demo options, outputs and argument errors; bench probe."""

from __future__ import annotations

import json

import pytest

from adaptive_batch.bench.probe_cost import measure_probe_cost
from adaptive_batch.cli import main
from adaptive_batch.demo import run_demo


def test_demo_writes_table_plot_and_results(tmp_path, capsys):
    results = run_demo(seed=1, data_fraction=0.3, epochs=2, out_dir=tmp_path, show_progress=False)
    out = capsys.readouterr().out
    assert "test acc %" in out and "fixed" in out and "edba" in out
    assert "404 training samples (30% of the split)" in out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in saved] == ["fixed", "edba"]
    fixed, edba = results
    assert fixed.samples_trained == 2 * 404  # two epochs over the subset, nothing filtered
    assert edba.samples_probed == 2 * 404 and edba.samples_trained <= edba.samples_probed
    assert saved[1]["steps"] == edba.steps and 0.0 <= edba.test_accuracy <= 1.0


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


def test_bench_probe_prints_both_paths(capsys):
    assert main(["bench", "probe", "--shape", "20,8,3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "closed form" in out and "torch.func" in out and "    20      8      3" in out


def test_probe_cost_paths_agree_and_chunking_is_counted():
    cost = measure_probe_cost(24, 6, 4, repeats=1, max_grad_numel=100)
    assert cost.max_abs_diff < 1e-5
    assert cost.func_chunks == 24  # 28 parameters, 100 numbers: one sample per chunk

"""The benchmark: the quick suite end to end, resumable results, the data helpers, the runner's
limits and its leak check."""

from __future__ import annotations

import csv
import math
import statistics

import numpy
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from adaptive_batch.app import runner
from adaptive_batch.app.bench.cifar import load_cifar10, stratified_subset
from adaptive_batch.app.bench.common import Results, mean_std
from adaptive_batch.app.bench.sizing import parse_sizes
from adaptive_batch.app.cli import main
from adaptive_batch.app.runner import RunSpec, train

from .test_examples import tiny_cifar


def read_csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_quick_bench_runs_every_part_and_resumes(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    for name in ("overhead", "probe", "lag", "policies", "time-to-accuracy", "noisy-cifar"):
        assert (tmp_path / f"{name}.md").read_text().startswith("# "), name
    for plot in ("time-to-accuracy", "scarce-cifar", "scarce-digits"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 5_000, plot
    assert "ratio (object / frame)" in (tmp_path / "rank-exchange.md").read_text()
    overhead = read_csv(tmp_path / "overhead.csv")
    ratios = [float(r["value"]) for r in overhead if "ratio" in r["item"]]
    assert len(ratios) == 10 and all(math.isfinite(v) and v > 0 for v in ratios)
    assert any("feedback from the training step" in r["item"] for r in overhead)
    # Every data-scarce run used only its subset, and the table says so.
    scarce = read_csv(tmp_path / "scarce-cifar.csv")
    assert {r["subset"] for r in scarce} == {"100-samples", "1pct", "10pct"}
    assert all(r["indices_inside"] == "True" for r in scarce)
    assert "LEAK" not in (tmp_path / "scarce-cifar.md").read_text()
    assert all(int(r["candidates"]) >= 800 for r in scarce)  # the quick budget
    tta = read_csv(tmp_path / "time-to-accuracy.csv")
    # the policy, then its budget-matched controls: the shortened schedule and RS2
    assert [r["policy"] for r in tta] == ["fixed", "infobatch", "short@infobatch", "rs2@infobatch"]
    fraction = int(tta[1]["trained"]) / int(tta[0]["trained"])
    assert float(tta[3]["fraction"]) == pytest.approx(fraction, abs=1e-4)
    assert int(tta[2]["epochs"]) == max(1, round(fraction * int(tta[0]["epochs"])))
    noisy = read_csv(tmp_path / "noisy-cifar.csv")
    arms = ["fixed", "fixed-8", "fixed-128", "small-loss", "small-loss-inbatch"]
    arms += ["short@small-loss-inbatch", "rs2@small-loss-inbatch"]  # it trained on fewer
    assert [r["policy"] for r in noisy] == arms
    inbatch = noisy[4]
    assert int(inbatch["trained"]) < int(noisy[0]["trained"])  # the left-out are not trained
    fraction = int(inbatch["trained"]) / int(noisy[0]["trained"])
    short_epochs = max(1, round(fraction * 2))  # the schedule shortened to its samples
    assert int(noisy[5]["trained"]) == short_epochs * int(noisy[0]["trained"]) // 2
    assert float(noisy[0]["trained_noisy_fraction"]) == pytest.approx(0.4)  # fixed trains on all
    assert all(len(r["noisy_curve"].split(";")) == 2 for r in noisy)  # counted after each epoch
    sizing = read_csv(tmp_path / "sizing.csv")
    assert [r["arm"] for r in sizing] == ["fixed", "geodamp"]
    for row in sizing:  # the recorded batch sizes account for every step and sample
        sizes = parse_sizes(row["sizes"])
        assert len(sizes) == int(row["steps"]) and sum(sizes) == int(row["trained"])
    assert "Projected time is a model" in (tmp_path / "sizing.md").read_text()
    lm = {r["arm"]: r for r in read_csv(tmp_path / "lm.csv")}  # the Hugging Face Trainer's
    assert {"fixed", "infobatch", "small-loss", "short@infobatch", "rs2@infobatch"} <= set(lm)
    infobatch = lm["infobatch"]
    assert int(infobatch["tokens"]) < int(lm["fixed"]["tokens"])  # it pruned the second epoch
    assert lm["short@infobatch"]["steps"] == infobatch["steps"]  # the fixed run, stopped there
    assert int(lm["rs2@infobatch"]["tokens"]) == pytest.approx(int(infobatch["tokens"]), rel=0.02)
    # The arms with a sampler leave their trajectory: one row per step, kept adding up.
    trajectories = tmp_path / "trajectories"
    infobatch = read_csv(trajectories / "time-to-accuracy-infobatch-0.csv")
    assert len(infobatch) == int(tta[1]["steps"])
    assert int(infobatch[-1]["kept_total"]) == int(tta[1]["trained"])
    assert (trajectories / "noisy-0.4-small-loss-0.csv").stat().st_size > 0
    assert not (trajectories / "time-to-accuracy-fixed-0.csv").exists()  # a plain DataLoader
    # A second call finds every run in the CSV and trains nothing.
    before = (tmp_path / "scarce-cifar.csv").read_text()
    argv = ["bench", "scarce-cifar-100", "time-to-accuracy", "--quick", "--out", str(tmp_path)]
    assert main([*argv, "--no-progress"]) == 0
    assert (tmp_path / "scarce-cifar.csv").read_text() == before
    assert len(read_csv(tmp_path / "time-to-accuracy.csv")) == 4
    assert "90.69 ± 0.17" in capsys.readouterr().out  # the paper's figure beside ours


def test_cifar_parts_need_data_outside_quick_mode_and_say_so_before_any_part_runs(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        main(["bench", "scarce-cifar-100", "--out", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit, match="time-to-accuracy"):
        main(["bench", "policies", "time-to-accuracy", "--out", str(tmp_path), "--no-progress"])
    assert not (tmp_path / "policies.csv").exists()  # refused before the first part ran
    with pytest.raises(SystemExit, match="no such file"):
        main(["bench", "noisy-cifar", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])


def test_results_resume_and_reject_mismatched_files(tmp_path):
    results = Results(tmp_path, "part", ["policy", "seed", "acc"], key=["policy", "seed"])
    results.add({"policy": "edba", "seed": 0, "acc": 0.123456789})
    again = Results(tmp_path, "part", ["policy", "seed", "acc"], key=["policy", "seed"])
    assert again.has(policy="edba", seed=0) and not again.has(policy="edba", seed=1)
    assert again.select(policy="edba") == [{"policy": "edba", "seed": "0", "acc": "0.123457"}]
    results.add({"policy": "gns", "seed": 1, "acc": 1.0})  # a float key is found as written
    assert Results(tmp_path, "part", ["policy", "seed", "acc"], key=["acc"]).has(acc=1.0)
    with pytest.raises(ValueError, match="fields"):
        again.add({"policy": "gns", "seed": 0})
    with pytest.raises(ValueError, match="columns"):
        Results(tmp_path, "part", ["policy", "acc"], key=["policy"])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=6))
def test_mean_std_matches_the_statistics_module(values):
    mean, std = (float(part) for part in mean_std(values, 100).split(" ± "))
    spread = statistics.stdev(values) * 100 if len(values) > 1 else 0.0
    assert mean == pytest.approx(statistics.fmean(values) * 100, abs=0.006)
    assert std == pytest.approx(spread, abs=0.006)


@given(st.integers(2, 10), st.integers(1, 30), st.integers(0, 2**31 - 1), st.integers(1, 10_000))
def test_stratified_subset_balances_classes(classes, per_class, seed, wanted):
    labels = torch.arange(classes * per_class) % classes
    count = min(wanted, labels.numel())
    chosen = stratified_subset(labels, count, seed)
    assert chosen.numel() == count == chosen.unique().numel()
    assert torch.equal(chosen, chosen.sort().values)
    counts = torch.bincount(labels[chosen], minlength=classes)
    assert int(counts.max() - counts.min()) <= 1
    assert torch.equal(chosen, stratified_subset(labels, count, seed))


@pytest.mark.parametrize("packed", [False, True])
def test_load_cifar10_reads_folder_or_archive_and_caches(tmp_path, packed):
    image = pytest.importorskip("PIL.Image")
    folder, location = tiny_cifar(tmp_path, packed)
    data = load_cifar10(location, tmp_path / "cache")
    assert data.train_x.shape == (40, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8
    # Labels follow the sorted class folders; pixels are what Pillow decodes.
    assert data.train_y.tolist() == [label for label in range(10) for _ in range(4)]
    with image.open(folder / "train" / "class3" / "0001.jpg") as picture:
        expected = torch.from_numpy(numpy.asarray(picture.convert("RGB")).copy())
    assert torch.equal(data.train_x[13].permute(1, 2, 0), expected)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    cached = load_cifar10(location, tmp_path / "cache")
    assert torch.equal(cached.test_x, data.test_x)


def test_load_cifar10_names_a_wrong_layout(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        load_cifar10(tmp_path / "missing", tmp_path / "cache")
    with pytest.raises(ValueError, match="ImageFolder layout"):
        load_cifar10(tmp_path / "flat", tmp_path / "cache")


def toy_data(samples: int = 300):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 8, generator=gen)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return TensorDataset(x, y)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("name", ["fixed-20", "edba", "gns", "dba"])
def test_train_respects_the_budget_and_records_the_curve(name):
    data = toy_data()
    allowed = torch.arange(0, 300, 3)
    spec = RunSpec(name, seed=1, candidate_budget=450, eval_every=150)
    result = train(spec, make_model, data, allowed, evaluate=lambda model: 0.5)
    assert 450 <= result.candidates < 450 + 1000  # stops within one candidate batch
    assert result.trained <= result.candidates
    assert sum(result.candidate_sizes) == result.candidates
    assert [c[1] for c in result.curve][:3] == sorted(c[1] for c in result.curve)[:3]
    assert result.curve[-1][1] == result.candidates and result.indices_inside
    assert result.first_reaching(0.5) == result.curve[0][:3]
    assert result.first_reaching(0.6) is None


def test_train_stops_at_the_target_accuracy():
    accuracies = iter([0.1, 0.4, 0.9, 0.95])
    spec = RunSpec("fixed-10", epochs=50, eval_every=30, target_accuracy=0.8)
    result = train(
        spec, make_model, toy_data(), torch.arange(100), evaluate=lambda m: next(accuracies)
    )
    assert [c[3] for c in result.curve] == [0.1, 0.4, 0.9]
    assert result.candidates == 90 and result.test_accuracy == 0.9


def test_train_refuses_a_run_without_limits_or_with_an_unknown_name():
    with pytest.raises(ValueError, match="limit"):
        train(RunSpec("fixed"), make_model, toy_data(), torch.arange(10))
    with pytest.raises(ValueError, match="unknown run"):
        train(RunSpec("fixed-0", epochs=1), make_model, toy_data(), torch.arange(10))


def test_train_detects_a_sampler_that_leaves_the_subset(monkeypatch):
    class LeakySampler(runner.AdaptiveBatchSampler):
        def __init__(self, data, *, indices, **kwargs):
            super().__init__(data, **kwargs)  # forgets the allowed indices

    monkeypatch.setattr(runner, "AdaptiveBatchSampler", LeakySampler)
    with pytest.raises(RuntimeError, match="outside the allowed subset"):
        train(RunSpec("edba", epochs=1), make_model, toy_data(), torch.arange(50))


def test_edba_selection_recipe_keeps_the_candidate_size_and_selects():
    spec = RunSpec("edba-selection", seed=0, candidate_budget=1000)
    result = train(spec, make_model, toy_data(), torch.arange(0, 300, 3))
    assert set(result.candidate_sizes) == {100}  # the size never moves from the sampler's start
    assert min(result.batch_sizes) < 100 and result.trained < result.candidates


def test_measuring_memory_on_the_cpu_prints_no_profiler_noise(capfd):
    from adaptive_batch.app.bench.common import peak_memory_bytes

    assert peak_memory_bytes(lambda: torch.ones(1000), torch.device("cpu")) == 4000
    _, err = capfd.readouterr()
    assert "ERROR" not in err and "profiler_" not in err

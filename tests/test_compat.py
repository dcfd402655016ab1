"""Code written against adaptive_batch 0.1 keeps working: old argument names (with a
DeprecationWarning), old attribute names, old checkpoints; torchdata stays optional. (The 0.1
module paths are gone since 0.3: see docs/changelog.md.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from adaptive_batch import AdaptiveBatchSampler, Progress, SubsetFilter
from adaptive_batch.optional import require
from adaptive_batch.policies import (
    CABS,
    Arbiter,
    DBASizing,
    GradientNoiseScale,
    SelectiveBackprop,
)
from adaptive_batch.policies.dba import greedy_margin_subset
from adaptive_batch.probe import PerSampleGradients, functorch_gram

from .scripted import keep_all


@pytest.mark.parametrize(
    ("make", "attribute", "value"),
    [
        (lambda: CABS(lr=0.1, decay=0.5), "ema_decay", 0.5),
        (lambda: GradientNoiseScale(decay=0.5), "ema_decay", 0.5),
        (lambda: DBASizing(decay=0.5), "ema_decay", 0.5),
        (lambda: Arbiter(lr=0.1, decay=0.5), "ema_decay", 0.5),
        (lambda: Arbiter(lr=0.1, min_size=4, max_size=64), "max_batch_size", 64),
        (lambda: SelectiveBackprop(total_samples=50), "total_candidates", 50),
        (lambda: Progress(updates=1, samples=7, epoch_size=10), "candidates", 7),
        (lambda: PerSampleGradients(nn.Linear(2, 2), None, max_numel=99), "max_grad_numel", 99),
    ],
)
def test_renamed_arguments_keep_working_with_a_deprecation_warning(make, attribute, value):
    with pytest.warns(DeprecationWarning, match="is now called"):
        made = make()
    assert getattr(made, attribute) == value


def test_renamed_functions_arguments_keep_working():
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="min_kept"):
        greedy_margin_subset(gram, 0.5, 0.3, min_size=2)
    head = nn.Linear(2, 2)
    with pytest.warns(DeprecationWarning, match="max_grad_numel"):
        functorch_gram(
            head, torch.randn(3, 2), torch.tensor([0, 1, 0]),
            lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none"),
            max_numel=100,
        )  # fmt: skip
    with pytest.raises(TypeError, match="both"):
        CABS(lr=0.1, decay=0.5, ema_decay=0.5)


def test_old_attribute_names_keep_working():
    assert Progress(1, 7, 10).samples == 7
    sampler = AdaptiveBatchSampler(30, batch_size=10)
    with pytest.warns(DeprecationWarning, match="dataset_size"):
        assert sampler.num_samples == 30
    filt = SubsetFilter([(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))], nn.Linear(2, 2))
    list(filt)
    assert filt.num_kept == filt.num_trained == 4


def test_a_checkpoint_of_version_0_1_loads():
    sampler = AdaptiveBatchSampler(40, batch_size=10, seed=3)
    it = iter(sampler)
    batch = next(it)
    sampler.feedback(keep_all(batch))
    state = sampler.state_dict()
    old = {  # how 0.1 wrote the same state
        "version": 2,
        "config": {**state["config"], "num_samples": 40},
        "epoch": 0,
        "position": 10,
        "batch_size": 10,
        "requested_batch_size": 10.0,
        "decisions": 1,
        "sizing": None,
        "ledger": {
            "times_kept": sampler.times_kept.clone(),
            "times_dropped": sampler.times_dropped.clone(),
            "num_feedback": 1,
            "num_samples": 10,
            "lags": {0: 1},
        },
        "num_dropped_tails": 0,
    }
    del old["config"]["dataset_size"]
    restored = AdaptiveBatchSampler(40, batch_size=10, seed=3)
    restored.load_state_dict(old)
    assert list(restored) == list(it)
    assert restored.num_feedback == 1 and int(restored.times_kept.sum()) == 10


def test_the_library_imports_without_torchdata():
    code = (
        "import sys; sys.modules['torchdata'] = None; import adaptive_batch; "
        "import adaptive_batch.policies, adaptive_batch.select; "
        "assert 'torchdata.nodes' not in sys.modules\n"
        "try:\n    import adaptive_batch.nodes\nexcept ImportError as e:\n    print(e)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'adaptive-batch[torchdata]'" in done.stdout


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'adaptive-batch\[demo\]'"):
        require("no_such_package.sub", "demo", "the demo")

"""Shared test settings: a derandomised hypothesis profile and seeded RNGs."""

import gc
import os
import random

import pytest
import torch
from hypothesis import settings

# CI never flakes: examples are derived from the test itself, and slow CPUs never time out.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)


def pytest_sessionfinish(session, exitstatus):
    # torchdata Loaders left mid-epoch keep worker threads alive until garbage collection (their
    # iterator holds a reference cycle); stop them before the interpreter shuts down.
    gc.collect()

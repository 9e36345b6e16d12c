"""Suite-wide settings: services stay on loopback, no telemetry, single-threaded torch for stable timings."""

import os

import torch

from flows.env import apply_safe_defaults

apply_safe_defaults()
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # small tensors: threads only add sync cost on a 2-core machine


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def readme():
    """The README runner (tests/fixtures_readme.py), one per session for every module that uses it (a fixture imported
    into two modules would be two sessions' worth: two copies of the repository, each running the README)."""
    from fixtures_readme import make_workspace
    from readme_hooks import CHECKS, SETUPS

    yield from make_workspace(SETUPS, CHECKS)

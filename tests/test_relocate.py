"""Relocatable run folders (issue 14): a run folder of `amed distill` (SQLite registry + mlartifacts + store, the
quickstart's layout) copied elsewhere, the original deleted: fetch and sample from the copy still work."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_copied_run_folder_fetches_and_samples(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AMED_STORE", "PREFECT_API"))}
    original = tmp_path / "original" / "run"
    r = subprocess.run([sys.executable, "-m", "flows.cli", "distill", str(ROOT / "configs" / "deploy-smoke.yaml"),
                        "--out", str(original)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    name = re.search(r"models:/(amed-digits[-\w]*-nfe3)@champion", r.stdout).group(1)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(original, moved, symlinks=True)
    shutil.rmtree(tmp_path / "original")

    uri = f"sqlite:///{moved / 'mlflow.db'}"
    out = tmp_path / "fetched"
    r = subprocess.run([sys.executable, "-m", "flows.cli", "fetch", f"models:/{name}@champion", "--out", str(out),
                        "--tracking-uri", uri], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"model    {name} version " in r.stdout

    from amed_core.adapters import load_teacher
    from amed_core.amed import load_sampler as load_local
    from flows.registry import load_sampler

    teacher = load_teacher("digits-gmm")
    noise = torch.randn(8, *teacher.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = load_local(out)(teacher, noise).x
    b = load_sampler(f"models:/{name}@champion", tracking_uri=uri)(teacher, noise).x
    assert torch.isfinite(a).all() and torch.equal(a, b)
    # a version by number and the sweep's results (in the copied store) are readable too
    assert load_sampler(f"models:/{name}/1", tracking_uri=uri) is not None
    assert (moved / "store" / "runs" / "deploy-smoke" / "results.json").is_file()

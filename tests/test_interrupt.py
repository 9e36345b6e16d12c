"""Stopping `amed distill` (issue 19, item 7): Ctrl-C (SIGINT to the terminal's process group) and SIGTERM (to the
command) stop a real run within seconds, say what was kept, and leave none of the processes it started (its local
Ray, Prefect's temporary server) behind; a rerun resumes from what was kept."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_prefect import process_tree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]

# long enough training that the signal lands mid-run (the teacher takes a few seconds, each training ~30 s or more)
SWEEP = {
    "name": "interrupted",
    "datasets": [{"name": "digits", "teacher": "digits-gmm", "model_id": "digits"}],
    "solvers": ["amed", "amed+ipndm"], "nfes": [3], "seeds": [0],
    "teacher": {"M": 2, "num_trajectories": 512, "shard_size": 256},
    "train": {"batch_size": 64, "epochs": 400},
    "evaluation": {"num_samples": 512, "batch_size": 512, "grid_samples": 0},
    "compute": {"num_cpus": 2, "object_store_memory": 200_000_000, "max_parallel": 2, "teacher_actors": 1,
                "torch_threads": 1},
}


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING_", "AMED_STORE", "PREFECT_API", "PREFECT_HOME", "RAY_ADDRESS"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", AMED_PROGRESS="lines")
    return env


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_stops_amed_distill_within_seconds(tmp_path, sig):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(SWEEP))
    out = tmp_path / "run"
    log = tmp_path / "out.log"
    with open(log, "wb") as f:  # its own session: the process group a terminal's Ctrl-C reaches
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "distill", str(sweep), "--out", str(out)],
                                cwd=tmp_path, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # training under way: Ray and the Prefect API run
            if re.search(r"train digits-amed\S*: \d+ trajectories", log.read_text(errors="replace")):
                break
            time.sleep(0.5)
        text = log.read_text(errors="replace")
        assert proc.poll() is None, f"amed distill ended before the signal:\n{text[-4000:]}"
        assert "train digits-amed" in text, f"no training started within 300 s:\n{text[-4000:]}"
        time.sleep(2)
        started = [p for p in process_tree(proc.pid) if p != proc.pid]
        assert len(started) >= 3, started  # Ray's processes and the temporary Prefect server
        t0 = time.time()
        if sig == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)   # what Ctrl-C in the terminal does
        else:
            os.kill(proc.pid, signal.SIGTERM)    # what a process manager does
        rc = proc.wait(timeout=60)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log.read_text(errors="replace")
    signum = getattr(signal, sig)
    assert rc == 128 + signum, f"rc {rc}\n{text[-4000:]}"
    assert took < 20, f"{sig} took {took:.1f} s to stop amed distill\n{text[-3000:]}"
    # it said what it did and what was kept (the committed teacher shards are in the store)
    assert f"amed distill: {sig} received: stopping" in text, text[-3000:]
    m = re.search(r"amed distill: stopped in [\d.]+ s \((\d+) processes ended.*\)\. Kept: (\d+) teacher shards, "
                  r"(\d+) checkpoints and (\d+) scores committed in the store (\S+); rerun the same command", text)
    assert m, text[-3000:]
    shards = len(list((out / "store" / "teachers").glob("*/manifest.d/*.json")))
    assert int(m.group(2)) == shards >= 1 and m.group(5) == str(out / "store")
    assert "Traceback" not in text.split(f"{sig} received")[1], text[-3000:]
    # nothing it started is left
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(p) for p in started):
        time.sleep(0.2)
    assert not [p for p in started if _running(p)], [p for p in started if _running(p)]

"""The end of a sweep's process: the local Ray stops without waiting on its autoscaler monitor, and the interpreter
exits without collecting every object (flows.env.freeze_gc_at_exit). Both run in fresh interpreters: the suite's own
Ray (fixtures_prefect.ray_local) must not be the one stopped."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MONITOR = r"""
import json, os, sys, time
from flows.config import ComputeConfig
from flows.cluster.session import _kill_local_monitor, ray_session
from ray._private import ray_constants
from ray._private import worker as ray_worker

with ray_session(ComputeConfig(num_cpus=1)) as info:
    assert info.started_here
    [monitor] = ray_worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]
    pid = monitor.process.pid
    _kill_local_monitor()
    killed = monitor.process.poll() is not None
    t = time.perf_counter()
gone = not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
print(json.dumps({"killed": killed, "shutdown_s": time.perf_counter() - t, "pid_gone": gone}))
"""


def test_local_ray_stops_without_the_monitors_one_second_wait():
    """ray.shutdown SIGTERMs the monitor and waits 1 s for it (it never exits in time); ray_session SIGKILLs it first.
    If Ray's private process table moves, _kill_local_monitor silently does nothing: this test then fails, so the lost
    second is noticed."""
    r = subprocess.run([sys.executable, "-c", _MONITOR], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["killed"] and out["pid_gone"], out
    assert out["shutdown_s"] < 30, out  # a hang would show here; the time itself is in BENCHMARKS.md, not asserted


_FREEZE = r"""
import atexit, gc, sys
from flows.env import freeze_gc_at_exit
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))  # runs after the freeze (LIFO)
before = atexit._ncallbacks()
freeze_gc_at_exit(); freeze_gc_at_exit()
print("registered:", atexit._ncallbacks() - before, "frozen now:", gc.get_freeze_count() > 0, flush=True)
"""


def test_freeze_gc_at_exit_registers_once_and_runs_at_exit_only():
    r = subprocess.run([sys.executable, "-c", _FREEZE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["registered: 1 frozen now: False", "frozen at exit: True"], r.stdout


def test_the_flow_and_the_cli_freeze_at_exit():
    """Both process entry points call it (source), so a deployment's flow process and `amed` exit fast."""
    assert "freeze_gc_at_exit()" in (ROOT / "flows/distill.py").read_text()
    assert "freeze_gc_at_exit()" in (ROOT / "flows/cli.py").read_text()

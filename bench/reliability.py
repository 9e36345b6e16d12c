"""Reliability bench (issue 15): faults and bad inputs against real processes and servers on 127.0.0.1.

    .venv/bin/python bench/reliability.py                 # every probe; one table row each (BENCHMARKS.md "Reliability")
    .venv/bin/python bench/reliability.py --fast          # the probes CI also runs (tests/test_faults.py)
    .venv/bin/python bench/reliability.py --only kill-train,full-disk --json out.json

Each probe runs the real ``amed`` command (a new process, its own process group) against a local store, SQLite MLflow,
an ephemeral Prefect and a local Ray (each probe its own RAY_TMPDIR, so it never joins another Ray on the machine), a
moto S3 server behind a TCP proxy the probe can kill, or a small tmpfs. Row: probe, expected, observed, verdict
(``survived`` = the fault happened and the system came through with nothing lost; ``refused`` = a bad input or an
unusable service was refused with one line, a non-zero exit and nothing written; ``FAIL`` otherwise; ``skipped`` =
the machine does not allow it, e.g. no permission to mount a tmpfs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CANARY = "AMEDCANARY0SECRET0do0not0leak0000000000"

TINY = {
    "name": "tiny",
    "datasets": [{"name": "digits", "teacher": "digits-gmm"}],
    "solvers": ["amed"], "nfes": [3], "seeds": [0],
    "teacher": {"solver": "heun", "M": 1, "num_trajectories": 256, "shard_size": 64},
    "train": {"batch_size": 64, "epochs": 1},
    "evaluation": {"metric": "fd_exact", "num_samples": 256, "batch_size": 256, "grid_samples": 16},
    "compute": {"num_cpus": 2, "object_store_memory": 200_000_000, "max_parallel": 2, "teacher_actors": 1,
                "torch_threads": 1},
}
# Long enough stages to be killed in the middle of each (about a minute on 2 cores).
SLOW = {**TINY, "teacher": {"solver": "heun", "M": 4, "num_trajectories": 4096, "shard_size": 256},
        "train": {"batch_size": 64, "epochs": 4}, "evaluation": {**TINY["evaluation"], "num_samples": 2048}}


@dataclass
class Row:
    probe: str
    expected: str
    observed: str
    verdict: str
    seconds: float = 0.0


class Skip(Exception):
    """The machine does not allow this probe (reported as skipped, not failed)."""


PROBES: list[tuple[str, str, Callable, bool]] = []  # (name, expected, fn(workdir) -> (observed, verdict), fast)


def probe(name: str, expected: str, fast: bool = False):
    def deco(fn):
        PROBES.append((name, expected, fn, fast))
        return fn
    return deco


# ---------------------------------------------------------------------------------------------------------------
# Processes.

_RAY_DIRS: list[Path] = []  # removed after each probe


def _env(work: Path, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_", "AMED_"))}
    ray_tmp = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    _RAY_DIRS.append(ray_tmp)
    env.update({"PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def amed(args: list[str], work: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``amed ARGS`` as a new process (its own session), output captured; its Ray leftovers are stopped after."""
    env = env or _env(work)
    try:
        return subprocess.run([PY, "-m", "flows.cli", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    finally:
        _stop_ray(env)


def _stop_ray(env: dict) -> None:
    """Kill the processes of the Ray this probe started (found by its private RAY_TMPDIR), by pid."""
    tmp = env.get("RAY_TMPDIR")
    if not tmp:
        return
    for pid in _pids_with(tmp):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _pids_with(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def start_amed(args: list[str], work: Path, log: Path, env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    env = env or _env(work)
    f = open(log, "w")
    p = subprocess.Popen([PY, "-m", "flows.cli", *args], cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    f.close()
    return p, env


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 600) -> bool:
    rx = re.compile(pattern)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists() and rx.search(log.read_text(errors="replace")):
            return True
        if proc.poll() is not None:
            return bool(log.exists() and rx.search(log.read_text(errors="replace")))
        time.sleep(0.05)
    return False


def kill_group(proc: subprocess.Popen, env: dict) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _stop_ray(env)


def one_line(proc: subprocess.CompletedProcess) -> tuple[bool, str]:
    """A refusal: non-zero exit, no traceback, a short error. Returns (ok, the error's last line)."""
    err = proc.stderr.strip()
    last = err.splitlines()[-1] if err else ""
    ok = proc.returncode != 0 and "Traceback" not in err and 0 < len(err) < 2000
    return ok, f"rc {proc.returncode}: {last[:160]}"


def write_cfg(work: Path, cfg: dict, name: str = "sweep.yaml") -> Path:
    import yaml

    path = work / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# What a finished sweep left behind.

def registry_state(db: Path) -> dict:
    """Versions per model, duplicates (same checkpoint sha256 + protocol twice), champion right, runs still RUNNING,
    sweep (parent) runs and runs left KILLED (a rerun carries on in the killed attempt's runs)."""
    con = sqlite3.connect(db)
    try:
        tags: dict[tuple[str, int], dict] = {}
        for name, version, key, value in con.execute("select name, version, key, value from model_version_tags"):
            tags.setdefault((name, int(version)), {})[key] = value
        seen, dups = set(), 0
        for (name, _), t in tags.items():
            k = (name, t.get("checkpoint_sha256"), t.get("protocol_hash"))
            dups += k in seen
            seen.add(k)
        champion_ok = True
        for name, alias, version in con.execute("select name, alias, version from registered_model_aliases"):
            if alias != "champion":
                continue
            proto = tags[(name, int(version))].get("protocol_hash")
            values = [float(t["value"]) for (n, _), t in tags.items() if n == name and t.get("protocol_hash") == proto]
            champion_ok &= float(tags[(name, int(version))]["value"]) == min(values)
        running = con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
        killed = con.execute("select count(*) from runs where status = 'KILLED'").fetchone()[0]
        parents = con.execute("select count(*) from tags where key = 'amed.sweep'").fetchone()[0]
        return {"versions": len(tags), "duplicates": dups, "champion_ok": champion_ok, "running": running,
                "killed": killed, "parents": parents}
    finally:
        con.close()


def store_verifies(work: Path, store: Path) -> bool:
    proc = amed(["teacher", "verify", "--store", str(store)], work)
    return proc.returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# Faults: SIGKILL during each stage, then the same command again.

STAGE_MARKERS = {
    "teacher": r"teacher \S+: shard \d+ committed",
    "train": r"train \S+: \d+ trajectories x",
    "evaluate": r"train \S+: done in",          # the candidate's evaluation starts right after its training
    "register": r"flows.registry: candidate .* -> \S+ v\d+",  # one version registered, the others not yet
}


# teacher and train are held at a barrier until the kill (flows.storage.barriers: the kill lands there every time, issue
# 20); evaluate and register are killed when their log marker appears (their stages last seconds in SLOW).
STAGE_BARRIERS = {"teacher": ("teacher-shard", {}, 1), "train": ("train-step", {"attempt": 1}, 0)}


def _kill_and_rerun(work: Path, stage: str) -> tuple[str, str]:
    from flows.storage.barriers import Hold

    cfg = write_cfg(work, SLOW)
    out, log = work / "out", work / "killed.log"
    if stage in STAGE_BARRIERS:
        point, match, skip = STAGE_BARRIERS[stage]
        with Hold(str(out / "store"), point, match=match, skip=skip) as hold:
            proc, env = start_amed(["distill", str(cfg), "--out", str(out)], work, log)
            try:
                hold.wait_reached(timeout=600, alive=lambda: proc.poll() is None)
                hit = True
            except (RuntimeError, TimeoutError):
                hit = False
            kill_group(proc, env)
    else:
        proc, env = start_amed(["distill", str(cfg), "--out", str(out)], work, log)
        hit = wait_for(log, STAGE_MARKERS[stage], proc)
        kill_group(proc, env)
    if not hit:
        return f"{stage} never reached (rc {proc.returncode})", "FAIL"
    rerun = amed(["distill", str(cfg), "--out", str(out), "--summary-json", str(work / "s.json")], work)
    if rerun.returncode != 0:
        errors = [ln for ln in (rerun.stdout + rerun.stderr).splitlines() if re.search(r"Error|error:", ln)]
        keep = Path(tempfile.gettempdir(), f"amed-rel-{stage}-rerun.log")
        keep.write_text(rerun.stdout + rerun.stderr)
        return f"rerun rc {rerun.returncode}: {(errors or ['?'])[-1][:200]} (log: {keep})", "FAIL"
    work_done = json.loads((work / "s.json").read_text())["work"]
    reg = registry_state(out / "mlflow.db")
    verified = store_verifies(work, out / "store")
    skipped = {"teacher": work_done["teacher_shards_written"] < SLOW["teacher"]["num_trajectories"]
               // SLOW["teacher"]["shard_size"], "train": work_done["teacher_shards_written"] == 0,
               "evaluate": work_done["teacher_shards_written"] == 0 and work_done["trained"] == 0,
               "register": work_done["teacher_shards_written"] == 0 and work_done["trained"] == 0}[stage]
    ok = (verified and skipped and reg["duplicates"] == 0 and reg["champion_ok"] and reg["running"] == 0
          and reg["parents"] == 1 and reg["killed"] == 0)
    return (f"rerun rc 0, work {work_done}, {reg['versions']} versions, {reg['duplicates']} duplicates, champion "
            f"{'right' if reg['champion_ok'] else 'WRONG'}, {reg['parents']} sweep run(s), {reg['running']} runs "
            f"RUNNING, {reg['killed']} KILLED, store "
            f"{'verifies' if verified else 'FAILS verify'}"), "survived" if ok else "FAIL"


for _stage in STAGE_MARKERS:
    probe(f"kill-{_stage}", f"SIGKILL of amed distill's process group during {_stage}; rerun completes, skips committed "
          "work, no duplicate version, champion right, one sweep run (the killed attempt's, resumed), no run left RUNNING "
          "or KILLED")(
        (lambda s: lambda work: _kill_and_rerun(work, s))(_stage))


# -- Kills the probe chooses itself (issue 20) ------------------------------------------------------------------

def champions(db: Path) -> dict[str, str]:
    """{registered model: the champion's value tag} of a local registry."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select a.name, t.value from registered_model_aliases a join model_version_tags t on "
                           "t.name = a.name and t.version = a.version and t.key = 'value' where a.alias = 'champion'")
        return dict(sorted(rows.fetchall()))
    finally:
        con.close()


def _rerun_checked(work: Path, cfg: Path, out: Path, want: dict | None) -> tuple[bool, str]:
    """Rerun into ``out``; (ok, observation): rc 0, no duplicate version, champion right and (``want``) the same as an
    undisturbed run's, one sweep run, none RUNNING or KILLED, store verifies."""
    rerun = amed(["distill", str(cfg), "--out", str(out)], work)
    if rerun.returncode != 0:
        errors = [ln for ln in (rerun.stdout + rerun.stderr).splitlines() if re.search(r"Error|error:", ln)]
        return False, f"rerun rc {rerun.returncode}: {(errors or ['?'])[-1][:160]}"
    reg = registry_state(out / "mlflow.db")
    champ = champions(out / "mlflow.db")
    verified = store_verifies(work, out / "store")
    ok = (reg["duplicates"] == 0 and reg["champion_ok"] and reg["running"] == 0 and reg["parents"] == 1
          and reg["killed"] == 0 and verified and (want is None or champ == want))
    return ok, (f"{reg['versions']} versions, {reg['duplicates']} dup, champion "
                f"{'same' if want is not None and champ == want else champ if want is not None else 'right'}, "
                f"{reg['parents']} sweep run(s), {reg['running']} RUNNING, {reg['killed']} KILLED, store "
                f"{'verifies' if verified else 'FAILS'}")


KILL_IN_MLFLOW_CREATE = """
import os
if os.environ.get("AMED_PROBE_KILL_IN_MLFLOW_CREATE") == "1":
    import signal
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    @event.listens_for(Engine, "after_cursor_execute")
    def _kill(conn, cursor, statement, *args):
        if "mlflow.db" in str(conn.engine.url) and "_alembic_tmp_" in statement \\
                and statement.lstrip().upper().startswith("INSERT"):
            os.kill(os.getpid(), signal.SIGKILL)  # inside the creation of the MLflow database, on purpose
"""


@probe("kill-mlflow-create", "amed distill SIGKILLed on purpose inside the creation of its MLflow database (a hook "
       "kills it right after a migration copies a table into _alembic_tmp_...): the rerun completes, no duplicate "
       "version, champion right, store verifies")
def kill_mlflow_create(work: Path):
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_IN_MLFLOW_CREATE)
    cfg, out = write_cfg(work, TINY), work / "out"
    env = _env(work, {"PYTHONPATH": f"{hook}{os.pathsep}{REPO}", "AMED_PROBE_KILL_IN_MLFLOW_CREATE": "1"})
    first, env = start_amed(["distill", str(cfg), "--out", str(out)], work, work / "killed.log", env=env)
    rc = first.wait(timeout=600)
    kill_group(first, env)  # what it started (Prefect's server, Ray) goes with it, as after a real kill
    if rc != -signal.SIGKILL:
        return f"the kill hook never fired (rc {rc})", "FAIL"
    left = sorted(p.name for p in out.iterdir() if "mlflow.db" in p.name)
    ok, seen = _rerun_checked(work, cfg, out, None)
    return f"killed inside the creation (left: {left or 'nothing'}); rerun: {seen}", "survived" if ok else "FAIL"


KILL_POINTS = 8


@probe("kill-anywhere", f"amed distill SIGKILLed (its process group) at N (--kill-points, default {KILL_POINTS}) evenly "
       "spread moments of an "
       "undisturbed run's wall time (start-up, teacher, train, evaluate, register and between), each into a fresh "
       "--out: every rerun completes with the undisturbed run's champions, no duplicate version, one sweep run, store "
       "verifies")
def kill_anywhere(work: Path):
    cfg = write_cfg(work, TINY)
    t0 = time.time()
    ref = amed(["distill", str(cfg), "--out", str(work / "ref")], work)
    wall = time.time() - t0
    if ref.returncode != 0:
        return f"undisturbed run rc {ref.returncode}", "FAIL"
    want = champions(work / "ref" / "mlflow.db")
    shutil.rmtree(work / "ref", ignore_errors=True)
    results = []
    for k in range(1, KILL_POINTS + 1):
        at = wall * k / (KILL_POINTS + 1)
        out = work / f"k{k}"
        proc, env = start_amed(["distill", str(cfg), "--out", str(out)], work, work / f"k{k}.log")
        t1 = time.time()
        while time.time() - t1 < at and proc.poll() is None:
            time.sleep(0.02)
        finished = proc.poll() is not None
        kill_group(proc, env)
        ok, seen = _rerun_checked(work, cfg, out, want)
        results.append((k, round(at, 1), finished, ok, seen))
        shutil.rmtree(out, ignore_errors=True)
    bad = [f"{at} s: {seen}" for _, at, _, ok, seen in results if not ok]
    early = sum(r[2] for r in results)
    return (f"undisturbed {wall:.0f} s; killed at {[r[1] for r in results]} s: {sum(r[3] for r in results)}/"
            f"{len(results)} reruns right ({early} had finished before their kill)" + (f"; {bad[:3]}" if bad else "")), \
        "survived" if not bad else "FAIL"


@probe("two-generates", "two amed teacher generate on one store at once: both exit 0, every shard generated once (by "
       "one of them, the other adopts it), every shard committed once, verify OK",
       fast=True)
def two_generates(work: Path):
    store = work / "store"
    args = ["teacher", "generate", "--teacher", "digits-gmm", "--grid-for", "amed:3,5", "--n", "512",
            "--shard-size", "32", "--sub-steps", "2", "--no-progress", "--store", str(store)]
    procs = [start_amed(args, work, work / f"gen{i}.log") for i in range(2)]
    rcs = [p.wait(timeout=600) for p, _ in procs]
    for p, env in procs:
        _stop_ray(env)
    (h,) = os.listdir(store / "teachers")
    records = sorted(os.listdir(store / "teachers" / h / "manifest.d"))
    written = []
    for i in range(2):
        m = re.search(r"\((\d+) written now", (work / f"gen{i}.log").read_text())
        written.append(int(m.group(1)) if m else -1)
    claims_left = os.listdir(store / "teachers" / h / "claims") if (store / "teachers" / h / "claims").exists() else []
    verified = store_verifies(work, store)
    ok = rcs == [0, 0] and len(records) == 16 and verified and sum(written) == 16 and not claims_left
    return (f"rc {rcs}, {len(records)}/16 commit records, shards generated {written[0]} + {written[1]} (each once: "
            f"{'yes' if sum(written) == 16 else 'NO'}), {len(claims_left)} claims left, verify "
            f"{'OK' if verified else 'FAILED'}"), "survived" if ok else "FAIL"


@probe("two-distills", "two amed distill with the same config and --out at once: one refused in one line naming "
       "the other's pid, the other completes; store verifies")
def two_distills(work: Path):
    cfg = write_cfg(work, TINY)
    out = work / "out"
    first, env1 = start_amed(["distill", str(cfg), "--out", str(out)], work, work / "a.log")
    wait_for(work / "a.log", r"writing under", first, timeout=120)
    second = amed(["distill", str(cfg), "--out", str(out)], work)
    rc1 = first.wait(timeout=600)
    _stop_ray(env1)
    refused, line = one_line(second)
    ok = refused and "in use by another amed distill" in second.stderr and rc1 == 0 and store_verifies(work, out / "store")
    return f"first rc {rc1}; second {line}", "survived" if ok else "FAIL"


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise Skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@probe("full-disk", "a 2 MB tmpfs under the store fills mid-generate: one line, exit non-zero, no partial shard "
       "counted (verify OK); after the tmpfs grows, generate resumes and completes", fast=True)
def full_disk(work: Path):
    with tmpfs(work / "disk", "2m") as disk:
        store = disk / "store"
        args = ["teacher", "generate", "--teacher", "digits-gmm", "--grid-for", "amed:3", "--n", "2560",
                "--shard-size", "256", "--no-progress", "--store", str(store)]
        first = amed(args, work)
        refused, line = one_line(first)
        (h,) = os.listdir(store / "teachers")
        counted = len([n for n in os.listdir(store / "teachers" / h / "manifest.d") if n.endswith(".json")])
        verified_partial = amed(["teacher", "verify", "--store", str(store)], work)
        partial_ok = "FAILED" in verified_partial.stdout and "shards verified" in verified_partial.stdout and \
            not re.search(r"shard \d+:", verified_partial.stdout)  # only missing shards, none bad
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        second = amed(args, work)
        ok = refused and "No space left" in first.stderr and partial_ok and second.returncode == 0 and \
            store_verifies(work, store)
        return (f"first {line[:120]}; {counted} shards counted, none bad; after remount rc {second.returncode}, "
                f"verify {'OK' if ok else 'FAILED'}"), "survived" if ok else "FAIL"


# -- S3 (moto) behind a TCP proxy the probe kills and restarts (moto keeps its data; clients see the server go away).

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROXY = r'''
import socket, sys, threading
lport, tport = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind(("127.0.0.1", lport)); srv.listen(64)
def pipe(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except OSError: pass
    finally:
        for s in (a, b):
            try: s.close()
            except OSError: pass
while True:
    c, _ = srv.accept()
    u = socket.create_connection(("127.0.0.1", tport))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
'''


def _wait_port(port: int, timeout: float = 30) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def moto_server():
    port = _free_port()
    proc = subprocess.Popen([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_port(port)
        yield port
    finally:
        proc.kill()
        proc.wait()


def _proxy(lport: int, tport: int) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", PROXY, str(lport), str(tport)], start_new_session=True)
    _wait_port(lport)
    return p


def _s3_env(work: Path, port: int, extra: dict | None = None) -> dict:
    return _env(work, {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                       "AWS_CONFIG_FILE": os.devnull, **(extra or {})})


@probe("s3-killed", "the S3 server goes away mid-generate (its proxy killed), then comes back: one line, exit "
       "non-zero, then the same command resumes and verify passes", fast=True)
def s3_killed(work: Path):
    with moto_server() as mport:
        lport = _free_port()
        proxy = _proxy(lport, mport)
        env = _s3_env(work, lport)
        subprocess.run([PY, "-c", "import s3fs; s3fs.S3FileSystem().mkdir('teach')"], env=env, check=True)
        store = "s3://teach/x"
        args = ["teacher", "generate", "--teacher", "digits-gmm", "--grid-for", "amed:3,5", "--n", "1024",
                "--shard-size", "64", "--sub-steps", "2", "--no-progress", "--store", store]
        log = work / "gen.log"
        from flows.storage.barriers import Hold

        direct = {"key": "testing", "secret": "testing",  # moto itself, not through the proxy the probe kills
                  "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{mport}", "region_name": "us-east-1"}}
        # two shards committed, then generate waits before the third (a barrier, issue 20) until the server is gone
        with Hold(store, "teacher-shard", skip=2, storage_options=direct) as hold:
            gen, genv = start_amed(args, work, log, env={**env, "AWS_MAX_ATTEMPTS": "2"})
            try:
                hold.wait_reached(timeout=120, alive=lambda: gen.poll() is None)
            except (RuntimeError, TimeoutError) as e:
                kill_group(gen, genv)
                return f"generate never reached its third shard: {e}", "FAIL"
            proxy.kill()
            proxy.wait()
            try:
                rc = gen.wait(timeout=300)
            except subprocess.TimeoutExpired:
                kill_group(gen, genv)
                return "generate hung after the server went away", "FAIL"
        _stop_ray(genv)
        text = log.read_text(errors="replace")
        last = text.strip().splitlines()[-1] if text.strip() else ""
        first_ok = rc != 0 and "Traceback" not in text and "amed teacher: error" in text
        proxy = _proxy(lport, mport)
        try:
            again = amed(args, work, env=env)
            verified = amed(["teacher", "verify", "--store", store], work, env=env)
        finally:
            proxy.kill()
            proxy.wait()
        m = re.search(r"\((\d+) written now, (\d+) already done\)", again.stdout)
        ok = first_ok and again.returncode == 0 and verified.returncode == 0 and m and int(m.group(2)) > 0
        return (f"first rc {rc}: {last[:110]}; resumed rc {again.returncode} "
                f"({m.group(0) if m else '?'}), verify rc {verified.returncode}"), "survived" if ok else "FAIL"


@probe("tracking-unreachable", "MLflow at a closed port: refused in one line before any compute (no store, no Ray)",
       fast=True)
def tracking_unreachable(work: Path):
    t0 = time.time()
    proc = amed(["distill", str(write_cfg(work, TINY)), "--out", str(work / "out"), "--tracking-uri",
                 f"http://127.0.0.1:{_free_port()}"], work)
    refused, line = one_line(proc)
    ok = refused and not (work / "out" / "store").exists() and "MLflow registry" in proc.stderr
    return f"{line} after {time.time() - t0:.1f} s; store created: {(work / 'out' / 'store').exists()}", \
        "refused" if ok else "FAIL"


@probe("store-unreachable", "store on a dead S3 endpoint: refused in one line before any compute", fast=True)
def store_unreachable(work: Path):
    env = _s3_env(work, _free_port())
    proc = amed(["distill", str(write_cfg(work, TINY)), "--out", str(work / "out"), "--store", "s3://nobucket/x"],
                work, env=env, timeout=120)
    refused, line = one_line(proc)
    return line, "refused" if refused and "store s3://nobucket/x" in proc.stderr else "FAIL"


@probe("ray-oom", "Ray's memory monitor kills the train task (memory threshold near zero): the run fails with a "
       "clear error after its retries, nothing partial is committed, and a normal rerun completes")
def ray_oom(work: Path):
    cfg = write_cfg(work, TINY)
    out = work / "out"
    env = _env(work, {"RAY_memory_usage_threshold": "0.001", "RAY_memory_monitor_refresh_ms": "50"})
    try:
        first = amed(["distill", str(cfg), "--out", str(out)], work, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        _stop_ray(env)
        return ("still running after 300 s: Ray retries a task its memory monitor kills without limit (task_oom_retries "
                "-1 by default), so the run neither fails nor finishes"), "FAIL"
    text = first.stdout + first.stderr
    oom = "OutOfMemoryError" in text or "memory" in text.lower()
    ckpts = list((out / "store" / "checkpoints").glob("*/predictor.safetensors")) if (out / "store").exists() else []
    partial = [c for c in ckpts if not (c.parent / "train.json").exists()]
    again = amed(["distill", str(cfg), "--out", str(out)], work)
    lines = text.splitlines()
    last = next((ln for ln in lines if "OutOfMemoryError" in ln), (lines or [""])[-1])[:120]
    ok = first.returncode != 0 and oom and not partial and again.returncode == 0 and store_verifies(work, out / "store")
    if first.returncode == 0:
        return "the memory monitor did not kill anything on this machine (run completed)", "skipped"
    rerun = "" if again.returncode == 0 else ": " + ((again.stdout + again.stderr).strip().splitlines() or [""])[-1][:160]
    return f"first rc {first.returncode}: {last}; partial checkpoints {len(partial)}; rerun rc {again.returncode}{rerun}", \
        "survived" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------------------------
# Secrets.

@probe("secret-canary", "a canary AWS secret in the environment of a full sweep never appears in its output, store, "
       "MLflow database/artifacts or Prefect database; a secret in storage_options is refused", fast=True)
def secret_canary(work: Path):
    cfg = write_cfg(work, TINY)
    out = work / "out"
    env = _env(work, {"AWS_SECRET_ACCESS_KEY": CANARY, "AWS_ACCESS_KEY_ID": "AKIACANARY", "AWS_SESSION_TOKEN": CANARY})
    proc = amed(["distill", str(cfg), "--out", str(out)], work, env=env)
    files = [p for p in out.rglob("*") if p.is_file()] + [p for p in Path(env["RAY_TMPDIR"]).rglob("*") if p.is_file()
                                                          and not p.is_symlink()]
    hits = [p.name for p in files if CANARY.encode() in p.read_bytes()]
    hits += ["stdout/stderr"] * (CANARY in proc.stdout + proc.stderr)
    bad_cfg = write_cfg(work, {**TINY, "storage_options": {"client_kwargs": {"aws_secret_access_key": CANARY}}}, "bad.yaml")
    refused = amed(["distill", str(bad_cfg), "--out", str(work / "out2")], work)
    ok_ref, line = one_line(refused)
    ok = proc.returncode == 0 and not hits and ok_ref and CANARY not in refused.stderr + refused.stdout \
        and not (work / "out2").exists()
    return (f"sweep rc {proc.returncode}, canary found in {hits or 'nothing'} ({len(files)} files grepped: store, "
            f"MLflow db + artifacts, Prefect db, Ray logs; and the output); nested secret: {line[:90]}"), \
        "survived" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: each one line naming the problem and the fix, a non-zero exit, nothing written.

def _bad_sweeps(work: Path) -> dict[str, tuple[str, str]]:
    """name -> (YAML text or path, a word the error must contain)."""
    big = work / "big.yaml"
    with open(big, "wb") as f:
        f.write(b"datasets: []\n")
        f.truncate(50 << 20)
    bomb = "datasets:\n  - name: d\n    teacher: digits-gmm\n    options:\n      bomb:\n" + "".join(
        f"        - &a{i} [{','.join(['*a' + str(i - 1)] * 9) if i else ','.join(['lol'] * 9)}]\n" for i in range(9))
    d = "datasets: [{name: d, teacher: digits-gmm}]\n"
    return {
        "wrong type": (d + "nfes: three\n", "nfes"), "unknown field": (d + "colour: red\n", "colour"),
        "NFE 0": (d + "nfes: [0]\n", "nfes"), "NFE -3": (d + "nfes: [-3]\n", "nfes"),
        "NFE 10^9": (d + "nfes: [1000000000]\n", "nfes"), "NFE true": (d + "nfes: [true]\n", "nfes"),
        "empty list": (d + "solvers: []\n", "solvers"), "unknown solver": (d + "solvers: [nope]\n", "solvers"),
        "duplicates": ("datasets: [{name: d, teacher: digits-gmm}, {name: d, teacher: digits-gmm}]\n", "unique"),
        "not a mapping": ("- a\n- b\n", "mapping"),
        "python tag": ("!!python/object/apply:os.system ['touch pwned']\n", "YAML"),
        "seed 2**70": (d + "seeds: [1180591620717411303424]\n", "seeds"),
        "unknown teacher option": ("datasets: [{name: d, teacher: digits-gmm, options: {foo: 1}}]\n", "foo"),
        "alias bomb": (bomb, "aliases"), "50 MB file": (str(big), "bytes"),
        "traversal in name": (d + "name: ../../etc\n", "name"),
        "nested secret": (d + f"storage_options: {{client_kwargs: {{aws_secret_access_key: {CANARY}}}}}\n", "credentials"),
    }


@probe("bad-sweeps", "each bad sweep (wrong types, unknown fields, NFE 0/-3/10^9/true, empty lists, unknown solver, "
       "duplicates, not a mapping, !!python tags, 2**70 seed, unknown teacher option, alias bomb, 50 MB file, traversal, "
       "nested secret): one line naming the field, exit 2, nothing written")
def bad_sweeps(work: Path):
    failed = []
    cases = _bad_sweeps(work)
    for name, (text, word) in cases.items():
        path = Path(text) if text.endswith(".yaml") else work / "case.yaml"
        if path == work / "case.yaml":
            path.write_text(text)
        out = work / f"out-{abs(hash(name))}"
        proc = amed(["distill", str(path), "--out", str(out)], work, timeout=120)
        ok, line = one_line(proc)
        if not ok or word not in proc.stderr or out.exists() or CANARY in proc.stderr or (work / "pwned").exists():
            failed.append(f"{name}: {line[:60]}")
    return (f"{len(cases) - len(failed)}/{len(cases)} refused cleanly" + (f"; {failed}" if failed else "")), \
        "refused" if not failed else "FAIL"


def _mixture_cases(work: Path) -> dict[str, Path]:
    import pickle

    import numpy as np

    from amed_core.adapters import BUILTIN_TEACHERS, _data_path

    with np.load(_data_path(BUILTIN_TEACHERS["digits-gmm"])) as z:
        good = {k: z[k] for k in ("weights", "means", "covs", "shape")}
    cases = {}

    def save(name, **over):
        p = work / f"{name}.npz"
        with open(p, "wb") as f:
            np.savez(f, **{**good, **over})
        cases[name] = p

    nan = good["means"].copy()
    nan[0, 0] = np.nan
    save("nan-means", means=nan)
    inf = good["covs"].copy()
    inf[0, 0, 0] = np.inf
    save("inf-covs", covs=inf)
    save("wrong-shapes", means=good["means"][:, :10])
    save("object-array", weights=np.array([{"x": 1}], dtype=object))
    save("scalar-weights", weights=np.float64(1.0))
    save("negative-shape", shape=np.array([1, -8, 8]))
    (work / "text.npz").write_text("not an archive")
    cases["text-renamed"] = work / "text.npz"
    (work / "pickle.npz").write_bytes(pickle.dumps({"weights": 1}))
    cases["pickle-renamed"] = work / "pickle.npz"
    with open(work / "array.npz", "wb") as f:
        np.save(f, np.ones(3))
    cases["npy-renamed"] = work / "array.npz"
    cases["missing"] = work / "nope.npz"
    return cases


@probe("bad-teachers", "mixture files (missing, NaN/inf, wrong shapes, object array, scalar weights, negative shape, "
       "text/pickle/.npy renamed .npz) given to amed teacher generate: one line naming the file, exit non-zero, "
       "no allow_pickle advice, nothing written")
def bad_teachers(work: Path):
    failed = []
    cases = _mixture_cases(work)
    for name, path in cases.items():
        store = work / f"store-{name}"
        proc = amed(["teacher", "generate", "--teacher", f"gmm:{path}", "--grid-for", "amed:3", "--n", "8",
                     "--no-progress", "--store", str(store)], work, timeout=120)
        ok, line = one_line(proc)
        if not ok or str(path) not in proc.stderr or "allow_pickle" in proc.stderr or store.exists():
            failed.append(f"{name}: {line[:70]}")
    return (f"{len(cases) - len(failed)}/{len(cases)} refused cleanly" + (f"; {failed}" if failed else "")), \
        "refused" if not failed else "FAIL"


def _checkpoint_cases(work: Path) -> dict[str, Path]:
    import pickle

    from amed_core.amed import AMEDPredictor, SamplerSpec, checkpoint_files
    from amed_core.denoisers import load_teacher

    spec = SamplerSpec.create("amed", 5, denoiser=load_teacher("digits-gmm"))
    good = checkpoint_files(AMEDPredictor(spec.predictor), spec)
    sj = json.loads(good["sampler.json"])
    st = good["predictor.safetensors"]

    def lying():
        h = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}}).encode()
        return len(h).to_bytes(8, "little") + h + b"\0" * 4

    variants = {
        "unknown solver": {"sampler.json": json.dumps({**sj, "solver": "euler9"}).encode()},
        "negative NFE": {"sampler.json": json.dumps({**sj, "nfe": -5}).encode()},
        "extra field": {"sampler.json": json.dumps({**sj, "colour": 1}).encode()},
        "spec is a list": {"sampler.json": b"[1, 2]"},
        "huge string": {"sampler.json": json.dumps({**sj, "solver": "x" * (100 << 20)}).encode()},
        "mismatched predictor config": {"sampler.json": json.dumps({**sj, "predictor": {**sj["predictor"],
                                                                                        "hidden_dim": 2**24}}).encode()},
        "truncated safetensors": {"predictor.safetensors": st[: len(st) // 2]},
        "zero-byte safetensors": {"predictor.safetensors": b""},
        "huge header": {"predictor.safetensors": (10**15).to_bytes(8, "little") + b"{}"},
        "offsets lie": {"predictor.safetensors": lying()},
        "wrong-shape safetensors": {"predictor.safetensors": _wrong_shape(st)},
        "pickle as predictor": {"predictor.safetensors": pickle.dumps({"w": 1})},
    }
    out = {}
    for i, (name, files) in enumerate(variants.items()):
        d = work / f"ckpt{i}"
        d.mkdir()
        for k, v in {**good, **files}.items():
            (d / k).write_bytes(v)
        out[name] = d
    return out


def _wrong_shape(st: bytes) -> bytes:
    import torch
    from safetensors.torch import load, save

    state = load(st)
    k = next(iter(state))
    state[k] = torch.zeros(3, 3)
    return save(state)


@probe("bad-checkpoints", "checkpoints (unknown solver, negative NFE, extra fields, a list, a 100 MB string, "
       "mismatched predictor config, truncated/zero-byte/wrong-shape/huge-header/offset-lying safetensors, a pickle) "
       "fetched: one line naming the file, exit non-zero, --out untouched")
def bad_checkpoints(work: Path):
    failed = []
    cases = _checkpoint_cases(work)
    for name, d in cases.items():
        out = work / f"fetched-{d.name}"
        proc = amed(["fetch", str(d), "--out", str(out)], work, timeout=120)
        ok, line = one_line(proc)
        if not ok or out.exists() or not re.search(r"sampler\.json|predictor\.safetensors", proc.stderr):
            failed.append(f"{name}: {line[:70]}")
    return (f"{len(cases) - len(failed)}/{len(cases)} refused cleanly" + (f"; {failed}" if failed else "")), \
        "refused" if not failed else "FAIL"


@probe("edm-pickle", "an EDM pickle that would run code, given without --trust-pickle: refused before it is opened",
       fast=True)
def edm_pickle(work: Path):
    marker = work / "pwned"
    evil = work / "net.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    proc = amed(["sample", "--teacher", f"edm:{evil}", "--nfe", "3", "--n", "4", "--solvers", "euler",
                 "--out-dir", str(work / "o")], work, timeout=120)
    ok, line = one_line(proc)
    ok = ok and not marker.exists() and "trust" in proc.stderr
    return f"{line[:120]}; code ran: {marker.exists()}", "refused" if ok else "FAIL"


def _small_store(work: Path) -> tuple[Path, Path]:
    store = work / "store"
    r = amed(["teacher", "generate", "--teacher", "digits-gmm", "--grid-for", "amed:3", "--n", "40",
              "--shard-size", "8", "--no-progress", "--store", str(store)], work)
    assert r.returncode == 0, r.stderr
    (h,) = os.listdir(store / "teachers")
    return store, store / "teachers" / h


@probe("tampered-store", "a tampered spec.json / manifest, a record pointing outside the store, a shard swapped for "
       "another valid shard, a symlink, a FIFO: verify exits 1 naming each, never hangs; repair + generate restore it "
       "(an edited spec.json: ls marks it BROKEN, repair says it cannot rewrite it, generate --verify does)")
def tampered_store(work: Path):
    results = []
    for case in ("spec", "manifest", "outside", "swapped", "symlink", "fifo"):
        sub = work / case
        sub.mkdir()
        store, d = _small_store(sub)
        if case == "spec":
            spec = json.loads((d / "spec.json").read_text())
            spec["base_seed"] = spec.get("base_seed", 0) + 1
            (d / "spec.json").write_text(json.dumps(spec))
        elif case == "manifest":
            m = json.loads((d / "manifest.json").read_text())
            m["shards"]["00001"]["sha256"] = "0" * 64
            (d / "manifest.json").write_text(json.dumps(m))
        elif case == "outside":
            e = json.loads((d / "manifest.d" / "shard-00001.json").read_text())
            (d / "manifest.d" / "shard-00001.json").write_text(json.dumps({**e, "path": "../../../../etc/passwd"}))
        elif case == "swapped":
            shutil.copy(d / "shard-00000.safetensors", d / "shard-00001.safetensors.new")
            os.replace(d / "shard-00001.safetensors.new", d / "shard-00001.safetensors")
        elif case == "symlink":
            (d / "shard-00001.safetensors").unlink()
            os.symlink(d / "shard-00000.safetensors", d / "shard-00001.safetensors")
        else:
            (d / "shard-00001.safetensors").unlink()
            os.mkfifo(d / "shard-00001.safetensors")
        v = amed(["teacher", "verify", "--store", str(store)], sub, timeout=60)
        refused = v.returncode == 1 and "Traceback" not in v.stderr
        if case == "spec":  # ls marks it BROKEN (and still answers); repair says it cannot; generate --verify rewrites it
            ls = amed(["teacher", "ls", "--store", str(store)], sub, timeout=60)
            rep = amed(["teacher", "repair", "--store", str(store)], sub, timeout=60)
            g = amed(["teacher", "generate", "--teacher", "digits-gmm", "--grid-for", "amed:3", "--n", "40",
                      "--shard-size", "8", "--no-progress", "--store", str(store), "--verify"], sub)
            restored = (ls.returncode == 1 and "BROKEN" in ls.stdout and rep.returncode == 1 and "--verify" in rep.stdout
                        and g.returncode == 0 and store_verifies(sub, store))
        else:
            amed(["teacher", "repair", "--store", str(store)], sub, timeout=60)
            g = amed(["teacher", "generate", "--teacher", "digits-gmm", "--grid-for", "amed:3", "--n", "40",
                      "--shard-size", "8", "--no-progress", "--store", str(store)], sub)
            restored = g.returncode == 0 and store_verifies(sub, store)
        results.append((case, refused, restored))
    bad = [c for c, r, s in results if not (r and s)]
    return (f"verify refused {sum(r for _, r, _ in results)}/6, repair+generate restored "
            f"{sum(s for *_, s in results)}/6" + (f"; failed: {bad}" if bad else "")), "refused" if not bad else "FAIL"


@probe("bad-registry-uris", "fetch from foo://bar, an unreachable http server, a missing model, a bad alias, a "
       "traversal name, into a non-empty --out: one line each, exit non-zero, --out untouched")
def bad_registry(work: Path):
    db = f"sqlite:///{work / 'mlflow.db'}"
    (work / "full").mkdir()
    (work / "full" / "keep.txt").write_text("mine")
    cases = {
        "foo scheme": (["models:/m@champion", "--tracking-uri", "foo://bar"], "o1", "scheme"),
        "unreachable": (["models:/m@champion", "--tracking-uri", f"http://127.0.0.1:{_free_port()}"], "o2", "reached"),
        "missing model": (["models:/nope@champion", "--tracking-uri", db], "o3", "nope"),
        "bad alias": (["models:/nope@../x", "--tracking-uri", db], "o4", "models:/"),
        "traversal": (["models:/../../etc/passwd/1", "--tracking-uri", db], "o5", "models:/"),
        "non-empty out": ([str(work), "--tracking-uri", db], "full", "not empty"),
    }
    failed = []
    for name, (args, out, word) in cases.items():
        proc = amed(["fetch", *args, "--out", str(work / out)], work, timeout=120)
        ok, line = one_line(proc)
        untouched = (work / "full" / "keep.txt").read_text() == "mine" and sorted(os.listdir(work / "full")) == ["keep.txt"]
        if not ok or word not in proc.stderr or (out != "full" and (work / out).exists()) or not untouched:
            failed.append(f"{name}: {line[:70]}")
    return (f"{len(cases) - len(failed)}/{len(cases)} refused cleanly" + (f"; {failed}" if failed else "")), \
        "refused" if not failed else "FAIL"


# ---------------------------------------------------------------------------------------------------------------
# Every file the project reads, made hostile (issue 20): a FIFO, a symlink to /dev/zero, a huge sparse file, a deep
# nesting, NaN/inf content. Each must be refused in one line naming the file (or, for a store's merged view, reported
# and survived), quickly, without hanging or reading without a limit. The cases run in one child process under an
# address-space limit (an unbounded read ends in MemoryError there, not in the machine's swap); a case that does not
# finish within CASE_TIMEOUT_S is a hang. ``--cli`` runs each case through the `amed` command instead (the times a user
# sees, recorded in BENCHMARKS "Reliability, second pass").

FILE_KINDS = ("sweep.yaml", "mixture.npz", "teacher shard", "spec.json", "manifest.json", "commit record",
              "sampler.json", "predictor.safetensors", "epd.json", "epd.safetensors", "MLflow artifact")
VARIANTS = ("fifo", "dev-zero", "sparse", "deep", "nan")
CASE_TIMEOUT_S = 60
SPARSE_BYTES = 1 << 40  # 1 TiB, no blocks written


def _make_bad(path: Path, variant: str, good: bytes, nan_bytes: bytes | None, deep: bytes | None) -> bool:
    """Put ``variant`` at ``path`` (replacing what is there); False when it does not apply to this kind of file."""
    if variant == "deep" and deep is None or variant == "nan" and nan_bytes is None:
        return False
    if path.exists() or path.is_symlink():
        path.unlink()
    if variant == "fifo":
        os.mkfifo(path)
    elif variant == "dev-zero":
        os.symlink("/dev/zero", path)
    elif variant == "sparse":
        with open(path, "wb") as f:
            f.write(good[:64])
            f.truncate(SPARSE_BYTES)
    elif variant == "deep":
        path.write_bytes(deep)
    else:
        path.write_bytes(nan_bytes)
    return True


def _deep_json(levels: int = 100_000) -> bytes:
    return b'{"a": ' * levels + b"1" + b"}" * levels


def _nan_safetensors(data: bytes) -> bytes:
    import torch
    from safetensors.torch import load, save

    return save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in load(data).items()})


def _deep_safetensors() -> bytes:
    header = b'{"a": ' * 10_000 + b"1" + b"}" * 10_000
    return len(header).to_bytes(8, "little") + header


def _checkpoint_sources(work: Path) -> dict:
    """Good checkpoint files of the amed and epd families."""
    import torch

    import amed_core.families as F
    from amed_core.amed import AMEDPredictor, Sampler, SamplerSpec
    from amed_core.denoisers import load_teacher
    from amed_core.methods.epd import EPDParams

    teacher = load_teacher("digits-gmm")
    spec = SamplerSpec.create("amed", 5, denoiser=teacher)
    grid = spec.grid()
    doc = F.epd.spec_doc("epd", 5, grid, afs=True, options={}, num_points=2, teacher=teacher.identity())
    epd = F.epd.EPDSampler(EPDParams(len(grid), 2, scale_dir=0.01, generator=torch.Generator().manual_seed(0)), doc)
    return {"amed": Sampler(spec, AMEDPredictor(spec.predictor, seed=0)).files(), "epd": epd.files()}


def _registered_model(work: Path, files: dict) -> tuple[str, str, Path]:
    """A local SQLite registry with one registered AMED version: (its models:/ URI, the tracking URI, the folder of
    its artifacts)."""
    from amed_core.amed import SamplerSpec, save_checkpoint, sampler_from_files
    from amed_core.denoisers import load_teacher
    from flows.config import load_sweep
    from flows.registry import log_sweep
    from flows.results import CandidateResult, EvalProtocol

    uri = f"sqlite:///{work / 'reg' / 'mlflow.db'}"
    s = sampler_from_files(files)
    ckpt = save_checkpoint(work / "reg-ckpt", s.predictor, s.spec)
    cfg = load_sweep({"name": "probe", "datasets": [{"name": "digits", "teacher": "digits-gmm"}], "solvers": ["amed"],
                      "nfes": [5], "mlflow_tracking_uri": uri})
    cand = CandidateResult(dataset="digits", solver="amed", base_solver="heun", nfe=5, seed=0, checkpoint_url=str(ckpt),
                           protocol=EvalProtocol(metric="fd_exact", num_samples=64, seed=1000, reference="digits-gmm"),
                           value=0.5, base_value=1.0, rmse=0.1, train_seconds=1.0, teacher_nfe=10, loss_history=[1.0],
                           artifacts={}, sampler_spec=s.spec.to_dict())
    log = log_sweep(cfg, [cand])
    name, version = log.versions[0]
    from flows.registry.loading import local_artifacts

    return f"models:/{name}/{version}", uri, local_artifacts(f"models:/{name}/{version}", uri)


def _bad_file_cases(work: Path):
    """Yield (kind, variant, read, check): ``read()`` does what the project does with the file; ``check(result or
    exception)`` -> (ok, one-line observation)."""
    import numpy as np

    from amed_core.adapters import BUILTIN_TEACHERS, _data_path
    from amed_core.denoisers import load_teacher
    from flows.config import load_sweep
    from flows.registry.loading import fetch
    from flows.storage import TeacherStore

    def refused(words=()):
        def check(r):
            if not isinstance(r, BaseException):
                return False, f"accepted ({str(r)[:80]})"
            msg = str(r)
            # one line; a sweep's field errors are one line per field under "invalid sweep config:"
            ok = isinstance(r, (ValueError, RuntimeError)) and len(msg.strip().splitlines()) <= 3 and len(msg) < 800 \
                and all(w in msg for w in words)
            return ok, f"{type(r).__name__}: {msg[:140]}"
        return check

    # sweep.yaml
    good_sweep = b"datasets: [{name: d, teacher: digits-gmm}]\n"
    for v in VARIANTS:
        d = work / f"sweep-{v}"
        d.mkdir()
        path = d / "sweep.yaml"
        if _make_bad(path, v, good_sweep, b"datasets: [{name: d, teacher: digits-gmm}]\nteacher: {M: .nan}\n",
                     b"datasets: [{name: d, teacher: digits-gmm}]\nx: " + b"[" * 100_000 + b"]" * 100_000 + b"\n"):
            yield "sweep.yaml", v, (lambda p=path: load_sweep(p)), refused(["sweep"] if v != "nan" else ["teacher.M"]), \
                ["distill", str(path), "--out", str(d / "out")]

    # mixture.npz
    with np.load(_data_path(BUILTIN_TEACHERS["digits-gmm"])) as z:
        arrays = {k: z[k] for k in ("weights", "means", "covs", "shape")}
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    nan = dict(arrays)
    nan["means"] = arrays["means"].copy()
    nan["means"][0, 0] = np.nan
    nbuf = io.BytesIO()
    np.savez(nbuf, **nan)
    for v in VARIANTS:
        path = work / f"mixture-{v}.npz"
        if _make_bad(path, v, buf.getvalue(), nbuf.getvalue(), None):
            yield "mixture.npz", v, (lambda p=path: load_teacher(f"gmm:{p}")), refused([str(path)]), \
                ["teacher", "generate", "--teacher", f"gmm:{path}", "--grid-for", "amed:3", "--n", "8", "--no-progress",
                 "--store", str(work / f"gen-{v}")]

    # the teacher store: a shard, spec.json, manifest.json, a commit record
    from amed_core.teacher import TeacherSpec, student_grids_for
    from flows.storage import generate

    teacher = load_teacher("digits-gmm")
    spec = TeacherSpec.for_denoiser(teacher, student_grids_for("amed:3"), num_trajectories=16, shard_size=8)

    def store_with(tag: str) -> tuple[str, Path]:
        url = str(work / f"store-{tag}")
        generate(TeacherStore(url), teacher, spec, progress=False)
        return url, Path(url, "teachers", spec.spec_hash)

    def nan_shard(d: Path) -> bytes:  # NaN states, committed with a record that matches its bytes (a broken teacher)
        from amed_core.shards import TeacherShard
        from flows.storage.checksums import digests

        shard = TeacherShard.from_bytes((d / "shard-00000.safetensors").read_bytes())
        shard.states.fill_(float("nan"))
        data = bytes(shard.to_buffer())
        rec = json.loads((d / "manifest.d" / "shard-00000.json").read_text())
        rec.update(bytes=len(data), **digests(data))
        (d / "manifest.d" / "shard-00000.json").write_text(json.dumps(rec))
        (d / "manifest.json").unlink()
        return data

    def verify_reports(words):
        def check(r):
            if isinstance(r, BaseException):
                return refused(words)(r)
            ok = not r.passed and all(w in json.dumps([r.bad, r.invalid, r.missing]) for w in words)
            return ok, f"verify {'FAILED' if not r.passed else 'passed'}: bad {list(r.bad)}, invalid {list(r.invalid)}"
        return check

    # one store per kind of file; the variants replace the file one after the other (the NaN one, last, may rewrite
    # the shard's commit record too)
    url, d = store_with("shard")
    path = d / "shard-00000.safetensors"
    good = path.read_bytes()
    for v in VARIANTS:
        if v == "nan":
            path.unlink()
            path.write_bytes(good)
        if _make_bad(path, v, good, nan_shard(d) if v == "nan" else None, None):
            yield "teacher shard", v, (lambda u=url: TeacherStore(u).verify(spec.spec_hash)), verify_reports(["0"]), \
                ["teacher", "verify", "--store", url]
    url, d = store_with("spec")
    path = d / "spec.json"
    good = path.read_bytes()
    nanb = json.dumps({**json.loads(good), "base_seed": float("nan")}).encode()
    for v in VARIANTS:
        if _make_bad(path, v, good, nanb, _deep_json()):
            yield "spec.json", v, (lambda u=url: TeacherStore(u).get_spec(spec.spec_hash)), refused(["spec.json"]), \
                ["teacher", "ls", "--store", url]
    for name, kind in (("manifest.json", "manifest.json"), ("manifest.d/shard-00000.json", "commit record")):
        url, d = store_with(kind.replace(" ", "-"))
        path = d / name
        good = path.read_bytes()
        doc = json.loads(good)
        nanb = json.dumps({**doc, "bytes": float("inf")} if kind == "commit record" else
                          {**doc, "shards": {k: {**e, "bytes": float("nan")} for k, e in doc["shards"].items()}}).encode()
        for v in VARIANTS:
            if _make_bad(path, v, good, nanb, _deep_json()):
                # the merged manifest is a view: a bad one is reported and rebuilt from the commit records (the shards
                # still verify); a bad commit record is reported and its shard no longer counts
                yield kind, v, (lambda u=url: TeacherStore(u).verify(spec.spec_hash)), \
                    verify_reports(["manifest.json"] if kind == "manifest.json" else ["shard-00000.json"]), \
                    ["teacher", "verify", "--store", url]

    # checkpoints, fetched from a folder
    sources = _checkpoint_sources(work)
    for fam, name in (("amed", "sampler.json"), ("amed", "predictor.safetensors"), ("epd", "epd.json"),
                      ("epd", "epd.safetensors")):
        files = sources[fam]
        for v in VARIANTS:
            src = work / f"ckpt-{name}-{v}"
            src.mkdir()
            for k, data in files.items():
                (src / k).write_bytes(data)
            if name.endswith(".json"):
                doc = json.loads(files[name])
                if name == "sampler.json":
                    doc["schedule"] = {**doc["schedule"], "sigma_max": float("inf")}
                else:
                    doc["params"] = {**doc["params"], "scale_dir": float("nan")}
                nanb, deep = json.dumps(doc).encode(), _deep_json()
            else:
                nanb, deep = _nan_safetensors(files[name]), _deep_safetensors()
            if _make_bad(src / name, v, files[name], nanb, deep):
                yield name, v, (lambda s=src, o=work / f"out-{name}-{v}": fetch(str(s), o)), refused([name]), \
                    ["fetch", str(src), "--out", str(work / f"cli-out-{name}-{v}")]

    # MLflow artifacts: a registered version of a local SQLite registry, its files replaced where MLflow keeps them
    files = sources["amed"]
    sub = work / "mlflow"
    sub.mkdir()
    model_uri, uri, art = _registered_model(sub, files)
    (target,) = [p for p in art.rglob("predictor.safetensors")]
    good = target.read_bytes()
    for v in VARIANTS:
        if _make_bad(target, v, good, _nan_safetensors(good), _deep_safetensors()):
            yield "MLflow artifact", v, (lambda m=model_uri, u=uri, o=sub / f"out-{v}": fetch(m, o, tracking_uri=u)), \
                refused(["predictor.safetensors"]), \
                ["fetch", model_uri, "--out", str(sub / f"cli-out-{v}"), "--tracking-uri", uri]


def _bad_files_worker(work: Path, cli: bool = False) -> int:
    """Child process: run every case, one JSON line before ("start") and after ("done") each. ``cli``: through the
    `amed` command (a new process per case: its wall time is what a user waits) instead of the library call."""
    for kind, variant, read, check, args in _bad_file_cases(work):
        print(json.dumps({"start": [kind, variant]}), flush=True)
        t0 = time.perf_counter()
        if cli:
            proc = subprocess.run([PY, "-m", "flows.cli", *args], cwd=work, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=CASE_TIMEOUT_S)
            seconds = time.perf_counter() - t0
            out = (proc.stdout + proc.stderr).strip()
            ok = proc.returncode in (1, 2) and "Traceback" not in out and len(out) < 4000
            seen = f"rc {proc.returncode}: " + " / ".join(ln for ln in out.splitlines()
                                                           if "BROKEN" in ln or "FAILED" in ln or "error" in ln)[:160]
        else:
            try:
                result = read()
            except BaseException as e:  # noqa: BLE001 - what the reader raised is the observation
                result = e
            seconds = time.perf_counter() - t0
            ok, seen = check(result)
        print(json.dumps({"done": [kind, variant], "ok": ok, "seconds": seconds, "seen": seen}), flush=True)
    return 0


def _run_bad_files(work: Path, timeout: float = 900, cli: bool = False) -> tuple[list[dict], str | None]:
    """The cases' results from a child process (4 GiB address space); (rows, the case that hung or None)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    log = work / "bad-files.jsonl"
    with open(log, "w") as out:
        proc = subprocess.Popen([PY, str(Path(__file__).resolve()), "--bad-files-worker", str(work / "cases")]
                                + (["--cli"] if cli else []), cwd=work,
                                env=_env(work), stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=limit,
                                start_new_session=True)
        t_case, last = time.time(), None
        while proc.poll() is None:
            rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
            if rows and rows[-1].get("start") != last:
                last, t_case = rows[-1].get("start"), time.time()
            if (last and time.time() - t_case > CASE_TIMEOUT_S) or time.time() - t_case > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                done = [r for r in rows if "done" in r]
                return done, f"{last[0]} / {last[1]}" if last else "setup"
            time.sleep(0.2)
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.startswith("{")]
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["?"]
        return [r for r in rows if "done" in r], f"worker exited {proc.returncode}: {tail[0][:160]}"
    return [r for r in rows if "done" in r], None


BAD_FILE_ROWS: list[dict] = []  # the last run's per-case rows (bench --json writes them too)
CLI_MODE = False  # bench --cli: the bad-files cases through the `amed` command


@probe("bad-files", "every file the project reads (sweep, mixture, teacher shard, spec, manifest, commit record, "
       "sampler.json, predictor/epd safetensors, epd.json, MLflow artifacts) as a FIFO, a symlink to /dev/zero, a 1 TiB "
       "sparse file, a 100k-deep nesting and NaN/inf content: refused (or, for the store's views, reported) in one line "
       "naming the file, each within seconds, nothing hangs, nothing read without a limit (4 GiB address space)",
       fast=True)
def bad_files(work: Path):
    (work / "cases").mkdir()
    rows, hung = _run_bad_files(work, cli=CLI_MODE)
    BAD_FILE_ROWS[:] = rows
    bad = [f"{r['done'][0]}/{r['done'][1]}: {r['seen'][:90]}" for r in rows if not r["ok"]]
    slowest = max(rows, key=lambda r: r["seconds"]) if rows else None
    observed = (f"{sum(r['ok'] for r in rows)}/{len(rows)} refused cleanly"
                + (f"; slowest {slowest['done'][0]}/{slowest['done'][1]} {slowest['seconds']:.2f} s" if slowest else "")
                + (f"; HUNG at {hung}" if hung else "") + (f"; {bad[:4]}" if bad else ""))
    return observed, "refused" if rows and not bad and not hung else "FAIL"


# ---------------------------------------------------------------------------------------------------------------

def run_probe(name: str) -> Row:
    entry = next(p for p in PROBES if p[0] == name)
    _, expected, fn, _ = entry
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"amed-rel-{name}-") as tmp:
        try:
            observed, verdict = fn(Path(tmp))
        except Skip as e:
            observed, verdict = str(e), "skipped"
        except Exception as e:  # noqa: BLE001 - a probe that breaks is a failed probe
            observed, verdict = f"probe raised {type(e).__name__}: {str(e)[:200]}", "FAIL"
        finally:
            subprocess.run(["umount", "-l", str(Path(tmp) / "disk")], capture_output=True)
            while _RAY_DIRS:
                shutil.rmtree(_RAY_DIRS.pop(), ignore_errors=True)
    return Row(name, expected, observed, verdict, round(time.time() - t0, 1))


def main(argv: list[str] | None = None) -> int:
    global CLI_MODE, KILL_POINTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="only the probes CI runs")
    ap.add_argument("--only", default=None, help="comma-separated probe names")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--cli", action="store_true", help="bad-files: each case through the amed command (user-visible times)")
    ap.add_argument("--kill-points", type=int, default=None, help=f"kill-anywhere: moments to kill at (default {KILL_POINTS})")
    ap.add_argument("--bad-files-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bad_files_worker:
        sys.path.insert(0, str(REPO))
        return _bad_files_worker(Path(args.bad_files_worker), cli=args.cli)
    CLI_MODE = args.cli
    KILL_POINTS = args.kill_points or KILL_POINTS
    names = [p[0] for p in PROBES if not args.fast or p[3]]
    if args.only:
        names = [n for n in args.only.split(",") if n]
    print("| probe | expected | observed | verdict | s |")
    print("|---|---|---|---|---|")
    rows = []
    for n in names:
        row = run_probe(n)
        rows.append(row)
        print(f"| {row.probe} | {row.expected} | {row.observed.replace('|', '/')} | {row.verdict} | {row.seconds:.0f} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [asdict(r) for r in rows], "bad_files": BAD_FILE_ROWS}, indent=1))
    return 0 if all(r.verdict in ("survived", "refused", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

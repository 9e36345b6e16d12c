"""Fault-injection barriers: a named point of a task waits, when a test asks for it, until the test has acted (killed
a node, a worker, a server), so that a fault lands inside the window it is meant for every time, never by timing.

A fault test used to poll for "a shard committed" or "a training at step > 0" and then kill; the task could finish
between two polls and the test failed one run in N ("no training task ran on a worker node long enough to be killed",
issue 20). Now the test writes a *hold* into the run's store and the task waits at the point until it is released:

    from flows.storage.barriers import Hold
    with Hold(store_url, "train-step", match={"attempt": 1}) as hold:   # writes faults/train-step.hold
        ... start the run ...
        who = hold.wait_reached()          # the first task that reached the point: {"pid", "node", "job", ...}
        kill(who["pid"])                   # the task is still at the point: the kill lands there
    # leaving the block releases the hold: the retried task (and any other waiting one) goes on

Points (``point`` names): ``teacher-shard`` (a shard about to be generated: ``index``, ``pid``, ``node``; the sweep's
shard tasks and ``amed teacher generate``), ``train-step`` (a training after its first optimiser step: ``job``,
``attempt``, ``pid``, ``node``, ``step``). A hold matches an arrival when every key of ``match`` equals the arrival's
value (or is in it, for a list); ``skip`` lets the first N matching arrivals through. Without a hold file nothing
waits: a task pays one existence check of ``faults/<point>.hold`` per shard or per training (none per step).
Layout: ``faults/<point>.hold`` (JSON), ``faults/<point>.arrivals/<n>.json`` (one write-once record per matching
arrival, numbered in arrival order).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any, Optional

from flows.storage.reads import is_local

__all__ = ["POINTS", "held", "wait_at", "Hold"]

log = logging.getLogger(__name__)

POINTS = ("teacher-shard", "train-step")
POLL_S = 0.05
DEFAULT_TIMEOUT_S = 600.0


def _paths(root: str, point: str) -> tuple[str, str]:
    base = f"{root.rstrip('/')}/faults" if root else "faults"
    return f"{base}/{point}.hold", f"{base}/{point}.arrivals"


def held(fs, root: str, point: str) -> Optional[dict]:
    """The hold on ``point`` in the store at ``root`` (None when there is none): one existence check."""
    hold_path, _ = _paths(root, point)
    try:
        if not fs.exists(hold_path):
            return None
        from flows.storage.reads import read_object

        doc = json.loads(read_object(fs, hold_path, 64 << 10, what=hold_path))
    except FileNotFoundError:
        return None
    return doc if isinstance(doc, dict) else {}


def _matches(hold: dict, info: dict) -> bool:
    for k, want in (hold.get("match") or {}).items():
        have = info.get(k)
        ok = have in want if isinstance(want, list) else have == want
        if not ok:
            return False
    return True


def _create_once(fs, path: str, data: bytes) -> bool:
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def wait_at(fs, root: str, point: str, info: dict, hold: Optional[dict] = None) -> bool:
    """If a hold on ``point`` matches ``info``: record the arrival and wait until the hold is released (its file
    removed) or its ``timeout_s`` passes. ``hold``: the hold already read by :func:`held` (else it is read here).
    Returns True when this arrival waited."""
    hold = held(fs, root, point) if hold is None else hold
    if hold is None or not _matches(hold, info):
        return False
    hold_path, arrivals = _paths(root, point)
    body = json.dumps({**info, "pid": os.getpid(), "time": time.time()}, sort_keys=True, default=str).encode()
    n = 0
    while not _create_once(fs, f"{arrivals}/{n:05d}.json", body):  # the arrival's number, never shared
        n += 1
    if n < int(hold.get("skip", 0)):
        return False
    deadline = time.monotonic() + float(hold.get("timeout_s", DEFAULT_TIMEOUT_S))
    log.info("fault barrier %s: waiting (arrival %d, %s)", point, n, info)
    while time.monotonic() < deadline:
        fs.invalidate_cache()
        if not fs.exists(hold_path):
            return True
        time.sleep(POLL_S)
    log.warning("fault barrier %s: nobody released it within %.0f s; going on", point, hold.get("timeout_s",
                                                                                                DEFAULT_TIMEOUT_S))
    return True


class Hold:
    """The test's side: ``with Hold(store_url, point, match=..., skip=0):`` places a hold (``faults/<point>.hold``),
    :meth:`wait_reached` returns the first arrival that waits there, :meth:`release` (or leaving the block) removes
    the hold so that every waiting task goes on."""

    def __init__(self, store_url: str, point: str, *, match: Optional[dict] = None, skip: int = 0,
                 storage_options: Optional[dict] = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        import fsspec

        from flows.storage.credentials import merge_s3_options

        if point not in POINTS:
            raise ValueError(f"unknown barrier point {point!r}; one of {POINTS}")
        options = dict(storage_options or {})
        if (fsspec.core.split_protocol(store_url)[0] or "file") in ("s3", "s3a"):  # as TeacherStore opens it
            options = {**merge_s3_options(options), "skip_instance_cache": True}
        self.fs, root = fsspec.core.url_to_fs(store_url, **options)
        self.root = root.rstrip("/")
        self.point, self.match, self.skip, self.timeout_s = point, dict(match or {}), int(skip), float(timeout_s)
        self.hold_path, self.arrivals = _paths(self.root, point)
        self.token = uuid.uuid4().hex

    def __enter__(self) -> "Hold":
        if is_local(self.fs):
            os.makedirs(os.path.dirname(self.hold_path), exist_ok=True)
        self.fs.pipe_file(self.hold_path, json.dumps({"match": self.match, "skip": self.skip, "token": self.token,
                                                      "timeout_s": self.timeout_s}).encode())
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def arrived(self) -> list[dict]:
        """Every matching arrival so far, in order (the first ``skip`` went on without waiting)."""
        self.fs.invalidate_cache()
        try:
            names = sorted(self.fs.ls(self.arrivals, detail=False))
        except FileNotFoundError:
            return []
        out = []
        for p in names:
            try:
                out.append(json.loads(self.fs.cat_file(p)))
            except (FileNotFoundError, ValueError):
                pass  # being written
        return out

    def wait_reached(self, timeout: float = 600.0, poll: float = POLL_S, alive=None) -> dict:
        """The first arrival that waits at the point (after ``skip``); TimeoutError if none within ``timeout`` s.
        ``alive()``, when given, is checked while waiting: False (the run ended) raises RuntimeError at once."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.arrived()
            if len(got) > self.skip:
                return got[self.skip]
            if alive is not None and not alive():
                raise RuntimeError(f"the run ended before any task reached the barrier {self.point!r}")
            time.sleep(poll)
        raise TimeoutError(f"no task reached the barrier {self.point!r} within {timeout:.0f} s")

    def release(self) -> None:
        try:
            self.fs.rm_file(self.hold_path)
        except FileNotFoundError:
            pass

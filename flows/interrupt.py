"""Stopping a command on Ctrl-C (SIGINT) or SIGTERM: within seconds, saying what was kept, leaving no process behind.

``amed distill`` starts processes of its own: a local Ray (GCS, raylet, workers, agents) and, without a Prefect server,
Prefect's temporary API server. Before issue 19, Ctrl-C did nothing for 30 s (the flow's threads waited on Ray tasks
and Python's exit joined them), SIGTERM crashed the flow through Prefect's SIGTERM bridge and the process hung printing
``--- Logging error ---``, and a killed command left Ray's agents and the temporary server running.

:class:`StopOnSignal` installs handlers for both signals in the main thread; the command runs its flow in another
thread (Prefect then leaves SIGTERM alone: its bridge is installed only from the main thread), so the main thread
only waits and the handler runs at once. The handler silences logging, marks the flow run cancelled (when the API
answers within 2 s), stops every descendant process (SIGTERM, then SIGKILL after ``grace`` seconds), prints what was
kept (committed work in the store: a rerun resumes from it, nothing partial is ever read) and exits with 128 + the
signal number. A second signal while it stops skips the waiting. Processes are found through /proc (Linux), else
``ps``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["StopOnSignal", "process_tree", "stop_processes", "kept_in_store"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for d in proc.iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
        return children
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        try:
            pid, ppid = (int(v) for v in line.split())
        except ValueError:
            continue
        children.setdefault(ppid, []).append(pid)
    return children


def process_tree(root: int) -> list[int]:
    """The descendants of ``root`` (not ``root`` itself), parents before their children."""
    children = _children_map()
    out, todo, seen = [], list(children.get(root, [])), {root}
    while todo:
        pid = todo.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def stop_processes(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM each of ``pids``, wait up to ``grace`` seconds, SIGKILL what is left; the PIDs that had to be killed."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if _alive(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return killed


def kept_in_store(store_url: str, storage_options: Optional[dict] = None, timeout: float = 3.0) -> str:
    """``8 teacher shards, 2 checkpoints and 7 scores committed in the store <url>`` (counted within ``timeout``
    seconds; the URL alone when the store does not answer in time)."""
    found: dict[str, int] = {}

    def count() -> None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(store_url), **(storage_options or {}))
        root = root.rstrip("/")
        for name, pattern in (("teacher shards", "teachers/*/manifest.d/*.json"),
                              ("checkpoints", "checkpoints/*/train.json"), ("scores", "evals/*.json")):
            found[name] = len(fs.glob(f"{root}/{pattern}"))

    t = threading.Thread(target=count, name="kept-in-store", daemon=True)
    t.start()
    t.join(timeout)
    if len(found) < 3:
        return f"committed work is in the store {store_url}"
    return (f"{found['teacher shards']} teacher shards, {found['checkpoints']} checkpoints and {found['scores']} scores "
            f"committed in the store {store_url}")


class StopOnSignal:
    """``with StopOnSignal("amed distill", kept=lambda: ...):`` stop this process and its descendants on SIGINT /
    SIGTERM (see the module docstring). ``kept()`` says what stays; ``flow_run_id`` (set it once known) names the
    Prefect flow run to mark cancelled. ``reinstall()`` puts the handlers back after a library replaced them (``ray.init``
    installs its own SIGTERM handler in the main thread). Outside the main thread it does nothing."""

    def __init__(self, what: str, kept: Callable[[], str], grace: float = 5.0):
        self.what, self.kept, self.grace = what, kept, grace
        self.flow_run_id: Optional[str] = None
        self._previous: dict[int, object] = {}
        self._stopping = False
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "StopOnSignal":
        if self.active:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def reinstall(self) -> None:
        if self.active:
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def __exit__(self, *exc) -> None:
        if self.active:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _say(self, text: str) -> None:
        try:
            os.write(2, text.encode())  # not print(): the interrupted main thread may hold sys.stderr's lock
        except OSError:
            pass

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        me = os.getpid()
        if self._stopping:  # a second signal: no more waiting
            for pid in process_tree(me):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(128 + signum)
        self._stopping = True
        t0 = time.monotonic()
        logging.disable(logging.CRITICAL)  # the flow's threads see their Ray tasks vanish: no tracebacks for that
        self._say(f"\n{self.what}: {name} received: stopping (its local Ray and temporary Prefect server too) ...\n")
        self._cancel_flow_run(name)
        pids = process_tree(me)
        killed = stop_processes(pids, self.grace)
        left = [p for p in process_tree(me) if p not in pids]  # started meanwhile (a Ray worker being spawned)
        killed += stop_processes(left, 1.0)
        try:
            kept = self.kept()
        except Exception as e:  # noqa: BLE001 - never block the exit on the summary
            kept = f"(could not list what was kept: {e})"
        self._say(f"{self.what}: stopped in {time.monotonic() - t0:.1f} s ({len(pids) + len(left)} processes ended"
                  f"{f', {len(killed)} with SIGKILL' if killed else ''}). Kept: {kept}; rerun the same command to "
                  "resume from it (nothing partial is ever read).\n")
        os._exit(128 + signum)

    def _cancel_flow_run(self, name: str) -> None:
        """Mark the flow run cancelled in its Prefect API (at most 2 s), so its UI does not show it running forever."""
        run_id = self.flow_run_id
        if not run_id:
            return

        def cancel() -> None:
            try:
                from prefect.client.orchestration import get_client
                from prefect.states import Cancelled

                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(run_id, Cancelled(message=f"{self.what} stopped by {name}"), force=True)
            except Exception:  # noqa: BLE001 - best effort: the processes are stopped either way
                pass

        t = threading.Thread(target=cancel, name="cancel-flow-run", daemon=True)
        t.start()
        t.join(2.0)

"""Shard claims: two writers of one teacher (two sweeps, two `amed teacher generate`) compute each shard once.

The commit protocol (:mod:`flows.storage.teachers`) already makes concurrent writers *safe*: the first object wins and
the other adopts it. Claims make them *economical*: before computing shard ``i`` a writer creates
``teachers/<hash>/claims/shard-<i>.json`` write-once (a hard link locally, ``If-None-Match: *`` on S3) naming itself
and an expiry; another writer that finds a live claim skips that shard, does the unclaimed ones first, and in the end
waits for the claimed ones to be committed (adopting them), or takes a claim over once it is stale. So two sweeps that
share a teacher split its shards between them, and each shard is generated once.

A claim is stale when its expiry has passed (the holder renews it every ``ttl / 4`` seconds from a thread while it
computes), or, on the same host, when its process is gone (a SIGKILLed writer is taken over at once). Claims are an
optimisation, never needed for correctness: on an object store whose conditional PUT races (moto's, under load), two
writers can both hold a claim, both compute the shard, and the commit protocol keeps exactly one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from typing import Callable, Iterable, Iterator, Optional

from flows.storage.locks import pid_alive

__all__ = ["Claim", "ClaimBook", "CLAIM_TTL"]

log = logging.getLogger(__name__)

CLAIM_TTL = float(os.environ.get("AMED_CLAIM_TTL", "120"))  # seconds a claim lives without renewal


class Claim:
    """A held claim on one shard: renewed from a thread until :meth:`release` (also on ``with`` exit)."""

    def __init__(self, book: "ClaimBook", index: int, body: dict):
        self.book, self.index, self.body = book, index, body
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"claim-{index}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        every = max(0.05, self.book.ttl / 4)
        while not self._stop.wait(every):
            body = {**self.body, "expires": time.time() + self.book.ttl}
            try:
                self.book.replace(self.book.path(self.index), json.dumps(body).encode())
                self.body = body
            except Exception as e:  # noqa: BLE001 - a failed renewal only risks a duplicate computation
                log.warning("could not renew the claim on shard %d: %s", self.index, e)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        path = self.book.path(self.index)
        try:
            mine = json.loads(self.book.read(path)).get("token") == self.body["token"]
        except (FileNotFoundError, ValueError):
            return
        if mine:
            try:
                self.book.remove(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ClaimBook:
    """Claims under one teacher folder. ``create(path, data) -> bool`` must be write-once (False when present);
    ``read`` raises FileNotFoundError when absent; ``committed(index)`` returns the shard's commit entry or None."""

    def __init__(self, folder: str, *, create: Callable[[str, bytes], bool], read: Callable[[str], bytes],
                 replace: Callable[[str, bytes], None], remove: Callable[[str], object],
                 committed: Callable[[int], Optional[dict]], ttl: float = CLAIM_TTL):
        self.folder, self.ttl = folder, ttl
        self.create, self.read, self.replace, self.remove, self.committed = create, read, replace, remove, committed
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def path(self, index: int) -> str:
        return f"{self.folder}/claims/shard-{index:05d}.json"

    def holder(self, index: int) -> Optional[dict]:
        """The live claim on ``index`` (any writer's, this process's included), or None when there is none or it is stale."""
        try:
            body = json.loads(self.read(self.path(index)))
        except FileNotFoundError:
            return None
        except ValueError:  # torn or foreign: treat as stale
            return None
        if not isinstance(body, dict) or float(body.get("expires", 0)) < time.time():
            return None
        if body.get("host") == self.owner["host"] and isinstance(body.get("pid"), int) and not pid_alive(body["pid"]):
            return None
        return body

    def try_claim(self, index: int) -> "Claim | dict | None":
        """A :class:`Claim` we now hold, the shard's commit entry when it is already committed, or None while a live
        claim of another writer holds it. A stale claim is removed (if it did not change meanwhile) and retaken."""
        for _ in range(3):
            entry = self.committed(index)
            if entry is not None:
                return entry
            body = {**self.owner, "token": uuid.uuid4().hex, "expires": time.time() + self.ttl, "index": index}
            if self.create(self.path(index), json.dumps(body).encode()):
                entry = self.committed(index)  # committed by the last holder just before we claimed
                claim = Claim(self, index, body)
                if entry is not None:
                    claim.release()
                    return entry
                return claim
            if self.holder(index) is not None:
                return None
            try:  # stale: take it over (a concurrent taker-over can only cause a duplicate computation)
                log.info("taking over a stale claim on shard %d (%s)", index, self.read(self.path(index))[:200])
                self.remove(self.path(index))
            except FileNotFoundError:
                pass
        return None

    def each(self, indices: Iterable[int], *, poll: float = 0.5,
             on_wait: Callable[[int, dict], None] | None = None) -> Iterator[tuple[int, "Claim | dict"]]:
        """Yield ``(index, claim_or_entry)`` once per index: a held :class:`Claim` (compute, commit, release) or the
        commit entry of a shard someone else committed. Shards another live writer holds are revisited after the
        rest; when only those are left, wait ``poll`` seconds between rounds."""
        queue, stalled, told = deque(indices), 0, set()
        while queue:
            i = queue.popleft()
            got = self.try_claim(i)
            if got is None:
                queue.append(i)
                stalled += 1
                if on_wait is not None and i not in told:
                    told.add(i)
                    on_wait(i, self.holder(i) or {})
                if stalled >= len(queue):
                    time.sleep(poll)
                    stalled = 0
                continue
            stalled = 0
            yield i, got

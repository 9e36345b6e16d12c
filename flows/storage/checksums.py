"""Every checksum flows computes: SHA-256 of bytes, of a set of files and of canonical JSON, and the teacher
shards' pair SHA-256 + XXH3-128.

Teacher-store entries record an object's SHA-256 (its content address, checked by ``verify`` /
``amed teacher verify``) and its XXH3-128 (the xxhash library; ~30 GB/s per core against SHA-256's ~2), which
readers check by default (``read_check="fast"``): a page-cache read runs at 10-20 GB/s, so SHA-256 on every read
would cost training ~10x the I/O time. XXH3-128 catches corruption and truncation just as well; what it does not
resist is a deliberate collision, which buys nothing here: whoever can rewrite a shard can rewrite its manifest
entry. ``read_check="full"`` checks both on every read; entries written before XXH3 fall back to SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import xxhash

__all__ = ["sha256", "files_sha256", "json_digest", "digests", "digests_async", "Checker", "READ_CHECKS"]

READ_CHECKS = ("fast", "full")


def sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def files_sha256(files: Mapping[str, bytes]) -> str:
    """One SHA-256 naming a set of files: over each (name, SHA-256 of its bytes), in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def json_digest(obj: Any, n: int = 16, *, compact: bool = True) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``obj`` as JSON with sorted keys (``compact``: no spaces
    after separators). Plan ids use the compact form, protocol and sweep hashes json's default one: both are
    stored, so neither may change."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":") if compact else None)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def digests(data: bytes | bytearray | memoryview) -> dict:
    """The two checksums a teacher manifest entry records: {"sha256": hex, "xxh3_128": hex}."""
    return {"sha256": sha256(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}


_HASHER = None


def _hash_executor():
    global _HASHER
    if _HASHER is None:
        from concurrent.futures import ThreadPoolExecutor

        _HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="teacher-sha256")
    return _HASHER


def digests_async(data: bytes | bytearray):
    """Both checksums on a helper thread (hashlib and xxhash release the GIL), so hashing overlaps the write."""
    return _hash_executor().submit(digests, data)


class Checker:
    """Checksums of an object fed chunk by chunk while it is read: XXH3-128 inline (the chunk is still in cache),
    SHA-256 on a helper thread overlapping the next chunk's read. A chunk's buffer must stay unchanged until
    the next ``update`` or ``hexdigests``."""

    def __init__(self, algos: tuple[str, ...]):
        self._x = xxhash.xxh3_128() if "xxh3_128" in algos else None
        self._s = hashlib.sha256() if "sha256" in algos else None
        self._pending = None

    def update(self, chunk) -> None:
        if self._x is not None:
            self._x.update(chunk)
        if self._s is not None:
            if self._pending is not None:
                self._pending.result()
            self._pending = _hash_executor().submit(self._s.update, chunk)

    def hexdigests(self) -> dict:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        out = {}
        if self._x is not None:
            out["xxh3_128"] = self._x.hexdigest()
        if self._s is not None:
            out["sha256"] = self._s.hexdigest()
        return out

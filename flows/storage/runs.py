"""The run store: everything of a sweep but teacher shards (those live in :mod:`flows.storage.teachers`).

Layout under the store URL: ``checkpoints/<id>/{predictor.safetensors, sampler.json, train.json}`` (``train.json``
is written last, with the sha256 of the other files: its presence is what "committed" means), ``evals/<id>.json``
(+ PNG grids), ``progress/<job>.json`` (pid, attempt, step), ``runs/<sweep>/results.json``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from amed_core.io import atomic_write_bytes, parse_json
from flows.storage.checksums import sha256
from flows.storage.reads import MAX_OBJECT_BYTES, read_object

__all__ = ["RunStore"]

MAX_RECORD_JSON_BYTES = 64 << 20  # results.json of a large sweep is a few MB


class RunStore:
    """fsspec folder for everything but teacher shards; writes are atomic (``amed_core.io`` locally, one PUT elsewhere).

    Layout: ``checkpoints/<id>/{predictor.safetensors, sampler.json, train.json}`` (``train.json`` is
    written last: its presence, with the sha256 of the other files, is what "done" means),
    ``evals/<id>.json``, ``progress/<job>.json``, ``runs/<sweep>/...``.
    """

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        import fsspec

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def url_of(self, key: str) -> str:
        return self.fs.unstrip_protocol(self.path(key)) if not self.local else self.path(key)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def get(self, key: str, limit: int = MAX_OBJECT_BYTES) -> bytes:
        """An object of at most ``limit`` bytes (:func:`flows.storage.reads.read_object`: locally a regular file, never
        a FIFO or a device; a larger object is refused before it is read)."""
        return read_object(self.fs, self.path(key), limit, what=key)

    def get_json(self, key: str) -> Any:
        """A JSON record (results.json, evals, progress, train.json): at most 64 MiB, nested at most 64 levels."""
        return parse_json(self.get(key, MAX_RECORD_JSON_BYTES), key, limit=MAX_RECORD_JSON_BYTES)

    def put(self, key: str, data: bytes) -> str:
        """Write atomically: readers see the old object or the whole new one, never a prefix."""
        path = self.path(key)
        if self.local:
            atomic_write_bytes(path, data)
        else:
            self.fs.pipe_file(path, data)
        return self.url_of(key)

    def put_json(self, key: str, obj: Any) -> str:
        return self.put(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self.path(key), recursive=True)

    def list(self, key: str) -> list[str]:
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(key), detail=False))
        except FileNotFoundError:
            return []

    # -- checkpoints and progress ------------------------------------------------------------------
    def committed_checkpoint(self, checkpoint: str) -> Optional[dict]:
        """The checkpoint's train.json when it and every file it lists (by sha256) are in the store, else None."""
        key = f"{checkpoint}/train.json"
        if not self.exists(key):
            return None
        try:
            rec = self.get_json(key)
        except ValueError:  # not a regular file, too large, not JSON: not a commit marker (retrained, replaced)
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("files", {}), dict):
            return None
        for name, digest in rec.get("files", {}).items():
            try:
                if sha256(self.get(f"{checkpoint}/{name}")) != digest:
                    return None
            except (FileNotFoundError, ValueError):  # missing, or not a regular file / too large: not committed
                return None
        return rec

    def checkpoint_files(self, checkpoint: str) -> dict[str, bytes]:
        """The files of a committed checkpoint, each checked against the sha256 train.json lists (raises otherwise)."""
        committed = self.get_json(f"{checkpoint}/train.json")  # only committed checkpoints are read
        files = {}
        for name, digest in committed["files"].items():
            files[name] = self.get(f"{checkpoint}/{name}")
            if sha256(files[name]) != digest:
                raise RuntimeError(f"{checkpoint}/{name}: sha256 differs from train.json (corrupted)")
        return files

    def progress(self, job_id: str) -> Optional[dict]:
        """What a running job last reported (``progress/<job>.json``), or None."""
        key = f"progress/{job_id}.json"
        return self.get_json(key) if self.exists(key) else None

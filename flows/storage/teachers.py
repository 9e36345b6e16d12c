"""Teacher trajectories on any fsspec filesystem (local paths, file://, s3://, memory://, ...).

Layout under the store URL::

    teachers/<spec-hash>/spec.json                  the TeacherSpec (canonical JSON; its sha256 is the folder name)
    teachers/<spec-hash>/shard-00000.safetensors    TeacherShard bytes (amed_core.shards)
    teachers/<spec-hash>/manifest.d/shard-00000.json  one commit record per shard: bytes, sha256, xxh3_128, nfe
    teachers/<spec-hash>/manifest.json              the merged manifest (rewritten after each commit)
    teachers/<spec-hash>/claims/shard-00000.json    who is computing a shard now (:mod:`flows.storage.claims`)

Commit protocol (a shard counts only once its manifest entry exists):
1. the shard object is created **write-once**: on a local disk it is written to a temporary name in the
   same folder and hard-linked to its final name (atomic, never clobbers); on object stores it is a single
   PUT with ``If-None-Match: *`` (s3fs ``mode="create"``), which S3 makes visible only when complete;
2. its entry ``manifest.d/shard-NNNNN.json`` is created write-once next, from the bytes that actually won;
3. ``manifest.json`` (the merged view) is rewritten last (by `generate`: every few shards and at the end).
Concurrent writers of one spec therefore never corrupt anything: the first writer of a shard wins, a
later one finds the object (or entry) present, re-reads and validates it, and adopts it; entries are
per-shard files, so there is no read-modify-write of a shared list. Readers take the union of
``manifest.json`` and ``manifest.d/`` (so a lagging ``manifest.json`` rewrite by one writer loses nothing),
check every shard's size and checksum (:mod:`flows.storage.checksums`) and raise :class:`ShardVerificationError`
on any mismatch. A shard object without an entry (writer killed between steps 1 and 2) is validated and adopted on
resume. Credentials and S3 options: :mod:`flows.storage.credentials`; streaming batches: :mod:`flows.storage.stream`;
generating a teacher into the store: :mod:`flows.storage.generate`.

Over ~400 lines on purpose: the commit protocol above is one piece (write-once objects, entries, the manifest
rewrite and the adoption of a dead writer's object all read each other's invariants).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping, Optional

import fsspec
import torch

from amed_core.io import MAX_JSON_BYTES, FileRefused, atomic_write_bytes, parse_json
from amed_core.shards import TeacherShard
from amed_core.teacher import TeacherBatch, TeacherSpec
from flows.storage.checksums import READ_CHECKS, digests, digests_async
from flows.storage.credentials import credential_problem, merge_s3_options, redact, refuse_url_secret
from flows.storage.errors import ShardVerificationError, StoreCredentialsError
from flows.storage.reads import fetch_checked, read_object

if TYPE_CHECKING:
    from flows.storage.claims import ClaimBook

__all__ = ["TeacherStore", "VerifyReport", "RepairReport", "BrokenSpecError"]

log = logging.getLogger(__name__)

_ENTRY_NAME = re.compile(r"^shard-(\d{5,})\.json$")
_ENTRY_FIELDS = {"index": int, "path": str, "bytes": int, "sha256": str, "num_samples": int, "nfe": int}
# Read limits (checked before reading): a spec, a commit record or a claim is a few KiB; the merged manifest ~250 bytes
# per shard; an uncommitted shard (adopted on resume) at most what its spec's shape, grid and dtype make.
MAX_RECORD_BYTES = 64 << 10
MAX_MANIFEST_BYTES = 64 << 20


def _shard_limit(spec: TeacherSpec) -> int:
    """Twice the bytes a shard of ``spec`` stores (states, noise, labels, seeds), plus room for its header."""
    return 2 * (spec.bytes_estimate() // max(spec.num_shards, 1) + 16 * spec.shard_size) + (1 << 20)


def _entry_problem(e, index: int | None, num_shards: int | None) -> str | None:
    """Why a commit record is not one (None when it is): fields and types, its index (the file's, in range)."""
    if not isinstance(e, dict):
        return "not a JSON object"
    for k, t in _ENTRY_FIELDS.items():
        if not isinstance(e.get(k), t) or isinstance(e.get(k), bool):
            return f"field {k!r} missing or not {t.__name__}"
    if index is not None and e["index"] != index:
        return f"records shard {e['index']} under the name of shard {index}"
    if num_shards is not None and not 0 <= e["index"] < num_shards:
        return f"shard {e['index']} is outside the spec's {num_shards} shards"
    if e["path"] != TeacherStore.shard_name(e["index"]):
        return f"points at {e['path'][:80]!r}, not at its own shard file"
    if e["bytes"] < 0:
        return "negative size"
    return None


def _non_finite(shard: TeacherShard) -> str | None:
    """Why a shard's trajectories are unusable (NaN/inf in its noise or states), else None."""
    for name in ("noise", "states"):
        t = getattr(shard, name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"its {name} hold {int((~torch.isfinite(t)).sum())} NaN/inf values"
    return None


class BrokenSpecError(ShardVerificationError):
    """A teacher's spec.json does not hash to its folder's name (edited, corrupted) or is not a spec at all. Nothing
    in that folder can be trusted; ``amed teacher generate ... --verify`` with the spec's own arguments rewrites it
    (the folder's name is the hash of the one right content)."""

    def __init__(self, spec_hash: str, message: str):
        super().__init__(message)
        self.spec_hash = spec_hash


@dataclass
class VerifyReport:
    """What `verify` found for one spec: ok shards, missing ones, bad ones (index -> reason)."""

    spec_hash: str
    num_shards: int
    ok: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)
    bytes: int = 0
    invalid: dict[str, str] = field(default_factory=dict)  # records that are not valid commit records (where -> why)

    @property
    def passed(self) -> bool:
        return not self.missing and not self.bad and not self.invalid


@dataclass
class RepairReport:
    """What `repair` did for one spec: shards that failed verification (index -> reason), records ignored as invalid
    (where -> reason), the files it removed, and how many committed shards remain."""

    spec_hash: str
    num_shards: int
    bad: dict[int, str] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    kept: int = 0


class TeacherStore:
    """Content-addressed teacher shards under an fsspec URL (see the module docstring for the protocol)."""

    def __init__(self, url: str, storage_options: Mapping | None = None, *, read_check: str = "fast"):
        if not isinstance(url, str) or not url.strip():
            raise ValueError("store url must be a path or an fsspec URL such as s3://bucket/prefix or memory://name")
        refuse_url_secret(url)
        if read_check not in READ_CHECKS:
            raise ValueError(f"read_check must be one of {READ_CHECKS} (fast: size + XXH3-128 on every read; full: also "
                             f"SHA-256), got {read_check!r}")
        self.read_check = read_check
        self.url = url.rstrip("/") or url
        protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        self.protocol = protocol
        if protocol in ("s3", "s3a"):
            options = merge_s3_options(storage_options)
            options.setdefault("skip_instance_cache", True)  # credentials/env may differ between stores
        else:
            options = dict(storage_options or {})
        self._options = options
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as e:
            raise ValueError(f"cannot open store {self.url!r}: {e}") from None
        self.root = self.root.rstrip("/")
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._num_shards: dict[str, int] = {}  # spec.json is write-once: its shard count never changes
        self._warned: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"TeacherStore({self.url!r}, storage_options={redact(self._options)!r})"

    # -- error translation ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str):
        try:
            yield
        except (StoreCredentialsError, ShardVerificationError, ValueError, FileExistsError, FileNotFoundError):
            raise
        except Exception as e:
            problem = credential_problem(e)
            if problem is not None:
                raise StoreCredentialsError(
                    f"no usable credentials for {self.url} while trying to {what} ({problem}). Set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment; credentials never go in storage "
                    "options or the sweep config (they are recorded). AWS_ENDPOINT_URL selects a non-AWS endpoint.") from None
            raise

    # -- paths ------------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.root else "/".join(parts)

    def spec_dir(self, spec_hash: str) -> str:
        return self._join("teachers", spec_hash)

    @staticmethod
    def shard_name(index: int) -> str:
        return f"shard-{index:05d}.safetensors"

    def shard_path(self, spec_hash: str, index: int) -> str:
        return f"{self.spec_dir(spec_hash)}/{self.shard_name(index)}"

    def _entry_path(self, spec_hash: str, index: int) -> str:
        return f"{self.spec_dir(spec_hash)}/manifest.d/shard-{index:05d}.json"

    # -- low-level writes -------------------------------------------------------------------------
    def _put_once(self, path: str, data: bytes) -> bool:
        """Create ``path`` with ``data`` unless it exists (atomic, no clobber); True when we created it."""
        with self._errors(f"write {path}"):
            if self._local:
                parent = os.path.dirname(path)
                os.makedirs(parent, exist_ok=True)
                tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
                try:
                    with open(tmp, "wb") as f:  # no fsync: a torn file after power loss fails its sha256 check
                        f.write(data)
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                    return True
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            return True

    def _put_replace(self, path: str, data: bytes) -> None:
        """Atomically replace ``path`` (temporary name + rename locally; one PUT on object stores)."""
        with self._errors(f"write {path}"):
            if self._local:
                atomic_write_bytes(path, data)
            else:
                self.fs.pipe_file(path, data)

    def _cat(self, path: str, limit: int = MAX_RECORD_BYTES) -> bytes:
        """An object of at most ``limit`` bytes (:func:`flows.storage.reads.read_object`): locally a regular file, never
        a FIFO, device or symlink; anything refused raises ShardVerificationError naming it and the fix."""
        with self._errors(f"read {path}"):
            try:
                return read_object(self.fs, path, limit, follow_symlinks=False)
            except FileRefused as e:
                raise ShardVerificationError(f"{e}; `amed teacher repair` removes it") from None

    def _cat_existing(self, path: str, attempts: int = 9, limit: int = MAX_RECORD_BYTES) -> bytes:
        """Read an object we know exists (listed, or refused as already present): a not-found is a transient
        read-after-write gap (moto's conditional PUT is not atomic under concurrency), so retry with backoff,
        dropping fsspec's cached listings first (a stale listing would answer not-found without asking)."""
        for k in range(attempts):
            try:
                return self._cat(path, limit)
            except FileNotFoundError:
                if k == attempts - 1:
                    raise
                self.fs.invalidate_cache(path)
                time.sleep(0.02 * 2**k)
        raise AssertionError("unreachable")

    def _exists(self, path: str) -> bool:
        with self._errors(f"look up {path}"):
            return self.fs.exists(path)

    # -- specs ------------------------------------------------------------------------------------
    def put_spec(self, spec: TeacherSpec) -> str:
        """Write spec.json (once); returns the spec hash."""
        h = spec.spec_hash
        path = f"{self.spec_dir(h)}/spec.json"
        if not self._put_once(path, spec.to_json().encode()):
            stored = self.get_spec(h)
            if stored.spec_hash != h:
                raise ShardVerificationError(f"{path} holds a different spec (hash {stored.spec_hash})")
        return h

    def get_spec(self, spec_hash: str) -> TeacherSpec:
        path = f"{self.spec_dir(spec_hash)}/spec.json"
        try:
            text = self._cat(path, MAX_JSON_BYTES)
        except FileNotFoundError:
            raise ValueError(f"no teacher {spec_hash} in {self.url} (see `amed teacher ls --store {self.url}`)") from None
        except ShardVerificationError as e:  # a FIFO, a symlink, too large
            raise BrokenSpecError(spec_hash, str(e)) from None
        try:
            spec = TeacherSpec.from_json(text)
        except ValueError as e:
            raise BrokenSpecError(spec_hash, f"{path} is not a teacher spec ({str(e)[:160]})") from None
        if spec.spec_hash != spec_hash:
            raise BrokenSpecError(spec_hash, f"{path} hashes to {spec.spec_hash[:16]}..., not to its folder name "
                                  f"{spec_hash[:16]}... (edited or corrupted)")
        return spec

    def restore_spec(self, spec: TeacherSpec) -> bool:
        """Rewrite ``spec``'s spec.json when what is stored is not it (edited, corrupted, a special file): the folder's
        name is the hash of the one right content, which the caller has. True when it was rewritten."""
        path = f"{self.spec_dir(spec.spec_hash)}/spec.json"
        try:
            self.get_spec(spec.spec_hash)
            return False
        except BrokenSpecError:
            pass
        if self._local and (os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path))):
            self._remove(path)
        self._put_replace(path, spec.to_json().encode())
        self._num_shards.pop(spec.spec_hash, None)
        return True

    def list_specs(self) -> list[str]:
        """Hashes of every teacher in the store (those with a spec.json)."""
        base = self._join("teachers")
        with self._errors(f"list {base}"):
            self.fs.invalidate_cache()
            if not self.fs.exists(base):
                if not self._local and self.root and not self.fs.exists(self.root.split("/", 1)[0]):
                    raise ValueError(f"store {self.url}: bucket {self.root.split('/', 1)[0]!r} does not exist; check "
                                     "--store / store_url (and AWS_ENDPOINT_URL), or create the bucket")
                return []
            out = []
            for p in self.fs.ls(base, detail=False):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                if self.fs.exists(f"{base}/{name}/spec.json"):
                    out.append(name)
        return sorted(out)

    def resolve(self, prefix: str) -> str:
        """The full hash of the one teacher whose hash starts with ``prefix``."""
        hits = [h for h in self.list_specs() if h.startswith(prefix)]
        if len(hits) != 1:
            raise ValueError(f"teacher hash prefix {prefix!r} matches {len(hits)} teachers in {self.url}; "
                             "give more characters (see `amed teacher ls`)")
        return hits[0]

    # -- manifest ---------------------------------------------------------------------------------
    def manifest(self, spec_hash: str) -> dict[int, dict]:
        """Committed shards: index -> entry {index, path, bytes, sha256, num_samples, nfe}.

        Union of manifest.json and manifest.d/ entries; two different records for one shard raise.
        """
        entries, invalid = self._manifest(spec_hash)
        for where, why in invalid.items():
            if (spec_hash, where) in self._warned:
                continue
            self._warned.add((spec_hash, where))
            log.warning("teacher %s: ignoring manifest record %s (%s); `amed teacher repair` removes it",
                        spec_hash[:12], where, why)
        return entries

    def _manifest(self, spec_hash: str, strict: bool = True) -> tuple[dict[int, dict], dict[str, str]]:
        """(valid entries, {record: why it is ignored}): records that are not commit records (a stray file, bad
        fields, an index outside the spec) never count as shards. Two different records for one shard raise; with
        ``strict=False`` (verify, repair) the commit record in manifest.d/ wins and the other is reported."""
        d = self.spec_dir(spec_hash)
        num_shards = self.num_shards(spec_hash)
        entries: dict[int, dict] = {}
        invalid: dict[str, str] = {}

        def add(e, where: str, index: int | None = None):
            why = _entry_problem(e, index, num_shards)
            if why is not None:
                invalid[where] = why
                return
            i = e["index"]
            if i in entries and (entries[i]["sha256"], entries[i]["bytes"]) != (e["sha256"], e["bytes"]) and not strict:
                invalid[f"manifest.json[{i:05d}]"] = f"disagrees with the commit record {where}"
            elif i in entries and (entries[i]["sha256"], entries[i]["bytes"]) != (e["sha256"], e["bytes"]):
                raise ShardVerificationError(f"conflicting manifest records for shard {i} of {spec_hash} ({where}); "
                                             f"run `amed teacher repair {spec_hash[:16]} --store {self.url}`")
            entries[i] = e

        with self._errors(f"read the manifest of {spec_hash}"):
            self.fs.invalidate_cache()
            try:
                merged = parse_json(self._cat(f"{d}/manifest.json", MAX_MANIFEST_BYTES), "manifest.json",
                                    limit=MAX_MANIFEST_BYTES)
                shards = merged.get("shards", {}) if isinstance(merged, dict) else None
                if not isinstance(shards, dict):
                    invalid["manifest.json"] = "not a manifest (no 'shards' object)"
                    shards = {}
                for key, e in shards.items():
                    add(e, f"manifest.json[{key}]")
            except FileNotFoundError:
                pass
            except (FileRefused, ShardVerificationError) as e:  # not JSON, too large or deep, a FIFO, a symlink
                invalid["manifest.json"] = str(e)[:200]
            for p, e in self._read_entries(self._entry_paths(d, invalid)):
                name = p.rsplit("/", 1)[-1]
                add(e, f"manifest.d/{name}", int(_ENTRY_NAME.match(name).group(1)))
        return dict(sorted(entries.items())), invalid

    def num_shards(self, spec_hash: str) -> int | None:
        """The spec's shard count (None while it has no spec.json)."""
        if spec_hash not in self._num_shards:
            try:
                self._num_shards[spec_hash] = self.get_spec(spec_hash).num_shards
            except ValueError:
                return None
        return self._num_shards[spec_hash]

    def _entry_paths(self, spec_dir: str, stray: dict | None = None) -> list[str]:
        """The commit records under ``spec_dir``/manifest.d (none when the folder does not exist); other files there are
        noted in ``stray`` and never read."""
        try:
            listed = self.fs.ls(f"{spec_dir}/manifest.d", detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in listed:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if _ENTRY_NAME.match(name):
                out.append(p)
            elif stray is not None and not name.startswith("."):  # .tmp files of a writer in progress
                stray[f"manifest.d/{name}"] = "not a commit record (stray file)"
        return out

    def _read_entries(self, paths: list[str]) -> Iterator[tuple[str, dict]]:
        """(path, entry) of each listed commit record, fetched together (a listed one not found yet is retried); a
        record that is not a regular file, too large or not JSON is yielded as None (reported by the caller)."""
        if not paths:
            return
        if self._local:  # one by one: fsspec's local cat would open a FIFO and wait for a writer
            fetched = {}
            for p in paths:
                try:
                    fetched[p] = self._cat(p)
                except (FileNotFoundError, ShardVerificationError) as e:
                    fetched[p] = e
        else:
            fetched = self.fs.cat(paths, on_error="return")
        for p, raw in fetched.items():
            if isinstance(raw, FileNotFoundError):
                raw = self._cat_existing(p)
            elif isinstance(raw, ShardVerificationError):
                yield p, None
                continue
            elif isinstance(raw, Exception):
                raise raw
            try:
                yield p, parse_json(raw, p, limit=MAX_RECORD_BYTES, max_depth=4)
            except FileRefused:
                yield p, None  # not a record: reported by the caller

    def _write_manifest(self, spec: TeacherSpec, known: list[dict] | None = None) -> dict[int, dict]:
        """Rewrite manifest.json as the union of itself and manifest.d/ (reads only entries it lacks; ``known``:
        entries this writer has just committed, so not read back)."""
        d = self.spec_dir(spec.spec_hash)
        with self._errors(f"update the manifest of {spec.spec_hash}"):
            self.fs.invalidate_cache()
            n = spec.num_shards
            try:
                merged = parse_json(self._cat(f"{d}/manifest.json", MAX_MANIFEST_BYTES), "manifest.json",
                                    limit=MAX_MANIFEST_BYTES)
                entries = {e["index"]: e for e in merged["shards"].values() if _entry_problem(e, None, n) is None}
            except FileNotFoundError:
                entries = {}
            except (ValueError, KeyError, TypeError, AttributeError, ShardVerificationError):
                entries = {}  # not a manifest (or a FIFO, a symlink, too large): rebuilt from manifest.d/
            entries.update({e["index"]: e for e in known or ()})
            new = [p for p in self._entry_paths(d)
                   if int(_ENTRY_NAME.match(p.rsplit("/", 1)[-1]).group(1)) not in entries]
            for p, e in self._read_entries(new):
                if _entry_problem(e, int(_ENTRY_NAME.match(p.rsplit("/", 1)[-1]).group(1)), n) is None:
                    entries[e["index"]] = e
        body = {
            "spec_hash": spec.spec_hash,
            "num_shards": spec.num_shards,
            "complete": len(entries) == spec.num_shards,
            "shards": {f"{i:05d}": e for i, e in sorted(entries.items())},
        }
        self._put_replace(f"{d}/manifest.json", json.dumps(body, indent=1, sort_keys=True).encode())
        return entries

    def flush_manifest(self, spec: TeacherSpec) -> dict[int, dict]:
        """Bring manifest.json up to date with manifest.d/ (the commit records); returns the entries."""
        return self._write_manifest(spec)

    def missing_shards(self, spec: TeacherSpec) -> list[int]:
        done = self.manifest(spec.spec_hash)
        return [i for i in range(spec.num_shards) if i not in done]

    # -- commit -----------------------------------------------------------------------------------
    def _entry_for(self, spec_hash: str, index: int, data: bytes) -> dict:
        shard = TeacherShard.from_bytes(data, expect_spec_hash=spec_hash, expect_index=index)
        problem = _non_finite(shard)
        if problem:  # an uncommitted object with NaN/inf is not adopted (adopt_shard removes it)
            raise ValueError(problem)
        return {"index": index, "path": self.shard_name(index), "bytes": len(data), **digests(data),
                "num_samples": shard.num_samples, "nfe": shard.nfe}

    def _commit_entry(self, spec: TeacherSpec, entry: dict, update_manifest: bool = True) -> dict:
        path = self._entry_path(spec.spec_hash, entry["index"])
        if not self._put_once(path, json.dumps(entry, sort_keys=True).encode()):
            try:
                other = parse_json(self._cat_existing(path), path, limit=MAX_RECORD_BYTES, max_depth=4)
            except (FileRefused, ShardVerificationError):
                other = None
            if _entry_problem(other, entry["index"], None) is not None:
                raise ShardVerificationError(f"{path} is not a valid commit record; run `amed teacher repair "
                                             f"{spec.spec_hash[:16]} --store {self.url}`")
            if (other["sha256"], other["bytes"]) != (entry["sha256"], entry["bytes"]):
                raise ShardVerificationError(f"shard {entry['index']} of {spec.spec_hash}: another writer recorded "
                                             f"sha256 {other['sha256']} for the object we read as {entry['sha256']}")
            entry = other
        if update_manifest:
            self._write_manifest(spec)
        return entry

    def committed_entry(self, spec: TeacherSpec, index: int) -> Optional[dict]:
        """Shard ``index``'s commit record when it is committed (and the record is valid), else None."""
        try:
            entry = parse_json(self._cat(self._entry_path(spec.spec_hash, index)), "commit record", max_depth=4)
        except FileNotFoundError:
            return None
        except (ValueError, ShardVerificationError):
            return None
        return entry if _entry_problem(entry, index, spec.num_shards) is None else None

    def claims(self, spec: TeacherSpec, ttl: float | None = None) -> "ClaimBook":
        """Claims on this spec's shards, so that concurrent writers compute each shard once
        (:mod:`flows.storage.claims`)."""
        from flows.storage.claims import CLAIM_TTL, ClaimBook

        return ClaimBook(self.spec_dir(spec.spec_hash), create=self._put_once, read=self._cat,
                         replace=self._put_replace, remove=self._remove_existing,
                         committed=lambda i: self.committed_entry(spec, i), ttl=ttl or CLAIM_TTL)

    def _remove_existing(self, path: str) -> None:
        if not self._remove(path):
            raise FileNotFoundError(path)

    def adopt_shard(self, spec: TeacherSpec, index: int, *, update_manifest: bool = True,
                    known_to_exist: bool = False) -> Optional[dict]:
        """Commit a shard object that exists without an entry (a writer died before its entry); None if absent/bad."""
        path = self.shard_path(spec.spec_hash, index)
        limit = _shard_limit(spec)
        try:
            data = self._cat_existing(path, limit=limit) if known_to_exist else self._cat(path, limit)
        except FileNotFoundError:
            return None
        except ShardVerificationError as e:  # a FIFO, device or symlink where an uncommitted shard would be
            log.warning("removing %s: %s", path, e)
            with self._errors(f"remove {path}"):
                self.fs.rm_file(path)
            return None
        try:
            entry = self._entry_for(spec.spec_hash, index, data)
        except ValueError as e:
            log.warning("removing unreadable uncommitted shard %s: %s", path, e)
            with self._errors(f"remove {path}"):
                self.fs.rm_file(path)
            return None
        return self._commit_entry(spec, entry, update_manifest)

    def commit_shard(self, spec: TeacherSpec, shard: TeacherShard, *, update_manifest: bool = True) -> dict:
        """Store one shard (write-once object, then its manifest entry, then manifest.json); returns the entry.

        update_manifest=False skips the manifest.json rewrite (the entry alone commits the shard; call
        :meth:`flush_manifest` later) - what `generate` does between its periodic flushes.
        """
        return self._finish_commit(spec, *self._put_shard(spec, shard), update_manifest)

    def commit_many(self, spec: TeacherSpec, shards, *, update_manifest: bool = True) -> list[dict]:
        """Commit several shards, pipelined: shard i's entry is written while shard i+1's object uploads
        (each entry still follows its own object). One manifest.json rewrite at the end."""
        from concurrent.futures import ThreadPoolExecutor

        entries: list[dict] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-commit") as pool:
            previous = None
            for shard in shards:
                put = self._put_shard(spec, shard)
                if previous is not None:
                    entries.append(previous.result())
                previous = pool.submit(self._finish_commit, spec, *put, False)
            if previous is not None:
                entries.append(previous.result())
        if update_manifest:
            self._write_manifest(spec, known=entries)
        return entries

    def _put_shard(self, spec: TeacherSpec, shard: TeacherShard):
        if shard.spec_hash != spec.spec_hash:
            raise ValueError(f"shard belongs to spec {shard.spec_hash}, not {spec.spec_hash}")
        problem = _non_finite(shard)
        if problem:  # never commit what training would diverge on
            raise ValueError(f"teacher shard {shard.index} of {spec.spec_hash[:16]}: {problem}; the teacher (its weights, "
                             "dtype or sigma range) is broken, nothing was stored")
        data = shard.to_buffer()
        digest = digests_async(data)
        created = self._put_once(self.shard_path(spec.spec_hash, shard.index), data)
        return shard, data, digest, created

    def _finish_commit(self, spec: TeacherSpec, shard: TeacherShard, data, digest, created: bool,
                       update_manifest: bool) -> dict:
        path = self.shard_path(spec.spec_hash, shard.index)
        if created:
            entry = {"index": shard.index, "path": self.shard_name(shard.index), "bytes": len(data),
                     **digest.result(), "num_samples": shard.num_samples, "nfe": shard.nfe}
            return self._commit_entry(spec, entry, update_manifest)
        # Another writer (or a killed one) created this object first: take its entry, or adopt what is there.
        try:
            try:
                entry = parse_json(self._cat(self._entry_path(spec.spec_hash, shard.index)), "commit record",
                                   max_depth=4)
            except (FileRefused, ShardVerificationError):
                entry = None
            if _entry_problem(entry, shard.index, spec.num_shards) is not None:
                raise ShardVerificationError(f"{self._entry_path(spec.spec_hash, shard.index)} is not a valid commit "
                                             f"record; run `amed teacher repair {spec.spec_hash[:16]} --store {self.url}`")
            if update_manifest:
                self._write_manifest(spec)
            return entry
        except FileNotFoundError:
            pass
        entry = self.adopt_shard(spec, shard.index, update_manifest=update_manifest, known_to_exist=True)
        if entry is None:  # it was unreadable and has been removed: write ours
            if not self._put_once(path, data):
                raise ShardVerificationError(f"{path}: concurrent writers keep replacing an unreadable shard")
            entry = {"index": shard.index, "path": self.shard_name(shard.index), "bytes": len(data),
                     **digests(data), "num_samples": shard.num_samples, "nfe": shard.nfe}
            entry = self._commit_entry(spec, entry, update_manifest)
        return entry

    # -- read -------------------------------------------------------------------------------------
    def read_shard(self, spec_hash: str, index: int, entry: dict | None = None, *, check: str | None = None) -> TeacherShard:
        """Load a committed shard, checking its size and checksum against its manifest entry (raises loudly).

        check: "fast" = XXH3-128 (SHA-256 for entries that lack it), "full" = SHA-256 and XXH3-128;
        default: the store's ``read_check``."""
        check = self.read_check if check is None else check
        if check not in READ_CHECKS:
            raise ValueError(f"check must be one of {READ_CHECKS}, got {check!r}")
        if entry is None:
            entry = self.manifest(spec_hash).get(index)
            if entry is None:
                raise ShardVerificationError(f"shard {index} of teacher {spec_hash} is not committed in {self.url}")
        algos = tuple(a for a in ("sha256", "xxh3_128") if a in entry)
        if check == "fast" and "xxh3_128" in algos:
            algos = ("xxh3_128",)
        path = self.shard_path(spec_hash, index)
        try:
            data, digests = self._fetch_checked(path, algos, entry["bytes"])
        except FileNotFoundError:
            raise ShardVerificationError(f"{path} is listed in the manifest but missing") from None
        if len(data) != entry["bytes"]:
            raise ShardVerificationError(f"{path}: {len(data)} bytes, manifest says {entry['bytes']} (truncated or replaced)")
        for algo in algos:
            if digests[algo] != entry[algo]:
                raise ShardVerificationError(f"{path}: {algo} {digests[algo]} does not match the manifest's {entry[algo]} "
                                             "(corrupted)")
        try:
            return TeacherShard.from_bytes(data, expect_spec_hash=spec_hash, expect_index=index)
        except ValueError as e:
            raise ShardVerificationError(f"{path}: {e}") from None

    def _fetch_checked(self, path: str, algos: tuple[str, ...], expect_bytes: int | None = None
                       ) -> tuple[bytearray | memoryview, dict]:
        with self._errors(f"read {path}"):
            return fetch_checked(self.fs, path, algos, local=self._local, protocol=self.protocol,
                                 expect_bytes=expect_bytes)

    def verify(self, spec_hash: str) -> VerifyReport:
        """Check every shard of a spec: present in the manifest, object present, size, SHA-256 (and XXH3-128), parse."""
        spec = self.get_spec(spec_hash)
        entries, invalid = self._manifest(spec_hash, strict=False)
        report = VerifyReport(spec_hash=spec_hash, num_shards=spec.num_shards, invalid=invalid)
        for i in range(spec.num_shards):
            if i not in entries:
                report.missing.append(i)
                continue
            try:
                shard = self.read_shard(spec_hash, i, entries[i], check="full")
                lo, hi = spec.shard_range(i)
                if shard.num_samples != hi - lo or not torch.equal(shard.seeds, spec.seeds(i)):
                    raise ShardVerificationError(f"shard {i} holds seeds other than the spec's {lo}..{hi - 1}")
                problem = _non_finite(shard)
                if problem:
                    raise ShardVerificationError(f"shard {i}: {problem}")
            except ShardVerificationError as e:
                report.bad[i] = str(e)
                continue
            report.ok.append(i)
            report.bytes += entries[i]["bytes"]
        return report

    def repair(self, spec_hash: str) -> "RepairReport":
        """Make the store's copy of a teacher consistent again, so that `generate` regenerates what is lost: every shard
        that fails :meth:`verify` loses its commit record and its object, records that are not commit records (stray
        files in manifest.d/, bad fields, indexes outside the spec) are removed, special files (FIFOs, symlinks) in
        place of shards are removed, and manifest.json is rewritten from what remains. Returns what was removed."""
        spec = self.get_spec(spec_hash)
        report = self.verify(spec_hash)
        entries, invalid = self._manifest(spec_hash, strict=False)
        d = self.spec_dir(spec_hash)
        out = RepairReport(spec_hash=spec_hash, num_shards=spec.num_shards, bad=dict(report.bad))
        for i in sorted(report.bad):  # record first (the shard stops counting), then the object
            for path in (self._entry_path(spec_hash, i), self.shard_path(spec_hash, i)):
                if self._remove(path):
                    out.removed.append(path[len(d) + 1:])
            entries.pop(i, None)
        for where in sorted(invalid):
            if where.startswith("manifest.d/"):
                if self._remove(f"{d}/{where}"):
                    out.removed.append(where)
            out.invalid[where] = invalid[where]
        if self._local:  # special files where uncommitted shards would be (read_shard refuses committed ones above)
            for p in self.fs.ls(d, detail=False):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("shard-") and name.endswith(".safetensors") and (
                        os.path.islink(p) or not os.path.isfile(p)) and self._remove(p):
                    out.removed.append(name)
        body = {"spec_hash": spec_hash, "num_shards": spec.num_shards, "complete": len(entries) == spec.num_shards,
                "shards": {f"{i:05d}": e for i, e in sorted(entries.items())}}
        self._put_replace(f"{d}/manifest.json", json.dumps(body, indent=1, sort_keys=True).encode())
        out.kept = len(entries)
        return out

    def _remove(self, path: str) -> bool:
        with self._errors(f"remove {path}"):
            try:
                if self._local and os.path.islink(path):
                    os.unlink(path)
                else:
                    self.fs.rm_file(path)
            except FileNotFoundError:
                return False
        return True

    def iter_batches(self, spec_hash: str, student_sigmas: torch.Tensor, batch_size: int, seed: int = 0,
                     **options) -> Iterator[TeacherBatch]:
        """Stream TeacherBatches at a student's grid: ``iter(BatchStream(self, ...))`` (see
        :class:`flows.storage.stream.BatchStream` for the options and the order)."""
        from flows.storage.stream import BatchStream

        return iter(BatchStream(self, spec_hash, student_sigmas, batch_size, seed, **options))

"""Teacher trajectories on any fsspec filesystem (local paths, file://, s3://, memory://, ...).

Layout under the store URL::

    teachers/<spec-hash>/spec.json                  the TeacherSpec (canonical JSON; its sha256 is the folder name)
    teachers/<spec-hash>/shard-00000.safetensors    TeacherShard bytes (amed_core.shards)
    teachers/<spec-hash>/manifest.d/shard-00000.json  one commit record per shard: bytes, sha256, xxh3_128, nfe
    teachers/<spec-hash>/manifest.json              the merged manifest (rewritten after each commit)

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
check every shard's size and checksum and raise :class:`ShardVerificationError` on any mismatch.
A shard object without an entry (writer killed between steps 1 and 2) is validated and adopted on resume.

Checksums: every entry records the object's SHA-256 (its content address, checked by ``verify`` /
``amed teacher verify``) and its XXH3-128 (the xxhash library; ~30 GB/s per core against SHA-256's ~2), which
readers check by default (``read_check="fast"``): a page-cache read runs at 10-20 GB/s, so SHA-256 on every read
would cost training ~10x the I/O time. XXH3-128 catches corruption and truncation just as well; what it does not
resist is a deliberate collision, which buys nothing here: whoever can rewrite a shard can rewrite its manifest
entry. ``read_check="full"`` checks both on every read; entries written before XXH3 fall back to SHA-256.

S3 options come from the standard environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_PROFILE``,
``AWS_REGION``/``AWS_DEFAULT_REGION``; keys via ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, read by botocore itself) overlaid by an explicit config dict; options are never
logged (``repr`` redacts secrets). Missing credentials raise :class:`StoreCredentialsError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

import fsspec
import numpy
import torch
import xxhash

from amed_core.shards import TeacherShard
from amed_core.teacher import TeacherBatch, TeacherSpec, generate_shard, student_indices

__all__ = [
    "TeacherStore",
    "StoreCredentialsError",
    "ShardVerificationError",
    "VerifyReport",
    "GenerateSummary",
    "generate",
    "s3_options_from_env",
    "redact",
]

log = logging.getLogger(__name__)

_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


class StoreCredentialsError(PermissionError):
    """The object store refused us for lack of (valid) credentials."""


class ShardVerificationError(RuntimeError):
    """A stored shard is missing, has the wrong size or checksum, or does not parse."""


def redact(options: Any) -> Any:
    """A copy of storage options with every secret-looking value replaced by '***' (safe to print)."""
    if isinstance(options, Mapping):
        return {k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) and not isinstance(v, Mapping) else redact(v))
                for k, v in options.items()}
    return options


def s3_options_from_env(env: Mapping[str, str] | None = None) -> dict:
    """s3fs options from the standard AWS environment variables (credentials themselves are left to botocore)."""
    env = os.environ if env is None else env
    opts: dict = {}
    client: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    if env.get("AWS_PROFILE"):
        opts["profile"] = env["AWS_PROFILE"]
    return opts


def _merge_s3_options(config: Mapping | None) -> dict:
    """Environment first, then the config section; shortcuts endpoint_url / region go to client_kwargs."""
    opts = s3_options_from_env()
    config = dict(config or {})
    client = dict(opts.get("client_kwargs", {}))
    for short, long in (("endpoint_url", "endpoint_url"), ("region", "region_name"), ("region_name", "region_name")):
        if short in config:
            client[long] = config.pop(short)
    client.update(config.pop("client_kwargs", {}) or {})
    opts.update(config)
    if client:
        opts["client_kwargs"] = client
    return opts


_CRED_CLASSES = ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "CredentialRetrievalError")
_CRED_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")


def _credential_problem(exc: BaseException) -> Optional[str]:
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        name = type(e).__name__
        if name in _CRED_CLASSES:
            return str(e)
        msg = str(e)
        if "Unable to locate credentials" in msg or any(c in msg for c in _CRED_CODES):
            return msg
        e = e.__cause__ or e.__context__
    return None


@dataclass
class VerifyReport:
    """What `verify` found for one spec: ok shards, missing ones, bad ones (index -> reason)."""

    spec_hash: str
    num_shards: int
    ok: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)
    bytes: int = 0

    @property
    def passed(self) -> bool:
        return not self.missing and not self.bad


@dataclass
class GenerateSummary:
    spec_hash: str
    trajectories: int
    shards: int
    shards_written: int
    shards_skipped: int
    bytes: int
    nfe_per_trajectory: int
    nfe_spent: int  # denoiser evaluations counted per sample, by this call

    def lines(self) -> list[str]:
        return [
            f"teacher {self.spec_hash}",
            f"trajectories: {self.trajectories}",
            f"shards: {self.shards} ({self.shards_written} written now, {self.shards_skipped} already there)",
            f"bytes: {self.bytes}",
            f"NFE per trajectory: {self.nfe_per_trajectory}; NFE spent now: {self.nfe_spent}",
        ]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digests(data: bytes | bytearray) -> dict:
    """The two checksums a manifest entry records: {"sha256": hex, "xxh3_128": hex}."""
    return {"sha256": _sha256(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}


READ_CHECKS = ("fast", "full")

_HASHER = None


def _hash_executor():
    global _HASHER
    if _HASHER is None:
        from concurrent.futures import ThreadPoolExecutor

        _HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="teacher-sha256")
    return _HASHER


def _digests_async(data: bytes | bytearray):
    """Both checksums on a helper thread (hashlib and xxhash release the GIL), so hashing overlaps the write."""
    return _hash_executor().submit(_digests, data)


def _uninitialized(size: int) -> memoryview:
    """A writable byte buffer that is not zero-filled first (``bytearray(n)`` would write every byte once more
    before the read fills it: at page-cache speeds that alone halves read throughput)."""
    return memoryview(numpy.empty(size, dtype=numpy.uint8))


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; older Pythons lack the name


def _populate(mm: mmap.mmap, path: str) -> None:
    """Map the whole file's cached pages (and read the rest, with sequential read-ahead) in one call rather than one
    page fault at a time (MADV_POPULATE_READ); elsewhere, or on older kernels, ask for read-ahead (MADV_WILLNEED)."""
    if not hasattr(mm, "madvise"):
        return
    with contextlib.suppress(OSError, AttributeError):
        mm.madvise(mmap.MADV_SEQUENTIAL)  # large read-ahead when the file is not cached
    if sys.platform.startswith("linux"):
        try:
            mm.madvise(_MADV_POPULATE_READ)
            return
        except OSError as e:
            if e.errno == errno.EFAULT:  # the file is shorter than when it was opened
                raise ShardVerificationError(f"{path}: changed size while being read") from None
    with contextlib.suppress(OSError, AttributeError):
        mm.madvise(mmap.MADV_WILLNEED)


def _map_checked(path: str, algos: tuple[str, ...], chunk: int) -> tuple[memoryview, dict]:
    """A local file mapped privately (copy-on-write: writable, never written back; like safetensors' own loader)
    and its checksums. Shards are write-once (a replacement is a new file), so the mapping stays what was hashed."""
    checker = _Checker(algos)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(bytearray()), checker.hexdigests()
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    _populate(mm, path)
    view = memoryview(mm)
    for pos in range(0, size, chunk):
        checker.update(view[pos:pos + chunk])
    return view, checker.hexdigests()


class _Checker:
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


class TeacherStore:
    """Content-addressed teacher shards under an fsspec URL (see the module docstring for the protocol)."""

    def __init__(self, url: str, storage_options: Mapping | None = None, *, read_check: str = "fast"):
        if not isinstance(url, str) or not url.strip():
            raise ValueError("store url must be a path or an fsspec URL such as s3://bucket/prefix or memory://name")
        if read_check not in READ_CHECKS:
            raise ValueError(f"read_check must be one of {READ_CHECKS} (fast: size + XXH3-128 on every read; full: also "
                             f"SHA-256), got {read_check!r}")
        self.read_check = read_check
        self.url = url.rstrip("/") or url
        protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        self.protocol = protocol
        if protocol in ("s3", "s3a"):
            options = _merge_s3_options(storage_options)
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
            problem = _credential_problem(e)
            if problem is not None:
                raise StoreCredentialsError(
                    f"no usable credentials for {self.url} while trying to {what} ({problem}). Set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass key/secret in the store's storage options; "
                    "AWS_ENDPOINT_URL selects a non-AWS endpoint.") from None
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
                parent = os.path.dirname(path)
                os.makedirs(parent, exist_ok=True)
                tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)

    def _cat(self, path: str) -> bytes:
        with self._errors(f"read {path}"):
            return self.fs.cat_file(path)

    def _cat_existing(self, path: str, attempts: int = 9) -> bytes:
        """Read an object we know exists (listed, or refused as already present): a not-found is a transient
        read-after-write gap (moto's conditional PUT is not atomic under concurrency), so retry with backoff,
        dropping fsspec's cached listings first (a stale listing would answer not-found without asking)."""
        for k in range(attempts):
            try:
                return self._cat(path)
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
            text = self._cat(path)
        except FileNotFoundError:
            raise ValueError(f"no teacher {spec_hash} in {self.url} (see `amed teacher ls --store {self.url}`)") from None
        spec = TeacherSpec.from_json(text)
        if spec.spec_hash != spec_hash:
            raise ShardVerificationError(f"{path} hashes to {spec.spec_hash}, not to its folder name {spec_hash}")
        return spec

    def list_specs(self) -> list[str]:
        """Hashes of every teacher in the store (those with a spec.json)."""
        base = self._join("teachers")
        with self._errors(f"list {base}"):
            self.fs.invalidate_cache()
            if not self.fs.exists(base):
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
        d = self.spec_dir(spec_hash)
        entries: dict[int, dict] = {}

        def add(e: dict, where: str):
            i = int(e["index"])
            if i in entries and (entries[i]["sha256"], entries[i]["bytes"]) != (e["sha256"], e["bytes"]):
                raise ShardVerificationError(f"conflicting manifest records for shard {i} of {spec_hash} ({where})")
            entries[i] = e

        with self._errors(f"read the manifest of {spec_hash}"):
            self.fs.invalidate_cache()
            try:
                merged = json.loads(self.fs.cat_file(f"{d}/manifest.json"))
                for e in merged.get("shards", {}).values():
                    add(e, "manifest.json")
            except FileNotFoundError:
                pass
            for p, e in self._read_entries(self._entry_paths(d)):
                add(e, p.rsplit("/", 1)[-1])
        return dict(sorted(entries.items()))

    def _entry_paths(self, spec_dir: str) -> list[str]:
        """The commit records under ``spec_dir``/manifest.d (none when the folder does not exist)."""
        try:
            return [p for p in self.fs.ls(f"{spec_dir}/manifest.d", detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return []

    def _read_entries(self, paths: list[str]) -> Iterator[tuple[str, dict]]:
        """(path, entry) of each listed commit record, fetched together (a listed one not found yet is retried)."""
        if not paths:
            return
        for p, raw in self.fs.cat(paths, on_error="return").items():
            if isinstance(raw, FileNotFoundError):
                raw = self._cat_existing(p)
            elif isinstance(raw, Exception):
                raise raw
            yield p, json.loads(raw)

    def _write_manifest(self, spec: TeacherSpec, known: list[dict] | None = None) -> dict[int, dict]:
        """Rewrite manifest.json as the union of itself and manifest.d/ (reads only entries it lacks; ``known``:
        entries this writer has just committed, so not read back)."""
        d = self.spec_dir(spec.spec_hash)
        with self._errors(f"update the manifest of {spec.spec_hash}"):
            self.fs.invalidate_cache()
            try:
                entries = {int(e["index"]): e for e in json.loads(self.fs.cat_file(f"{d}/manifest.json"))["shards"].values()}
            except FileNotFoundError:
                entries = {}
            entries.update({int(e["index"]): e for e in known or ()})
            new = [p for p in self._entry_paths(d) if int(p.rsplit("-", 1)[-1][:-5]) not in entries]
            for _, e in self._read_entries(new):
                entries[int(e["index"])] = e
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
        return {"index": index, "path": self.shard_name(index), "bytes": len(data), **_digests(data),
                "num_samples": shard.num_samples, "nfe": shard.nfe}

    def _commit_entry(self, spec: TeacherSpec, entry: dict, update_manifest: bool = True) -> dict:
        path = self._entry_path(spec.spec_hash, entry["index"])
        if not self._put_once(path, json.dumps(entry, sort_keys=True).encode()):
            other = json.loads(self._cat_existing(path))
            if (other["sha256"], other["bytes"]) != (entry["sha256"], entry["bytes"]):
                raise ShardVerificationError(f"shard {entry['index']} of {spec.spec_hash}: another writer recorded "
                                             f"sha256 {other['sha256']} for the object we read as {entry['sha256']}")
            entry = other
        if update_manifest:
            self._write_manifest(spec)
        return entry

    def adopt_shard(self, spec: TeacherSpec, index: int, *, update_manifest: bool = True,
                    known_to_exist: bool = False) -> Optional[dict]:
        """Commit a shard object that exists without an entry (a writer died before its entry); None if absent/bad."""
        path = self.shard_path(spec.spec_hash, index)
        try:
            data = self._cat_existing(path) if known_to_exist else self._cat(path)
        except FileNotFoundError:
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
        data = shard.to_buffer()
        digest = _digests_async(data)
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
            entry = json.loads(self._cat(self._entry_path(spec.spec_hash, shard.index)))
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
                     **_digests(data), "num_samples": shard.num_samples, "nfe": shard.nfe}
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
            data, digests = self._fetch_checked(path, algos)
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

    _CHUNK = 4 << 20  # local files: SHA-256 of one chunk (on a helper thread) overlaps the next chunk's page-in
    _S3_CHUNK = 8 << 20

    def _fetch_checked(self, path: str, algos: tuple[str, ...]) -> tuple[bytearray | memoryview, dict]:
        """The object's bytes (in a writable buffer the shard's tensors can view) and their checksums: local files are
        memory-mapped copy-on-write (the checksum is the only pass over the bytes; the shard's tensors view the page
        cache), S3 objects are checksummed chunk by chunk as they arrive; other filesystems: read, then checksum."""
        with self._errors(f"read {path}"):
            if self._local:
                return _map_checked(path, algos, self._CHUNK)
            if self.protocol in ("s3", "s3a") and hasattr(self.fs, "_call_s3"):
                from fsspec.asyn import sync

                return sync(self.fs.loop, self._s3_fetch_checked, path, algos)
            data = bytearray(self.fs.cat_file(path))
            checker = _Checker(algos)
            checker.update(data)
            return data, checker.hexdigests()

    async def _s3_fetch_checked(self, path: str, algos: tuple[str, ...]) -> tuple[memoryview, dict]:
        bucket, key, version = self.fs.split_path(path)
        kw = {"VersionId": version} if version else {}
        resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
        body = resp["Body"]
        size = int(resp["ContentLength"])
        view = _uninitialized(size)
        checker = _Checker(algos)
        pos = 0
        try:
            while True:
                chunk = await body.read(self._S3_CHUNK)
                if not chunk:
                    break
                if pos + len(chunk) > size:
                    raise ShardVerificationError(f"{path}: more bytes than its Content-Length {size}")
                view[pos:pos + len(chunk)] = chunk
                checker.update(view[pos:pos + len(chunk)])
                pos += len(chunk)
        finally:
            body.close()
        return view[:pos], checker.hexdigests()

    def verify(self, spec_hash: str) -> VerifyReport:
        """Check every shard of a spec: present in the manifest, object present, size, SHA-256 (and XXH3-128), parse."""
        spec = self.get_spec(spec_hash)
        entries = self.manifest(spec_hash)
        report = VerifyReport(spec_hash=spec_hash, num_shards=spec.num_shards)
        for i in range(spec.num_shards):
            if i not in entries:
                report.missing.append(i)
                continue
            try:
                shard = self.read_shard(spec_hash, i, entries[i], check="full")
                lo, hi = spec.shard_range(i)
                if shard.num_samples != hi - lo or not torch.equal(shard.seeds, spec.seeds(i)):
                    raise ShardVerificationError(f"shard {i} holds seeds other than the spec's {lo}..{hi - 1}")
            except ShardVerificationError as e:
                report.bad[i] = str(e)
                continue
            report.ok.append(i)
            report.bytes += entries[i]["bytes"]
        return report

    def iter_batches(self, spec_hash: str, student_sigmas: torch.Tensor, batch_size: int, seed: int = 0, *,
                     shuffle: bool = True, epochs: int | None = 1, num_trajectories: int | None = None,
                     window_shards: int = 2, prefetch: int = 2, dtype: torch.dtype | None = None,
                     drop_last: bool = False, require_complete: bool = True) -> Iterator[TeacherBatch]:
        """Stream TeacherBatches at a student's grid, shuffled across shards, with bounded memory.

        Shards are visited in a seeded random order per epoch; ``window_shards`` of them at a time are
        pooled and their trajectories shuffled (leftovers carry into the next window). A background thread
        downloads, verifies and slices up to ``prefetch`` shards ahead, so memory holds at most
        ``window_shards + prefetch + 1`` shards (at the student's grid). ``shuffle=False`` yields
        trajectories in global order (0, 1, 2, ...), which reproduces an on-the-fly teacher drawing the
        same seeds. ``num_trajectories`` uses only the first that many; ``epochs=None`` cycles forever.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if window_shards < 1 or prefetch < 1:
            raise ValueError("window_shards and prefetch must be >= 1")
        spec = self.get_spec(spec_hash)
        entries = self.manifest(spec_hash)
        total = spec.num_trajectories if num_trajectories is None else int(num_trajectories)
        if not (1 <= total <= spec.num_trajectories):
            raise ValueError(f"num_trajectories must be in [1, {spec.num_trajectories}], got {num_trajectories}")
        needed = [i for i in range(spec.num_shards) if spec.shard_range(i)[0] < total]
        missing = [i for i in needed if i not in entries]
        if missing and require_complete:
            raise ShardVerificationError(f"teacher {spec_hash} lacks shards {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                                         "run `amed teacher generate` again to finish it")
        needed = [i for i in needed if i in entries]
        idx = student_indices(spec.union_grid(), torch.as_tensor(student_sigmas, dtype=torch.float64))

        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        _END = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def producer():
            try:
                epoch = 0
                while epochs is None or epoch < epochs:
                    order = list(needed)
                    if shuffle:
                        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
                        order = [order[j] for j in torch.randperm(len(order), generator=g).tolist()]
                    for i in order:
                        shard = self.read_shard(spec_hash, i, entries[i])
                        lo, hi = spec.shard_range(i)
                        n = min(hi, total) - lo
                        batch = _slice_shard(shard, idx, n, dtype)
                        if not put(batch):
                            return
                    if not put(("epoch_end", epoch)):
                        return
                    epoch += 1
                put(_END)
            except BaseException as e:  # handed to the consumer, which re-raises
                put(e)

        thread = threading.Thread(target=producer, name=f"teacher-prefetch-{spec_hash[:8]}", daemon=True)
        thread.start()
        gen = torch.Generator().manual_seed(int(seed))
        pool: list[TeacherBatch] = []
        carry: Optional[TeacherBatch] = None

        def flush(final: bool) -> Iterator[TeacherBatch]:
            nonlocal pool, carry
            parts = ([carry] if carry is not None else []) + pool
            pool, carry = [], None
            if not parts:
                return
            noise = torch.cat([p.noise for p in parts])
            states = torch.cat([p.states for p in parts], dim=1)
            labels = None if parts[0].class_labels is None else torch.cat([p.class_labels for p in parts])
            n = noise.shape[0]
            perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            full = n - n % batch_size
            for lo in range(0, full, batch_size):
                j = perm[lo:lo + batch_size]
                yield TeacherBatch(noise=noise[j], class_labels=None if labels is None else labels[j], states=states[:, j])
            if full < n:
                j = perm[full:]
                rest = TeacherBatch(noise=noise[j], class_labels=None if labels is None else labels[j], states=states[:, j])
                if final:
                    if not drop_last:
                        yield rest
                else:
                    carry = rest

        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):  # end of an epoch: emit what is left
                    yield from flush(final=True)
                    continue
                pool.append(item)
                if len(pool) >= window_shards:
                    yield from flush(final=False)
        finally:
            stop.set()
            thread.join(timeout=5)


def _slice_shard(shard: TeacherShard, idx: torch.Tensor, n: int, dtype: torch.dtype | None) -> TeacherBatch:
    """One TeacherBatch holding the first n trajectories of a shard at the student's grid points idx."""
    from amed_core.teacher import _out_dtype

    out = _out_dtype(shard.noise.dtype, dtype)
    noise = shard.noise[:n].to(out)
    states = shard.states[idx][:, :n].to(out)
    states[0] = noise * shard.sigmas[0].to(out)
    labels = shard.one_hot_labels(out)
    return TeacherBatch(noise=noise, class_labels=None if labels is None else labels[:n], states=states)


def generate(store: TeacherStore, denoiser, spec: TeacherSpec, *, progress: bool = True, batch_size: int | None = None,
             shards: list[int] | None = None, device=None, manifest_every: int = 16) -> GenerateSummary:
    """Generate every missing shard of ``spec`` into ``store`` (resumes; skips committed shards).

    Each shard is committed by its own manifest entry; manifest.json (the merged view) is rewritten every
    ``manifest_every`` shards and at the end, even when interrupted.
    """
    from tqdm.auto import tqdm

    h = store.put_spec(spec)
    todo = store.missing_shards(spec)
    if shards is not None:
        todo = [i for i in todo if i in set(shards)]
    skipped = spec.num_shards - len(todo) if shards is None else len(set(shards) - set(todo))
    written, spent, nfe, pending = 0, 0, None, 0
    bar = tqdm(total=spec.num_trajectories, unit="traj", desc=f"teacher {h[:12]}", disable=not progress)
    if shards is None:
        bar.update(sum(spec.shard_range(i)[1] - spec.shard_range(i)[0] for i in range(spec.num_shards) if i not in todo))
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-commit")  # commit i while computing i+1
    in_flight = None

    def settle():
        nonlocal in_flight, pending
        if in_flight is not None:
            entry = in_flight.result()
            in_flight = None
            pending += 1
            bar.update(entry["num_samples"])
            if pending >= manifest_every:
                store.flush_manifest(spec)
                pending = 0

    try:
        for i in todo:
            entry = store.adopt_shard(spec, i, update_manifest=False)  # a killed writer may have left a complete object
            if entry is None:
                shard = generate_shard(denoiser, spec, i, batch_size=batch_size, device=device)
                settle()
                in_flight = pool.submit(store.commit_shard, spec, shard, update_manifest=False)
                spent += shard.total_nfe
                nfe = shard.nfe
                written += 1
            else:
                skipped += 1
                pending += 1
                bar.update(entry["num_samples"])
        settle()
    finally:
        try:
            if in_flight is not None:
                in_flight.result()
        finally:
            pool.shutdown(wait=True)
            bar.close()
            if pending or not todo or written:
                store.flush_manifest(spec)
    entries = store.manifest(h)
    if nfe is None and entries:
        nfe = next(iter(entries.values()))["nfe"]
    return GenerateSummary(spec_hash=h, trajectories=sum(e["num_samples"] for e in entries.values()),
                           shards=len(entries), shards_written=written, shards_skipped=skipped,
                           bytes=sum(e["bytes"] for e in entries.values()), nfe_per_trajectory=int(nfe or 0),
                           nfe_spent=spent)

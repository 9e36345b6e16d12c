"""Preflight of the store: before a sweep computes anything, prove the store answers and takes a write.

The registry's twin is ``flows.registry.tracking.check_registry``; both run at flow start (and in ``amed distill``
before Ray starts), so an unreachable or read-only store fails in seconds with one line, not after the teacher.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Optional

from flows.storage.credentials import credential_problem, merge_s3_options

__all__ = ["StoreUnreachable", "FolderUnusable", "check_store", "check_folder", "check_teacher_space", "human_bytes",
           "MIN_FREE_BYTES"]

#: What a run folder needs besides its teacher (measured, BENCHMARKS "Reliability, second pass"): Prefect's database,
#: MLflow's, checkpoints, evaluation records and PNGs of a quickstart-sized sweep, with room to spare.
MIN_FREE_BYTES = 64 << 20


class StoreUnreachable(ValueError):
    """The store cannot be reached or written (raised before any compute)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_store(url: str, storage_options: Optional[dict] = None, timeout: float = 20.0) -> str:
    """Write, read back and delete a small probe object under ``url`` within ``timeout`` seconds; return a one-line
    description. Raises :class:`StoreUnreachable` (a ValueError) naming the store, the cause and the fix."""
    import fsspec

    from flows.storage.credentials import refuse_url_secret

    refuse_url_secret(str(url))
    url = str(url).rstrip("/") or str(url)
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    options = merge_s3_options(storage_options) if protocol in ("s3", "s3a") else dict(storage_options or {})
    if protocol in ("s3", "s3a"):
        options.setdefault("skip_instance_cache", True)
        # fail fast: no long botocore retry loop against a dead endpoint
        cfg = dict(options.get("config_kwargs") or {})
        cfg.setdefault("connect_timeout", max(1, int(timeout / 4)))
        cfg.setdefault("read_timeout", max(1, int(timeout / 2)))
        cfg.setdefault("retries", {"max_attempts": 1})
        options["config_kwargs"] = cfg
    fix = ("check store_url / --store / AMED_STORE_URL, that the server is up (AWS_ENDPOINT_URL for S3-compatible "
           "servers) and that you may write there")
    result: dict = {}

    def probe() -> None:
        try:
            fs, root = fsspec.core.url_to_fs(url, **options)
            root = root.rstrip("/")
            path = f"{root}/.amed-preflight-{uuid.uuid4().hex}" if root else f".amed-preflight-{uuid.uuid4().hex}"
            if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
                fs.makedirs(root, exist_ok=True)
            t0 = time.perf_counter()
            fs.pipe_file(path, b"amed preflight\n")
            try:
                if fs.cat_file(path) != b"amed preflight\n":
                    raise OSError("the probe object read back different bytes")
            finally:
                try:
                    fs.rm_file(path)
                except FileNotFoundError:
                    pass
            result["seconds"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - reported below as one line
            result["error"] = e

    t = threading.Thread(target=probe, name="store-preflight", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise StoreUnreachable(f"store {url} did not answer within {timeout:g} s: {fix}")
    e = result.get("error")
    if e is not None:
        problem = credential_problem(e)
        if problem is not None:
            raise StoreUnreachable(f"store {url} refused our credentials ({_one_line(problem)}): set AWS_ACCESS_KEY_ID / "
                                   "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment")
        if isinstance(e, PermissionError):
            raise StoreUnreachable(f"store {url} is not writable ({_one_line(e)}): {fix}")
        if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
            raise StoreUnreachable(f"store {url} has no space left: free space or point the store elsewhere")
        if isinstance(e, (ImportError, ValueError)) and not isinstance(e, StoreUnreachable):
            raise StoreUnreachable(f"store {url} cannot be opened ({_one_line(e)}): {fix}")
        raise StoreUnreachable(f"store {url} is not usable ({type(e).__name__}: {_one_line(e)}): {fix}")
    return f"store {url} (write + read in {result['seconds']:.2f} s)"


class FolderUnusable(ValueError):
    """A local output folder cannot be created or written, or lacks the free space a run needs (raised before work)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_folder(path, need_bytes: int = MIN_FREE_BYTES, what: str = "--out") -> str:
    """Before any work: ``path`` (a local folder, created if missing) takes a write and its filesystem has at least
    ``need_bytes`` free. Raises :class:`FolderUnusable` with one line naming the folder, the cause and the free space
    needed (a full disk once restarted Prefect's ephemeral server ten times and ended in 15 tracebacks; a read-only one
    in an OSError traceback). Returns a one-line description."""
    import errno
    import os
    import shutil
    from pathlib import Path

    folder = Path(path).absolute()
    hint = {errno.EROFS: "it is on a read-only filesystem", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOSPC: "no space left on its filesystem",
            errno.EDQUOT: "disk quota exceeded"}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".amed-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"amed")
                f.flush()
                os.fsync(f.fileno())
        finally:
            try:
                os.unlink(probe)
            except FileNotFoundError:
                pass
    except OSError as e:
        why = hint.get(e.errno, e.strerror or type(e).__name__)
        raise FolderUnusable(f"{what} {folder} cannot be written ({why}); choose a writable folder") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise FolderUnusable(f"{what} {folder} has {human_bytes(free)} free on its filesystem; this run needs about "
                             f"{human_bytes(need_bytes)}: free space or choose another {what}")
    return f"{folder} ({human_bytes(free)} free)"


def check_teacher_space(teachers) -> None:
    """Before the teacher stage: a local store has room for the shards still to write (``TeacherSpec.bytes_estimate``
    of each teacher not yet complete, plus :data:`MIN_FREE_BYTES`). ``teachers``: the plan's TeacherJobs. Object stores
    are not checked (they do not fill up the same way). Raises :class:`FolderUnusable` in one line."""
    import fsspec

    from amed_core.teacher import TeacherSpec
    from flows.storage.reads import is_local
    from flows.storage.teachers import TeacherStore

    need: dict[str, int] = {}
    for job in teachers:
        fs, root = fsspec.core.url_to_fs(job.store_url, **(job.storage_options or {}))
        if not is_local(fs):
            continue
        spec = TeacherSpec.from_json(job.spec_json)
        store = TeacherStore(job.store_url, job.storage_options)
        done = store.manifest(spec.spec_hash) if spec.spec_hash in store.list_specs() else {}
        left = spec.bytes_estimate() * (spec.num_shards - len(done)) // max(spec.num_shards, 1)
        need[root] = need.get(root, 0) + left
    for root, left in need.items():
        if left:
            check_folder(root, left + MIN_FREE_BYTES, "store")

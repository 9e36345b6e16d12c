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

__all__ = ["StoreUnreachable", "check_store"]


class StoreUnreachable(ValueError):
    """The store cannot be reached or written (raised before any compute)."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_store(url: str, storage_options: Optional[dict] = None, timeout: float = 20.0) -> str:
    """Write, read back and delete a small probe object under ``url`` within ``timeout`` seconds; return a one-line
    description. Raises :class:`StoreUnreachable` (a ValueError) naming the store, the cause and the fix."""
    import fsspec

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

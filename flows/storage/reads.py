"""Reading objects with limits: :func:`read_object` is the fsspec counterpart of :func:`amed_core.io.read_limited`
(local paths go through it: regular files only, the size checked before reading; other filesystems read at most
``limit + 1`` bytes with one ranged GET), and :func:`fetch_checked` reads a shard and its checksums in one pass: local
files memory-mapped copy-on-write (the checksum is the only pass over the bytes; a shard's tensors view the page
cache), S3 objects checksummed chunk by chunk as they arrive, other filesystems read whole, then checksummed. Every
reader is given the size it expects or allows, so a sparse terabyte or ``/dev/zero`` in place of an object is refused
before it is read."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys

import numpy

from amed_core.io import FileRefused, open_limited, read_limited
from flows.storage.checksums import Checker
from flows.storage.errors import ShardVerificationError

__all__ = ["fetch_checked", "open_regular", "read_regular", "read_object", "is_local", "LOCAL_CHUNK", "S3_CHUNK",
           "MAX_OBJECT_BYTES"]

#: The default bound of :func:`read_object` (checkpoints, evaluation records, partial FID statistics are far smaller).
MAX_OBJECT_BYTES = 1 << 30


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def read_object(fs, path: str, limit: int = MAX_OBJECT_BYTES, *, what: str | None = None,
                follow_symlinks: bool = True) -> bytes:
    """The bytes of ``path`` on ``fs`` if it holds at most ``limit`` bytes, else :class:`amed_core.io.FileRefused`
    naming ``what`` (default: the path). Local files: :func:`amed_core.io.read_limited` (regular files only, never a
    FIFO or device; ``follow_symlinks=False`` for store objects). Elsewhere one ranged GET of ``limit + 1`` bytes, so
    an object larger than the limit is refused after ``limit + 1`` bytes, never read whole. A missing object raises
    FileNotFoundError."""
    if is_local(fs):
        return read_limited(path, limit, what=what or path, follow_symlinks=follow_symlinks)
    try:
        data = fs.cat_file(path, start=0, end=limit + 1)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - S3 answers a range on an empty object with 416 InvalidRange
        if "range" not in str(e).lower() or fs.size(path) != 0:
            raise
        data = b""
    if len(data) > limit:
        raise FileRefused(f"{what or path} is larger than {limit} bytes; at most {limit} are read for it (is it the "
                          "right object?)")
    return data

LOCAL_CHUNK = 4 << 20  # local files: SHA-256 of one chunk (on a helper thread) overlaps the next chunk's page-in
S3_CHUNK = 8 << 20


def fetch_checked(fs, path: str, algos: tuple[str, ...], *, local: bool, protocol: str,
                  expect_bytes: int | None = None) -> tuple[bytearray | memoryview, dict]:
    """The object's bytes (in a writable buffer the shard's tensors can view) and their checksums. With
    ``expect_bytes`` (the manifest's size) an object of another size is refused before its bytes are read."""
    if local:
        return _map_checked(path, algos, LOCAL_CHUNK, expect_bytes)
    if protocol in ("s3", "s3a") and hasattr(fs, "_call_s3"):
        from fsspec.asyn import sync

        return sync(fs.loop, _s3_fetch_checked, fs, path, algos, expect_bytes)
    if expect_bytes is not None and fs.size(path) != expect_bytes:
        raise ShardVerificationError(f"{path}: {fs.size(path)} bytes, the manifest says {expect_bytes} (truncated or "
                                     "replaced)")
    data = bytearray(fs.cat_file(path))
    checker = Checker(algos)
    checker.update(data)
    return data, checker.hexdigests()


def open_regular(path: str, limit: int = 1 << 62):
    """Open a store object on a local disk only if it is a regular file of at most ``limit`` bytes, not through a
    symlink (:func:`amed_core.io.open_limited`): a FIFO put in place of a shard would block the reader forever, a
    device never end, a symlink lead outside the store. Refusals are :class:`ShardVerificationError` with the fix."""
    try:
        return open_limited(path, limit, follow_symlinks=False)
    except FileRefused as e:
        raise ShardVerificationError(f"{e}; remove it (`amed teacher repair`)") from None


def read_regular(path: str, limit: int = 1 << 62) -> bytes:
    """The bytes of a local store object (see :func:`open_regular`)."""
    try:
        return read_limited(path, limit, follow_symlinks=False)
    except FileRefused as e:
        raise ShardVerificationError(f"{e}; remove it (`amed teacher repair`)") from None


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


def _map_checked(path: str, algos: tuple[str, ...], chunk: int, expect_bytes: int | None = None
                 ) -> tuple[memoryview, dict]:
    """A local file mapped privately (copy-on-write: writable, never written back; like safetensors' own loader)
    and its checksums. Shards are write-once (a replacement is a new file), so the mapping stays what was hashed."""
    checker = Checker(algos)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if expect_bytes is not None and size != expect_bytes:
            raise ShardVerificationError(f"{path}: {size} bytes, the manifest says {expect_bytes} (truncated or "
                                         "replaced)")
        if size == 0:
            return memoryview(bytearray()), checker.hexdigests()
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    _populate(mm, path)
    view = memoryview(mm)
    for pos in range(0, size, chunk):
        checker.update(view[pos:pos + chunk])
    return view, checker.hexdigests()


async def _s3_fetch_checked(fs, path: str, algos: tuple[str, ...], expect_bytes: int | None = None
                            ) -> tuple[memoryview, dict]:
    bucket, key, version = fs.split_path(path)
    kw = {"VersionId": version} if version else {}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
    body = resp["Body"]
    size = int(resp["ContentLength"])
    if expect_bytes is not None and size != expect_bytes:
        body.close()
        raise ShardVerificationError(f"{path}: {size} bytes, the manifest says {expect_bytes} (truncated or replaced)")
    view = _uninitialized(size)
    checker = Checker(algos)
    pos = 0
    try:
        while True:
            chunk = await body.read(S3_CHUNK)
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

"""Reading an object and its checksums in one pass: local files memory-mapped copy-on-write (the checksum is the only
pass over the bytes; a shard's tensors view the page cache), S3 objects checksummed chunk by chunk as they arrive,
other filesystems read whole, then checksummed."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys

import numpy

from flows.storage.checksums import Checker
from flows.storage.errors import ShardVerificationError

__all__ = ["fetch_checked", "open_regular", "read_regular", "LOCAL_CHUNK", "S3_CHUNK"]

LOCAL_CHUNK = 4 << 20  # local files: SHA-256 of one chunk (on a helper thread) overlaps the next chunk's page-in
S3_CHUNK = 8 << 20


def fetch_checked(fs, path: str, algos: tuple[str, ...], *, local: bool, protocol: str) -> tuple[bytearray | memoryview, dict]:
    """The object's bytes (in a writable buffer the shard's tensors can view) and their checksums."""
    if local:
        return _map_checked(path, algos, LOCAL_CHUNK)
    if protocol in ("s3", "s3a") and hasattr(fs, "_call_s3"):
        from fsspec.asyn import sync

        return sync(fs.loop, _s3_fetch_checked, fs, path, algos)
    data = bytearray(fs.cat_file(path))
    checker = Checker(algos)
    checker.update(data)
    return data, checker.hexdigests()


def open_regular(path: str):
    """Open a local file for reading only if it is a regular file, not through a symlink: a FIFO put in place of a
    shard would block the reader forever, a device never end, a symlink lead outside the store."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ShardVerificationError(f"{path} is a symbolic link (store objects are regular files); remove it "
                                         "(`amed teacher repair`)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ShardVerificationError(f"{path} is not a regular file (a FIFO, device or folder); remove it "
                                     "(`amed teacher repair`)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str) -> bytes:
    """The bytes of a local regular file (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


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
    checker = Checker(algos)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(bytearray()), checker.hexdigests()
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    _populate(mm, path)
    view = memoryview(mm)
    for pos in range(0, size, chunk):
        checker.update(view[pos:pos + chunk])
    return view, checker.hexdigests()


async def _s3_fetch_checked(fs, path: str, algos: tuple[str, ...]) -> tuple[memoryview, dict]:
    bucket, key, version = fs.split_path(path)
    kw = {"VersionId": version} if version else {}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **kw)
    body = resp["Body"]
    size = int(resp["ContentLength"])
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

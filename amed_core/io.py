"""Local files: atomic writes and bounded reads, the one implementation amed_core (and flows) use.

Writes: a temporary file with a unique name in the target's folder is filled, flushed to disk (fsync), given ordinary
permissions (0666 less the umask; ``mkstemp`` creates 0600) and renamed over the target with ``os.replace``; on
any error the temporary file is removed and the target is untouched. Readers never see a partial file, and two
writers of the same path never share a temporary file.

Reads (every checkpoint, config and data file amed_core or flows reads from a local path goes through these):
:func:`open_limited` / :func:`read_limited` open a file without blocking (``O_NONBLOCK``: a FIFO never waits for a
writer), refuse anything but a regular file (a FIFO, a device such as a symlink to ``/dev/zero``, a socket, a folder)
and a file over its size limit before a byte is read, and read at most ``limit + 1`` bytes (a file that grows
meanwhile is refused too). :func:`parse_json` decodes UTF-8 JSON with a bound on its nesting depth, and
:func:`safetensors_layout` / :func:`load_safetensors` check a safetensors buffer's header against its length (and
its tensors for NaN/inf) before anything is allocated. Each refusal is one :class:`FileRefused` line (a ValueError)
naming the file and the fix. The fsspec counterpart for URLs and stores is :func:`flows.storage.reads.read_object`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "FileRefused", "open_limited", "read_limited",
           "parse_json", "json_depth", "safetensors_layout", "load_safetensors", "check_finite", "MAX_JSON_BYTES",
           "MAX_JSON_DEPTH", "MAX_WEIGHTS_BYTES"]

#: A JSON document amed writes (sampler.json, epd.json, spec.json, a commit record) is a few KiB.
MAX_JSON_BYTES = 1 << 20
#: The deepest nesting any of our JSON documents has is 4; 64 leaves room and keeps every walk of it shallow.
MAX_JSON_DEPTH = 64
#: A sampler's weights (an AMED predictor, EPD tables) are KiB to a few MiB.
MAX_WEIGHTS_BYTES = 256 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file (a path string, same folder and suffix),
    which is fsynced and then replaces ``path``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON with sorted keys and a final newline, written atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------------
# Bounded reads.

class FileRefused(ValueError):
    """A file refused before or while reading it (not a regular file, too large, nested too deep, not JSON, NaN/inf
    weights): one line naming the file and the fix."""


def _label(path, what: str | None) -> str:
    return f"{what} ({path})" if what and str(path) not in str(what) else str(what or path)


def open_limited(path: str | os.PathLike, limit: int, *, what: str | None = None, follow_symlinks: bool = True):
    """Open a local file for reading in binary mode if it is a regular file of at most ``limit`` bytes.

    ``O_NONBLOCK`` keeps the open of a FIFO from waiting for a writer; the file's type and size come from ``fstat`` of
    the opened descriptor (no race with a rename in between). ``follow_symlinks=False`` also refuses a symbolic link
    (store objects). ``what`` names the file in errors (e.g. ``"sampler.json"``). A missing file raises
    FileNotFoundError (the caller knows what it means); everything else refused raises :class:`FileRefused`."""
    label = _label(path, what)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_symlinks:
            raise FileRefused(f"{label} is a symbolic link; only regular files are read here") from None
        if e.errno == errno.ENXIO:  # a socket, or a FIFO opened elsewhere for writing only
            raise FileRefused(f"{label} is not a regular file (a socket or FIFO); only regular files are read") from None
        raise FileRefused(f"{label} cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket")
            raise FileRefused(f"{label} is not a regular file ({kind}); only regular files are read: put the real file "
                              "there")
        if st.st_size > limit:
            raise FileRefused(f"{label} is {st.st_size} bytes; at most {limit} are read for it (is it the right file?)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str | os.PathLike, limit: int, *, what: str | None = None, follow_symlinks: bool = True) -> bytes:
    """The bytes of a local regular file of at most ``limit`` bytes (:func:`open_limited`); at most ``limit + 1``
    bytes are read, so a file that grows after the check is refused, never read without end."""
    with open_limited(path, limit, what=what, follow_symlinks=follow_symlinks) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileRefused(f"{_label(path, what)} grew past {limit} bytes while being read; at most {limit} are read")
    return data


def json_depth(obj: Any) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, todo = 0, [(obj, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
            deepest = max(deepest, d + 1)
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)
            deepest = max(deepest, d + 1)
    return deepest


def parse_json(raw: bytes | bytearray | memoryview | str, what: str, *, limit: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``raw`` as JSON: at most ``limit`` bytes, UTF-8, nested at most ``max_depth`` levels. Every failure is one
    :class:`FileRefused` line naming ``what`` (a pickle or other binary data is "not UTF-8 text", a 100k-deep document
    "nested deeper than ...", never a RecursionError)."""
    if len(raw) > limit:
        raise FileRefused(f"{what} is {len(raw)} bytes; at most {limit} are read for it (is it the right file?)")
    if not isinstance(raw, str):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise FileRefused(f"{what} is not UTF-8 text (binary data, e.g. a pickle); it must be a JSON document") from None
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise FileRefused(f"{what} is nested deeper than {max_depth} levels; it is not a file amed wrote") from None
    except ValueError as e:
        raise FileRefused(f"{what} is not valid JSON ({str(e)[:120]})") from None
    if json_depth(doc) > max_depth:
        raise FileRefused(f"{what} is nested deeper than {max_depth} levels; it is not a file amed wrote")
    return doc


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_layout(data: bytes | memoryview, what: str, *, max_header: int = MAX_JSON_BYTES
                       ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors buffer, checked against its length before safetensors reads it:
    header size, JSON, dtypes, shapes and data offsets (contiguous, in bounds, the size each shape needs)."""
    import struct

    if len(data) < 8:
        raise FileRefused(f"{what} is {len(data)} bytes: truncated or empty (re-fetch or re-train the checkpoint)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > len(data) - 8 or n > max_header:
        raise FileRefused(f"{what}: its header claims {n} bytes but the file has {len(data) - 8} after the length "
                          "(truncated or not a safetensors file)")
    try:
        header = parse_json(bytes(data[8:8 + n]), what, limit=max_header, max_depth=4)
    except FileRefused:
        raise FileRefused(f"{what}: the header is not a safetensors header (not JSON, or nested too deep; pickles and "
                          ".pt files are never loaded)") from None
    if not isinstance(header, dict):
        raise FileRefused(f"{what}: the header is not a JSON object (not a safetensors file)")
    body = len(data) - 8 - n
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in _ST_DTYPES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise FileRefused(f"{what}: tensor {name[:60]!r} has a malformed entry (dtype, shape, data_offsets)")
        lo, hi = info["data_offsets"]
        size = _ST_DTYPES[info["dtype"]]
        for d in info["shape"]:
            size *= d
        if not 0 <= lo <= hi <= body or hi - lo != size:
            raise FileRefused(f"{what}: tensor {name[:60]!r} claims bytes {lo}..{hi} of {body} for shape "
                              f"{info['shape']} (truncated, or the offsets lie)")
        spans.append((lo, hi))
        out[name] = (info["dtype"], tuple(info["shape"]))
    pos = 0
    for lo, hi in sorted(spans):
        if lo != pos:
            raise FileRefused(f"{what}: tensor data overlaps or leaves gaps (offsets {lo}, expected {pos})")
        pos = hi
    if pos != body:
        raise FileRefused(f"{what}: {body - pos} bytes after the last tensor (corrupted or appended to)")
    return out


def check_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Refuse NaN or inf in any floating-point tensor of ``tensors`` (one line naming ``what`` and the tensor)."""
    import torch

    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise FileRefused(f"{what}: tensor {str(name)[:60]!r} holds {bad} NaN/inf value(s) of {t.numel()}; the "
                              "weights are broken (a diverged training?): re-train or re-fetch them")


def load_safetensors(data: bytes | memoryview, what: str, *, limit: int = MAX_WEIGHTS_BYTES, finite: bool = True
                     ) -> dict[str, Any]:
    """The tensors of a safetensors buffer after :func:`safetensors_layout` (and, with ``finite``,
    :func:`check_finite`): never unpickles, never allocates from a header that lies."""
    from safetensors.torch import load as st_load

    if len(data) > limit:
        raise FileRefused(f"{what} is {len(data)} bytes; at most {limit} are read for it (wrong file?)")
    safetensors_layout(data, what)
    try:
        tensors = st_load(bytes(data))
    except Exception as e:  # noqa: BLE001 - safetensors' own error type, as one line
        raise FileRefused(f"{what} is not a valid safetensors file ({str(e)[:160]})") from None
    if finite:
        check_finite(tensors, what)
    return tensors

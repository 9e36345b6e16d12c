"""TeacherShard: a slice of stored teacher trajectories and its bytes format.

A shard holds ``B`` trajectories of the teacher ODE (EDM form, dx/dsigma = (x - D(x; sigma)) / sigma;
AMED, Zhou et al. arXiv 2312.00094, trains against such trajectories) at every point of the
teacher spec's union grid ``sigmas`` (G points, decreasing): ``states[g] ~= x(sigmas[g])``, with
``states[0] = noise * sigmas[0]``. Per-sample ``seeds`` say where each trajectory's noise (and label)
came from, so a shard can be re-derived and its content never depends on batch size or worker.

Bytes format (one safetensors file; never pickled):
- tensors: ``seeds`` int64 (B,), ``sigmas`` float64 (G,), ``noise`` (B, C, H, W) and ``states``
  (G, B, C, H, W) in the storage dtype (float16 / bfloat16 / float32 / float64), ``labels`` int64 (B,)
  class indices (only when the spec draws labels);
- metadata ``amed.teacher_shard``: a JSON header {format, version, spec_hash, index, dtype, shape,
  num_samples, num_times, label_dim, nfe}. The header holds nothing time- or writer-dependent, so the
  same (spec, index) gives the same bytes on the same platform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["TeacherShard", "STORAGE_DTYPES", "SHARD_FORMAT", "SHARD_VERSION", "storage_dtype", "write_safetensors",
           "read_safetensors"]

SHARD_FORMAT = "amed.teacher_shard"
SHARD_VERSION = 1
STORAGE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a storage dtype name; ValueError naming the allowed ones."""
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not a storage dtype; use one of {sorted(STORAGE_DTYPES)}") from None


_ST_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
_ST_DTYPES = {v: k for k, v in _ST_CODES.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytearray:
    """Serialise to the safetensors format (8-byte little-endian header length, JSON header padded to 8 bytes,
    then the raw little-endian tensor bytes), ordered by element size then name so every tensor is aligned.

    Byte-compatible with ``safetensors.torch.load``; written here so each tensor is copied exactly once.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {}
    offset = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_CODES:
            raise ValueError(f"tensor {k!r} has dtype {t.dtype}; storable dtypes: {sorted(map(str, _ST_CODES))}")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    base = 8 + len(head)
    buf = bytearray(base + offset)
    buf[:8] = len(head).to_bytes(8, "little")
    buf[8:base] = head
    view = memoryview(buf)
    for k in order:
        t = tensors[k].detach().to("cpu").contiguous().reshape(-1)
        start, end = header[k]["data_offsets"]
        if end > start:  # one memcpy (numpy has no bfloat16: copy its bits as int16)
            arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
            view[base + start:base + end] = memoryview(arr).cast("B")
    return buf


def read_safetensors(data: bytes | bytearray | memoryview) -> tuple[dict[str, torch.Tensor], dict]:
    """Parse safetensors bytes into tensors viewing one writable buffer (no pickle); ValueError on any inconsistency.

    A bytearray or a writable byte memoryview is used in place (the tensors view it); anything else is copied once."""
    writable_view = isinstance(data, memoryview) and not data.readonly and data.contiguous and data.itemsize == 1
    buf = data if isinstance(data, bytearray) or writable_view else bytearray(data)
    size = len(buf)
    n = int.from_bytes(bytes(buf[:8]), "little")
    if size < 8 or n < 2 or 8 + n > size:
        raise ValueError("not a valid safetensors teacher shard: header length out of range (truncated?)")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a valid safetensors teacher shard: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("not a valid safetensors teacher shard: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    spans, tensors = [], {}
    for name, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not a valid safetensors teacher shard: bad entry for tensor {name!r}: {info!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = 1
        for d in shape:
            count *= d
        if min(shape, default=1) < 0 or end - start != count * itemsize or start < 0 or base + end > size:
            raise ValueError(f"not a valid safetensors teacher shard: tensor {name!r} offsets {start}..{end} do not fit "
                             f"shape {shape} x {itemsize} bytes in a {size - base}-byte body (truncated?)")
        spans.append((start, end))
        tensors[name] = (torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start) if count
                         else torch.empty(0, dtype=dtype)).reshape(shape)
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise ValueError("not a valid safetensors teacher shard: tensor data overlaps or leaves gaps")
        pos = end
    if base + pos != size:
        raise ValueError(f"not a valid safetensors teacher shard: {size - base - pos} trailing bytes")
    return tensors, meta


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in STORAGE_DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"tensor dtype {dtype} is not a storage dtype; use one of {sorted(STORAGE_DTYPES)}")


@dataclass(frozen=True, eq=False)
class TeacherShard:
    """Trajectories ``index * shard_size ...`` of the teacher spec ``spec_hash``.

    seeds: (B,) int64 per-sample seeds; labels: (B,) int64 class indices or None;
    noise: (B, C, H, W); states: (G, B, C, H, W) at ``sigmas`` (G,) float64;
    label_dim: number of classes (0: unconditional); nfe: denoiser evaluations per trajectory.
    """

    spec_hash: str
    index: int
    seeds: torch.Tensor
    noise: torch.Tensor
    states: torch.Tensor
    sigmas: torch.Tensor
    labels: Optional[torch.Tensor] = None
    label_dim: int = 0
    nfe: int = 0

    def __post_init__(self):
        if not isinstance(self.spec_hash, str) or not self.spec_hash:
            raise ValueError("spec_hash must be a non-empty string (the teacher spec's hash)")
        if not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"index must be a non-negative integer, got {self.index!r}")
        B = self.seeds.shape[0] if self.seeds.ndim == 1 else -1
        if self.seeds.ndim != 1 or self.seeds.dtype != torch.int64 or B < 1:
            raise ValueError(f"seeds must be a non-empty (B,) int64 tensor, got {tuple(self.seeds.shape)} {self.seeds.dtype}")
        if self.noise.ndim != 4 or self.noise.shape[0] != B:
            raise ValueError(f"noise must be (B, C, H, W) with B={B}, got {tuple(self.noise.shape)}")
        _dtype_name(self.noise.dtype)
        if self.sigmas.ndim != 1 or self.sigmas.dtype != torch.float64 or self.sigmas.shape[0] < 2:
            raise ValueError(f"sigmas must be a (G,) float64 grid with G >= 2, got {tuple(self.sigmas.shape)} {self.sigmas.dtype}")
        if not torch.all(self.sigmas[1:] < self.sigmas[:-1]) or not torch.all(self.sigmas > 0):
            raise ValueError("sigmas must be positive and strictly decreasing")
        G = self.sigmas.shape[0]
        if self.states.shape != (G, *self.noise.shape):
            raise ValueError(f"states must be (G, *noise.shape) = {(G, *self.noise.shape)}, got {tuple(self.states.shape)}")
        if self.states.dtype != self.noise.dtype:
            raise ValueError(f"states ({self.states.dtype}) and noise ({self.noise.dtype}) must share the storage dtype")
        if not isinstance(self.label_dim, int) or self.label_dim < 0:
            raise ValueError(f"label_dim must be a non-negative integer, got {self.label_dim!r}")
        if self.labels is not None:
            if self.labels.shape != (B,) or self.labels.dtype != torch.int64:
                raise ValueError(f"labels must be (B,) int64 class indices, got {tuple(self.labels.shape)} {self.labels.dtype}")
            if self.label_dim < 1 or bool(((self.labels < 0) | (self.labels >= self.label_dim)).any()):
                raise ValueError(f"labels must be class indices in [0, label_dim={self.label_dim})")
        if not isinstance(self.nfe, int) or self.nfe < 0:
            raise ValueError(f"nfe must be a non-negative integer, got {self.nfe!r}")

    # -- views ----------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.seeds.shape[0])

    @property
    def dtype(self) -> str:
        return _dtype_name(self.noise.dtype)

    @property
    def total_nfe(self) -> int:
        """Denoiser evaluations spent on this shard, counted per sample (nfe x B)."""
        return self.nfe * self.num_samples

    def one_hot_labels(self, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        """(B, label_dim) one-hot labels as the denoiser takes them, or None (unconditional)."""
        if self.labels is None:
            return None
        return torch.nn.functional.one_hot(self.labels, self.label_dim).to(dtype)

    def header(self) -> dict:
        return {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "spec_hash": self.spec_hash,
            "index": self.index,
            "dtype": self.dtype,
            "shape": list(self.noise.shape[1:]),
            "num_samples": self.num_samples,
            "num_times": int(self.sigmas.shape[0]),
            "label_dim": self.label_dim,
            "has_labels": self.labels is not None,
            "nfe": self.nfe,
        }

    # -- bytes ----------------------------------------------------------------------------------
    def to_buffer(self) -> bytearray:
        """The shard's safetensors bytes, built in one buffer (one copy of each tensor; see :func:`write_safetensors`)."""
        tensors = {"seeds": self.seeds, "sigmas": self.sigmas, "noise": self.noise, "states": self.states}
        if self.labels is not None:
            tensors["labels"] = self.labels
        return write_safetensors(tensors, {SHARD_FORMAT: json.dumps(self.header(), sort_keys=True)})

    def to_bytes(self) -> bytes:
        """safetensors bytes with the JSON header as metadata (deterministic for equal content)."""
        return bytes(self.to_buffer())

    @classmethod
    def from_bytes(cls, data: bytes | bytearray, *, expect_spec_hash: str | None = None, expect_index: int | None = None) -> "TeacherShard":
        """Parse and validate shard bytes; ValueError saying what is wrong (never unpickles).

        A ``bytearray`` or writable byte ``memoryview`` is used in place (the tensors view it, no copy); ``bytes`` are
        copied once.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
            raise ValueError("teacher shard bytes are empty or truncated")
        tensors, meta = read_safetensors(data)
        if SHARD_FORMAT not in meta:
            raise ValueError(f"safetensors file has no {SHARD_FORMAT!r} header: not a teacher shard")
        try:
            head = json.loads(meta[SHARD_FORMAT])
        except json.JSONDecodeError as e:
            raise ValueError(f"teacher shard header is not JSON: {e}") from None
        if head.get("format") != SHARD_FORMAT or head.get("version") != SHARD_VERSION:
            raise ValueError(f"unsupported teacher shard format/version {head.get('format')!r}/{head.get('version')!r} "
                             f"(this code reads {SHARD_FORMAT!r}/{SHARD_VERSION})")
        required = {"seeds", "sigmas", "noise", "states"} | ({"labels"} if head.get("has_labels") else set())
        missing = required - set(tensors)
        extra = set(tensors) - required
        if missing or extra:
            raise ValueError(f"teacher shard tensors wrong: missing {sorted(missing)}, unexpected {sorted(extra)}")
        shard = cls(
            spec_hash=head["spec_hash"],
            index=int(head["index"]),
            seeds=tensors["seeds"],
            noise=tensors["noise"],
            states=tensors["states"],
            sigmas=tensors["sigmas"],
            labels=tensors.get("labels"),
            label_dim=int(head["label_dim"]),
            nfe=int(head["nfe"]),
        )
        if shard.header() != head:
            raise ValueError(f"teacher shard header disagrees with its tensors: header {head}, tensors say {shard.header()}")
        if expect_spec_hash is not None and shard.spec_hash != expect_spec_hash:
            raise ValueError(f"teacher shard belongs to spec {shard.spec_hash}, expected {expect_spec_hash}")
        if expect_index is not None and shard.index != expect_index:
            raise ValueError(f"teacher shard has index {shard.index}, expected {expect_index}")
        return shard

"""Samplers without weights (families ``free`` and ``gits``): a training-free solver on an explicit sigma list.

``sampler.json``: {"kind", "format_version", "solver" (a free solver name), "method" (table name), "nfe", "sigmas"
(the N grid points, float64 values as JSON numbers: exact round trip), "afs", "options", "schedule" (ScheduleSpec
JSON the sigmas came from, free only), "teacher" (identity), "fit" (how a GITS schedule was selected)}.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

SPEC_FILE = "sampler.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PureSchedule:
    """What a pure-schedule sampler is, for tools that take a sigma list (:mod:`amed_core.integrations`): the N
    time points (decreasing, float64 values, no trailing 0) and the training-free solver that runs on them with its
    AFS and options. A family whose sampler is a schedule (free, gits; GS's grid) provides it through its module's
    ``schedule(sampler)``; the exports (diffusers, k-diffusion, sigmas.json) need nothing else."""

    sigmas: tuple[float, ...]
    solver: str
    afs: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    family: str = "free"
    method: str = ""
    nfe: int = 0


@dataclass(frozen=True)
class StaticSpec:
    kind: str
    solver: str
    method: str
    nfe: int
    sigmas: tuple[float, ...]
    afs: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    schedule: Mapping[str, Any] | None = None
    teacher: Mapping[str, Any] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from ..methods import get_method, nfe_for

        if self.kind not in ("free", "gits"):
            raise ValueError(f"StaticSpec.kind must be 'free' or 'gits', got {self.kind!r}")
        if get_method(self.solver).family != "free":
            raise ValueError(f"StaticSpec.solver must be a training-free solver, got {self.solver!r}")
        s = tuple(float(v) for v in self.sigmas)
        if len(s) < 2 or any(not (v > 0) for v in s) or any(b >= a for a, b in zip(s, s[1:])):
            raise ValueError("sigmas must be at least 2 positive, strictly decreasing values")
        object.__setattr__(self, "sigmas", s)
        object.__setattr__(self, "options", dict(self.options))
        spent = nfe_for(self.solver, len(s), self.afs, self.options)
        if spent != self.nfe:
            raise ValueError(f"{self.solver} on {len(s)} points (afs={self.afs}) spends {spent} evaluations, "
                             f"not nfe={self.nfe}")

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def grid(self) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float64)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sigmas"] = list(self.sigmas)
        d["format_version"] = FORMAT_VERSION
        d["num_steps"] = len(self.sigmas)  # for readers of the JSON (amed fetch's summary)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> "StaticSpec":
        d = dict(d)
        v = d.pop("format_version", FORMAT_VERSION)
        d.pop("num_steps", None)
        if v != FORMAT_VERSION:
            raise ValueError(f"unsupported {SPEC_FILE} format_version {v!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{SPEC_FILE}: unknown field(s) {unknown}")
        return cls(**d)


def check_teacher(teacher: Mapping[str, Any], denoiser, kind: str) -> None:
    """ValueError when ``denoiser``'s weights (content_sha256) are not those of the teacher a sampler was made for."""
    want = teacher.get("content_sha256")
    have = (denoiser.identity() if hasattr(denoiser, "identity") else {}).get("content_sha256")
    if want and have and want != have:
        raise ValueError(f"this {kind} sampler was made for teacher {teacher.get('name')!r} (sha256 {want[:12]}...) "
                         f"but got {have[:12]}...; pass check_teacher=False to sample anyway")


class StaticSampler:
    """``sampler(denoiser, noise, class_labels=None) -> SolveResult``: the solver on the spec's sigmas from
    ``noise * sigmas[0]`` (the evaluate stage's arithmetic, so a registered sampler reproduces its score's samples)."""

    def __init__(self, spec: StaticSpec):
        self.spec = spec

    def check_denoiser(self, denoiser) -> None:
        check_teacher(self.spec.teacher, denoiser, self.spec.kind)

    def __call__(self, denoiser, noise: torch.Tensor, class_labels=None, *, check_teacher: bool = True,
                 return_trajectory: bool = False, callback=None):
        from ..methods import solve

        if check_teacher and self.spec.kind == "gits":  # a free sampler's grid suits any teacher with its sigma range
            self.check_denoiser(denoiser)
        sigmas = self.spec.grid()
        with torch.no_grad():
            return solve(self.spec.solver, denoiser, noise * sigmas[0], sigmas, class_labels=class_labels,
                         afs=self.spec.afs, return_trajectory=return_trajectory, callback=callback, **self.spec.options)

    def to(self, device):
        return self

    def files(self) -> dict[str, bytes]:
        return {SPEC_FILE: (self.spec.to_json() + "\n").encode()}


def from_files(files: Mapping[str, bytes], kind: str) -> StaticSampler:
    raw = files[SPEC_FILE]
    doc = json.loads(bytes(raw).decode())
    if doc.get("kind") != kind:
        raise ValueError(f"{SPEC_FILE} kind {doc.get('kind')!r} is not {kind!r}")
    return StaticSampler(StaticSpec.from_dict(doc))


def schedule(sampler: StaticSampler) -> PureSchedule:
    """The sampler as a :class:`PureSchedule` (its explicit sigmas and base solver)."""
    s = sampler.spec
    return PureSchedule(tuple(s.sigmas), s.solver, bool(s.afs), dict(s.options), s.kind, s.method, int(s.nfe))


def describe(sampler: StaticSampler) -> dict:
    s = sampler.spec
    return {"family": s.kind, "method": s.method, "solver": s.solver, "nfe": s.nfe, "denoiser_calls": s.nfe,
            "num_steps": s.num_steps, "afs": s.afs, "options": dict(s.options), "sigmas": list(s.sigmas)}

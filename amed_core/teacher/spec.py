"""The teacher spec: everything that determines a stored teacher's content (its SHA-256 names its folder), and
the student grids of a sweep (``"amed:3,5;amed+ipndm:3"`` -> one :class:`StudentGrid` per distinct N)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..methods import get_method, get_solver, num_steps_for, pick_afs, solver_options
from ..schedules import ScheduleSpec, refine, union
from ..shards import STORAGE_DTYPES, storage_dtype
from ..solvers import COMMON_OPTIONS

__all__ = ["StudentGrid", "TeacherSpec", "LABEL_POLICIES", "COMPUTE_DTYPES", "SPEC_VERSION", "canonical_json",
           "freeze_json", "parse_grid_for", "student_grids_for"]

LABEL_POLICIES = ("none", "uniform")
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPEC_VERSION = 1


@dataclass(frozen=True)
class StudentGrid:
    """One student's grid: ``schedule.grid(num_steps)`` (N points, N - 1 steps)."""

    schedule: ScheduleSpec
    num_steps: int

    def __post_init__(self):
        if not isinstance(self.schedule, ScheduleSpec):
            raise ValueError(f"schedule must be a ScheduleSpec, got {type(self.schedule).__name__}")
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 2:
            raise ValueError(f"num_steps must be an integer >= 2, got {self.num_steps!r}")

    def sigmas(self) -> torch.Tensor:
        return self.schedule.grid(self.num_steps)

    def to_dict(self) -> dict:
        return {"schedule": self.schedule.to_dict(), "num_steps": self.num_steps}

    @classmethod
    def from_dict(cls, d: Mapping) -> "StudentGrid":
        unknown = set(d) - {"schedule", "num_steps"}
        if unknown:
            raise ValueError(f"unknown student grid field(s) {sorted(unknown)}; allowed: ['num_steps', 'schedule']")
        return cls(schedule=ScheduleSpec.from_dict(dict(d["schedule"])), num_steps=int(d["num_steps"]))


def canonical_json(obj) -> str:
    """Canonical JSON (sorted keys, no whitespace, no NaN): what spec hashes are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def freeze_json(value, name: str):
    """A JSON value checked to be JSON (round-trip), returned as plain dict/list/scalars."""
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serialisable: {e}") from None


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    """Everything that determines a stored teacher's content; its hash names its folder.

    model: the denoiser's ``identity()`` (adapter, name, content hash); shape: (C, H, W);
    grids: every student grid of the sweep (deduplicated, sorted); the teacher visits
    ``refine(union(grids), sub_steps)`` and keeps its states at the union's points;
    solver / solver_options: the teacher ODE solver (:func:`amed_core.solvers.solve`);
    label_policy: 'none' (unconditional) or 'uniform' (class ~ U{0..label_dim-1} from the sample's generator);
    dtype: storage dtype; compute_dtype: the teacher's arithmetic; num_trajectories, shard_size, base_seed.
    """

    model: Mapping[str, Any]
    shape: tuple[int, int, int]
    grids: tuple[StudentGrid, ...]
    num_trajectories: int
    shard_size: int = 250
    sub_steps: int = 1
    solver: str = "heun"
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    label_policy: str = "none"
    label_dim: int = 0
    dtype: str = "float32"
    compute_dtype: str = "float64"
    base_seed: int = 0
    refine_space: str = "polynomial"
    refine_rho: float = 7.0

    def __post_init__(self):
        def positive_int(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        model = freeze_json(dict(self.model) if isinstance(self.model, Mapping) else self.model, "model")
        if not isinstance(model, dict) or "adapter" not in model:
            raise ValueError("model must be the denoiser's identity() dict (with 'adapter' and a content hash)")
        if not any(("hash" in k or "sha" in k) and model[k] for k in model):
            raise ValueError(f"model identity {model} has no content hash (a key with 'hash' or 'sha'); "
                             "the teacher must be pinned to exact weights")
        object.__setattr__(self, "model", model)
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive sizes, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        grids = tuple(g if isinstance(g, StudentGrid) else StudentGrid.from_dict(g) for g in self.grids)
        if not grids:
            raise ValueError("grids must list at least one student grid (see student_grids_for)")
        grids = tuple(sorted(set(grids), key=lambda g: (canonical_json(g.schedule.to_dict()), g.num_steps)))
        object.__setattr__(self, "grids", grids)
        for name in ("num_trajectories", "shard_size"):
            positive_int(name)
        positive_int("sub_steps", 0)
        positive_int("label_dim", 0)
        if not isinstance(self.base_seed, int) or isinstance(self.base_seed, bool) or not (0 <= self.base_seed < 2**62):
            raise ValueError(f"base_seed must be an integer in [0, 2^62), got {self.base_seed!r}")
        if self.label_policy not in LABEL_POLICIES:
            raise ValueError(f"label_policy {self.label_policy!r} is not one of {LABEL_POLICIES}")
        if self.label_policy == "uniform" and self.label_dim < 1:
            raise ValueError("label_policy 'uniform' needs label_dim >= 1 (the model's number of classes)")
        if self.label_policy == "none" and self.label_dim != 0:
            raise ValueError(f"label_policy 'none' needs label_dim 0 (got {self.label_dim}); use 'uniform' for a conditional model")
        storage_dtype(self.dtype)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not one of {sorted(COMPUTE_DTYPES)}")
        if self.refine_space not in ("polynomial", "logsnr"):
            raise ValueError(f"refine_space must be 'polynomial' or 'logsnr', got {self.refine_space!r}")
        if not (isinstance(self.refine_rho, (int, float)) and self.refine_rho > 0):
            raise ValueError(f"refine_rho must be positive, got {self.refine_rho!r}")
        object.__setattr__(self, "refine_rho", float(self.refine_rho))
        object.__setattr__(self, "solver_options", freeze_json(dict(self.solver_options), "solver_options"))
        get_solver(self.solver)
        allowed = sorted(set(solver_options(self.solver)) - set(COMMON_OPTIONS))
        bad = sorted(set(self.solver_options) - set(allowed))
        if bad:
            raise ValueError(f"solver_options {bad} are not options of teacher solver {self.solver!r}; allowed: {allowed}")
        self.union_grid()  # validates that the grids can be merged

    def __hash__(self) -> int:
        return hash(self.spec_hash)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": SPEC_VERSION,
            "model": dict(self.model),
            "shape": list(self.shape),
            "grids": [g.to_dict() for g in self.grids],
            "num_trajectories": self.num_trajectories,
            "shard_size": self.shard_size,
            "sub_steps": self.sub_steps,
            "solver": self.solver,
            "solver_options": dict(self.solver_options),
            "label_policy": self.label_policy,
            "label_dim": self.label_dim,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "base_seed": self.base_seed,
            "refine_space": self.refine_space,
            "refine_rho": self.refine_rho,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TeacherSpec":
        d = dict(d)
        version = d.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"teacher spec version {version} is not supported (this code reads {SPEC_VERSION})")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown teacher spec field(s) {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        d["grids"] = tuple(StudentGrid.from_dict(g) for g in d.get("grids", ()))
        d["shape"] = tuple(d.get("shape", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str | bytes) -> "TeacherSpec":
        from ..io import parse_json

        d = parse_json(text, "teacher spec (spec.json)")
        if not isinstance(d, dict):
            raise ValueError(f"teacher spec (spec.json) must be a JSON object, not a {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"teacher spec (spec.json) has fields of the wrong type ({str(e)[:160]})") from None

    @property
    def spec_hash(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, no whitespace): the store folder name."""
        return hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()

    @classmethod
    def for_denoiser(cls, denoiser, grids: Sequence[StudentGrid], *, num_trajectories: int, **options) -> "TeacherSpec":
        """A spec pinned to this denoiser (identity, shape, label_dim; labels drawn uniformly when conditional)."""
        label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
        options.setdefault("label_policy", "uniform" if label_dim else "none")
        options.setdefault("label_dim", label_dim)
        return cls(model=denoiser.identity(), shape=tuple(denoiser.shape), grids=tuple(grids),
                   num_trajectories=num_trajectories, **options)

    # -- grids and shards -----------------------------------------------------------------------
    def union_grid(self) -> torch.Tensor:
        """U = union of every student grid (float64, decreasing); each student's points are exact points of U."""
        return union(*(g.sigmas() for g in self.grids))

    def teacher_grid(self) -> torch.Tensor:
        """The grid the teacher solver runs on: M = sub_steps points inserted in every interval of U."""
        return refine(self.union_grid(), self.sub_steps, space=self.refine_space, rho=self.refine_rho)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_trajectories / self.shard_size)

    def shard_range(self, index: int) -> tuple[int, int]:
        """Global trajectory indices [lo, hi) of shard ``index``."""
        if not isinstance(index, int) or not (0 <= index < self.num_shards):
            raise ValueError(f"shard index must be in [0, {self.num_shards}), got {index!r}")
        lo = index * self.shard_size
        return lo, min(self.num_trajectories, lo + self.shard_size)

    def seeds(self, index: int) -> torch.Tensor:
        lo, hi = self.shard_range(index)
        return self.base_seed + torch.arange(lo, hi, dtype=torch.int64)

    def bytes_estimate(self) -> int:
        """Approximate stored bytes (states + noise) of the whole teacher."""
        per = int(torch.empty((), dtype=STORAGE_DTYPES[self.dtype]).element_size()) * math.prod(self.shape)
        return self.num_trajectories * per * (len(self.union_grid()) + 1)


# ---------------------------------------------------------------------------------------------
# Sweep -> student grids.

def parse_grid_for(text: str) -> list[tuple[str, int]]:
    """Parse ``"amed:3,5,7;amed+ipndm:3,5,7"`` into [(solver, nfe), ...]."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        solver, sep, nfes = part.partition(":")
        if not sep or not solver.strip() or not nfes.strip():
            raise ValueError(f"--grid-for entry {part!r} must look like SOLVER:NFE[,NFE...] (e.g. 'amed:3,5,7')")
        for n in nfes.split(","):
            try:
                out.append((solver.strip(), int(n)))
            except ValueError:
                raise ValueError(f"--grid-for entry {part!r}: NFE {n!r} is not an integer") from None
    if not out:
        raise ValueError("--grid-for is empty; give e.g. 'amed:3,5,7;amed+ipndm:3,5,7'")
    return out


def student_grids_for(sweep: str | Sequence[tuple[str, int]], schedule: ScheduleSpec | None = None, *,
                      afs: bool | None = None) -> tuple[StudentGrid, ...]:
    """The student grids of a sweep: one per distinct N over (solver, NFE) pairs, on ``schedule``.

    afs=None: learned solvers use AFS exactly where the NFE needs it (AMED: odd NFE, NFE = 2(N - 1) - afs); training-free
    solvers no AFS. N comes from :func:`amed_core.methods.num_steps_for` (re-exported here).
    """
    schedule = schedule or ScheduleSpec()
    pairs = parse_grid_for(sweep) if isinstance(sweep, str) else list(sweep)
    grids = set()
    for solver, nfe in pairs:
        use_afs = afs if afs is not None else (get_method(solver).learned and pick_afs(solver, nfe, None))
        grids.add(StudentGrid(schedule=schedule, num_steps=num_steps_for(solver, nfe, use_afs)))
    return tuple(sorted(grids, key=lambda g: g.num_steps))

"""Teacher trajectories: what a student trains against, generated once per sweep and sharded.

AMED (Zhou et al., arXiv 2312.00094) trains each student against a teacher ODE solution at the
student's grid points t_0 > ... > t_{N-1}. The reference regenerates those trajectories in every
training run; here one teacher serves a whole sweep. A :class:`TeacherSpec` fixes the model (its
identity, with a content hash), the union U of every student grid of the sweep (each student's times
are exact points of U), M sub-steps inserted into every interval of U (teacher grid
``refine(U, M)``, which keeps U's points exactly), the teacher solver, the storage dtype, the number of
trajectories, the shard size and the base seed. Trajectory ``j`` starts from
``x(t_0) = t_0 * n_j``, ``n_j ~ N(0, I)`` drawn from its own generator seeded ``base_seed + j``, so a
shard's content never depends on batch size or worker. The spec's SHA-256 (canonical JSON) names
its folder in the store.

`TeacherBatch` is the unit the AMED training loop consumes, whether the teacher runs on the fly
(the reference's way) or is streamed from stored shards (`flows.store`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from .methods import get_method, get_solver, num_steps_for, pick_afs, solve, solver_options
from .schedules import ScheduleSpec, grid_indices, refine, union
from .shards import STORAGE_DTYPES, TeacherShard, storage_dtype
from .solvers._common import COMMON_OPTIONS

__all__ = [
    "TeacherBatch",
    "StudentGrid",
    "TeacherSpec",
    "LABEL_POLICIES",
    "COMPUTE_DTYPES",
    "num_steps_for",
    "parse_grid_for",
    "student_grids_for",
    "trajectory_inputs",
    "generate_shard",
    "student_indices",
    "shard_to_batches",
    "teacher_nfe_per_trajectory",
    "batch_dtype",
]

LABEL_POLICIES = ("none", "uniform")
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
SPEC_VERSION = 1


@dataclass
class TeacherBatch:
    """Noise, labels and teacher states at the student's grid.

    noise: (B, C, H, W) standard normal draws; the trajectory starts at noise * sigmas[0].
    class_labels: (B, label_dim) one-hot labels or None.
    states: (N, B, C, H, W) teacher states at the student's N grid points; states[0] = noise * sigmas[0].
    """

    noise: torch.Tensor
    class_labels: Optional[torch.Tensor]
    states: torch.Tensor

    def __post_init__(self):
        if self.states.ndim != self.noise.ndim + 1 or self.states.shape[1:] != self.noise.shape:
            raise ValueError(f"states must be (N, *noise.shape); got states {tuple(self.states.shape)}, noise {tuple(self.noise.shape)}")


# ---------------------------------------------------------------------------------------------
# The spec.

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


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _freeze_json(value, name: str):
    """A JSON value checked to be JSON (round-trip), returned as plain dict/list/scalars."""
    try:
        return json.loads(_canonical(value))
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

        model = _freeze_json(dict(self.model) if isinstance(self.model, Mapping) else self.model, "model")
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
        grids = tuple(sorted(set(grids), key=lambda g: (_canonical(g.schedule.to_dict()), g.num_steps)))
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
        object.__setattr__(self, "solver_options", _freeze_json(dict(self.solver_options), "solver_options"))
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
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"teacher spec is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @property
    def spec_hash(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, no whitespace): the store folder name."""
        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()

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


# ---------------------------------------------------------------------------------------------
# Generation.

def trajectory_inputs(seeds: torch.Tensor | Sequence[int], shape: Sequence[int], *, label_policy: str = "none",
                      label_dim: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sample noise n_j ~ N(0, I) (float64) and class index, each from ``torch.Generator().manual_seed(seed_j)``.

    The noise is drawn first, then (label_policy 'uniform') one class index; batch size never matters.
    """
    seeds = [int(s) for s in torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)]
    noise, labels = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float64))
        if label_policy == "uniform":
            labels.append(torch.randint(label_dim, (1,), generator=g))
    lab = torch.cat(labels).to(torch.int64) if labels else None
    return torch.stack(noise), lab


def _one_hot(labels: Optional[torch.Tensor], label_dim: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    return torch.nn.functional.one_hot(labels, label_dim).to(dtype)


def _check_identity(denoiser, spec: TeacherSpec) -> None:
    have = _freeze_json(denoiser.identity(), "denoiser.identity()")
    if _canonical(have) != _canonical(spec.model):
        raise ValueError(f"denoiser identity {have} does not match the teacher spec's model {dict(spec.model)}: "
                         "load the model the spec was made for")


def generate_shard(denoiser, spec: TeacherSpec, index: int, *, batch_size: int | None = None,
                   device: torch.device | str | None = None) -> TeacherShard:
    """Shard ``index`` of ``spec``: the teacher solver on ``spec.teacher_grid()``, states kept at U's points.

    Runs under ``torch.no_grad`` in ``spec.compute_dtype`` in chunks of ``batch_size`` (default: the
    whole shard); the result does not depend on the chunking (per-sample seeds).
    ``nfe`` = denoiser evaluations per trajectory, as the solver counts them.
    """
    _check_identity(denoiser, spec)
    seeds = spec.seeds(index)
    noise64, labels = trajectory_inputs(seeds, spec.shape, label_policy=spec.label_policy, label_dim=spec.label_dim)
    grid = spec.teacher_grid()
    keep = grid_indices(grid, spec.union_grid())
    cdtype = COMPUTE_DTYPES[spec.compute_dtype]
    sdtype = storage_dtype(spec.dtype)
    if device is None:
        p = next(iter(list(denoiser.parameters()) + list(denoiser.buffers())), None)
        device = p.device if p is not None else torch.device("cpu")
    B = seeds.shape[0]
    batch_size = B if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks, nfe = [], None
    for lo in range(0, B, batch_size):
        sl = slice(lo, min(B, lo + batch_size))
        x = (noise64[sl] * grid[0]).to(device=device, dtype=cdtype)
        cl = _one_hot(labels[sl] if labels is not None else None, spec.label_dim, cdtype)
        if cl is not None:
            cl = cl.to(device)
        with torch.no_grad():
            res = solve(spec.solver, denoiser, x, grid, class_labels=cl, return_trajectory=True, **spec.solver_options)
        traj = res.trajectory[keep.to(res.trajectory.device)]
        if not torch.isfinite(traj).all():
            raise FloatingPointError(f"teacher produced non-finite states in shard {index} (solver {spec.solver!r})")
        chunks.append(traj.to(device="cpu", dtype=sdtype))
        if nfe is not None and res.nfe != nfe:
            raise RuntimeError(f"teacher NFE changed between chunks ({nfe} vs {res.nfe})")
        nfe = res.nfe
    states = torch.cat(chunks, dim=1)
    return TeacherShard(spec_hash=spec.spec_hash, index=index, seeds=seeds, noise=noise64.to(sdtype),
                        states=states.contiguous(), sigmas=spec.union_grid(), labels=labels,
                        label_dim=spec.label_dim, nfe=int(nfe))


def teacher_nfe_per_trajectory(solver: str, sigmas: torch.Tensor, *, shape: Sequence[int] = (1, 1, 1),
                               **options) -> int:
    """Exact denoiser evaluations one trajectory of ``solver`` on ``sigmas`` costs (counted, not estimated)."""

    class _Zero(torch.nn.Module):
        def forward(self, x, sigma, class_labels=None):
            return torch.zeros_like(x)

    x = torch.ones(1, *shape, dtype=torch.float64)
    return int(solve(solver, _Zero(), x, sigmas, **options).nfe)


# ---------------------------------------------------------------------------------------------
# Grid slicing: the union grid's states at one student's grid.

def student_indices(union_sigmas: torch.Tensor, student_sigmas: torch.Tensor) -> torch.Tensor:
    """Positions of a student's times in the stored union grid (ValueError when one is not an exact point,
    or when the student does not start at the union's first time, where states[0] = noise * sigma_max)."""
    idx = grid_indices(union_sigmas, student_sigmas)
    if int(idx[0]) != 0:
        raise ValueError(f"the student grid starts at sigma {float(student_sigmas[0]):.6g}, the teacher at "
                         f"{float(union_sigmas[0]):.6g}: stored trajectories start at the teacher's sigma_max")
    return idx


def batch_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of TeacherBatches read from storage of dtype ``stored``: ``dtype``, else the storage dtype with
    half types widened to float32."""
    if dtype is not None:
        return dtype
    return torch.float32 if stored in (torch.float16, torch.bfloat16) else stored


_out_dtype = batch_dtype  # old private name, kept only until flows.storage.stream imports batch_dtype


def shard_to_batches(shard: TeacherShard, student_sigmas: torch.Tensor, *, batch_size: int | None = None,
                     dtype: torch.dtype | None = None) -> Iterator[TeacherBatch]:
    """TeacherBatches of a shard at a student's grid, in stored order (states[0] = stored noise * sigma_max).

    dtype: output dtype (default: the storage dtype, half types widened to float32).
    """
    idx = student_indices(shard.sigmas, student_sigmas)
    out = batch_dtype(shard.noise.dtype, dtype)
    noise = shard.noise.to(out)
    states = shard.states[idx].to(out)
    states[0] = noise * shard.sigmas[0].to(out)  # the contract: states[0] = noise * sigmas[0], exactly
    labels = shard.one_hot_labels(out)
    B = shard.num_samples
    batch_size = B if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for lo in range(0, B, batch_size):
        sl = slice(lo, min(B, lo + batch_size))
        yield TeacherBatch(noise=noise[sl], class_labels=None if labels is None else labels[sl], states=states[:, sl])

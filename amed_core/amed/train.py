"""Training an AMED predictor from teacher trajectories (Zhou et al., arXiv 2312.00094, sec. 3.3, Alg. 1).

For each batch of teacher trajectories (noise, states at the student's N grid points) and each student
interval i = 0..N-2:

    loss_i = sum_b || x_{i+1}^student(b) - x_{i+1}^teacher(b) ||^2 / B

followed by one Adam step (non-finite gradient entries zeroed). The student's input at step i is the
teacher state x_i (single-step students, "restart") or its own detached output with its history
buffer (multistep students, "continue"), as in the reference.

The teacher is pluggable: ``batches`` is any iterable of :class:`~amed_core.teacher.TeacherBatch`
(stored shards, a shared more accurate teacher), or None for the reference's on-the-fly teacher
(:func:`teacher_batches`): Heun with M = 1 point inserted per interval for the AMED-Solver, the
student's base solver with M = 2 for the plugins, on ``schedule.grid((M + 1)(N - 1) + 1)``.

Ours (issue 21; defaults keep the reference's loop):
- ``objective``: per-sample errors e_b = ||x^student_b - x^teacher_b||^2 enter as mean(e) (the reference) plus
  ``tail_weight`` x a tail term (the mean of the worst fraction F, ``topk:F``, or the F-quantile, ``q:F``): the tail
  decides a mean RMSE (:func:`amed_core.validation.tail_objective`).
- ``loss_target="final"``: one loss per batch on the final state only (the trajectory rolled out with gradients
  through every state; the multistep histories stay detached, as the reference keeps them), instead of one per step.
- ``validation=`` (held-out trajectories, :class:`amed_core.validation.ValidationSet`): the sampler is scored at the
  start, every ``val_every`` batches and at the end; the best state is restored (``select="best"``), ``patience``
  validations without improvement stop training, and a run whose last score exceeds ``diverge_factor`` x its first
  is flagged ``diverged`` (:class:`amed_core.validation.Tracker`). Without validation the flag compares the last
  batch's training loss with the first's.

Progress goes to ``callback(TrainProgress)``; amed_core never logs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..methods import get_method, get_solver, solve, solver_options
from ..methods.amed import STEPS, History, make_context
from ..teacher import COMPUTE_DTYPES, TeacherBatch
from .predictor import AMEDPredictor
from .recipes import check_recipe
from .spec import SamplerSpec
from .._fields import check_fields
from ..optim import Adam, descend
from ..validation import ValidationSet, Validator, check_objective, loss_diverged, tail_objective

__all__ = ["TrainConfig", "TrainResult", "TrainProgress", "train_amed", "teacher_batches", "teacher_states",
           "default_teacher", "train_config"]

_DTYPES = COMPUTE_DTYPES  # "float32" | "float64"


@dataclass(frozen=True)
class TrainConfig:
    """How to train (frozen; JSON round-trip with to_dict/from_dict). Defaults = the reference recipe.

    num_trajectories / batch_size: teacher trajectories consumed (10k, batch 128 in the reference).
    lr, beta1, beta2, eps: Adam (5e-3, 0.9, 0.999, 1e-8).
    seed: predictor initialisation and on-the-fly teacher noise.
    teacher_solver / teacher_M: on-the-fly teacher (None = heun, M=1 for amed; base solver, M=2 for plugins).
    teacher_afs: whether the on-the-fly teacher uses AFS (False in the reference).
    restart: student input at each step: "teacher" (the teacher state), "own" (own detached output and
      history), or None = the reference's choice (teacher for single-step, own for multistep students).
    epochs: passes over the same trajectories (1 in the reference): given batches are iterated again when
      re-iterable, else (and for the on-the-fly teacher) cached in memory. Training stops after
      num_trajectories * epochs trajectories or when the batches run out.
    dtype: arithmetic of the student (and on-the-fly teacher): "float32", "float64", or None = the denoiser's
      own floating dtype (float64 for the exact mixtures, float32 for networks).
    loss_weighting: "sum" (the reference: sum_b ||err_b||^2 / B) or "relative" (divided by the batch's
      sum_b ||x_{i+1} - x_i||^2 of the teacher, so every student step weighs alike in the shared predictor).
    objective / tail_weight: "mean" (the reference), "topk:F" or "q:F" with that weight (see the module docstring).
    loss_target: "steps" (a loss and an Adam step per student step, the reference) or "final" (one per batch, on the
      final state).
    val_every / patience / select / diverge_factor: with a validation set, validate every val_every batches, stop
      after patience validations without improvement (0: never), keep the "best" or the "last" state, and flag a
      last score above diverge_factor x the first as diverged.
    The fields after loss_weighting are ours; at their defaults they are left out of to_dict (ids stay as before).
    """

    num_trajectories: int = 10_000
    batch_size: int = 128
    lr: float = 5e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    teacher_solver: Optional[str] = None
    teacher_M: Optional[int] = None
    teacher_afs: bool = False
    restart: Optional[str] = None
    epochs: int = 1
    dtype: Optional[str] = None
    loss_weighting: str = "sum"
    objective: str = "mean"
    tail_weight: float = 1.0
    loss_target: str = "steps"
    val_every: int = 4
    patience: int = 0
    select: str = "best"
    diverge_factor: float = 10.0

    def __post_init__(self):
        for name in ("num_trajectories", "batch_size", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        if not (self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("TrainConfig.beta1 / beta2 must lie in [0, 1)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be a non-negative integer, got {self.seed!r}")
        if self.teacher_M is not None and (not isinstance(self.teacher_M, int) or self.teacher_M < 0):
            raise ValueError(f"TrainConfig.teacher_M must be an integer >= 0 (points inserted per interval), got {self.teacher_M!r}")
        if self.teacher_solver is not None:
            try:
                get_solver(self.teacher_solver)
            except ValueError as e:
                raise ValueError(f"TrainConfig.teacher_solver: {e}") from None
        if self.restart not in (None, "teacher", "own"):
            raise ValueError(f"TrainConfig.restart must be 'teacher', 'own' or null (reference choice), got {self.restart!r}")
        if self.loss_weighting not in ("sum", "relative"):
            raise ValueError(f"TrainConfig.loss_weighting must be 'sum' or 'relative', got {self.loss_weighting!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        try:
            check_objective(self.objective)
        except ValueError as e:
            raise ValueError(f"TrainConfig.{e}") from None
        if not (isinstance(self.tail_weight, (int, float)) and 0 <= self.tail_weight < math.inf):
            raise ValueError(f"TrainConfig.tail_weight must be a number >= 0, got {self.tail_weight!r}")
        if self.loss_target not in ("steps", "final"):
            raise ValueError(f"TrainConfig.loss_target must be 'steps' or 'final', got {self.loss_target!r}")
        for name in ("val_every", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {v!r}")
        if self.select not in ("best", "last"):
            raise ValueError(f"TrainConfig.select must be 'best' or 'last', got {self.select!r}")
        if not (isinstance(self.diverge_factor, (int, float)) and self.diverge_factor > 1):
            raise ValueError(f"TrainConfig.diverge_factor must be a number > 1, got {self.diverge_factor!r}")

    @classmethod
    def reference(cls, **overrides) -> "TrainConfig":
        """The reference implementation's recipe (the default)."""
        return cls(**overrides)

    @classmethod
    def improved(cls, solver: str = "amed", **overrides) -> "TrainConfig":
        """Our recipe, per solver (measured on digits-gmm, BENCHMARKS.md "AMED quality"):

        - every student step weighted alike (loss_weighting="relative"): the first (AFS) step's errors are orders
          of magnitude larger than later steps'; with a plain sum they dominate the shared predictor, which can
          saturate r towards 0 for every step;
        - ``amed``: a finer Heun teacher (M=3 instead of 1);
        - ``amed+ipndm``: a near-exact Heun teacher (M=10 instead of iPNDM with M=2) and Adam lr 2e-3 (5e-3 left
          one seed of three in a poor optimum at NFE 5);
        - ``amed+dpm``: the reference recipe unchanged (with relative weighting r drifts to 1, i.e. Heun, which is
          poor at these NFEs on this teacher).
        For multistep plugins, pair it with ``SamplerSpec.create(..., afs_in_history=False)``.
        """
        if solver not in STEPS:
            raise ValueError(f"solver must be one of {sorted(STEPS)}, got {solver!r}")
        base: dict = {} if solver == "amed+dpm" else {"loss_weighting": "relative"}
        if solver == "amed":
            base["teacher_M"] = 3
        if solver == "amed+ipndm":
            base.update(lr=2e-3, teacher_solver="heun", teacher_M=10)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in _OURS:  # added later: left out at their defaults, so earlier configs keep their ids
            if d[f] == _OURS[f]:
                del d[f]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_fields(cls, d)
        return cls(**d)

    def restart_mode(self, solver: str) -> str:
        if self.restart is not None:
            return self.restart
        return "own" if get_method(solver).multistep else "teacher"


_OURS = {"objective": "mean", "tail_weight": 1.0, "loss_target": "steps", "val_every": 4, "patience": 0, "select": "best",
         "diverge_factor": 10.0}


def train_config(solver: str, recipe: str = "reference", **overrides) -> TrainConfig:
    """The training recipe named like :mod:`amed_core.amed.recipes`: ``TrainConfig.reference(**overrides)`` or
    ``TrainConfig.improved(solver, **overrides)`` (what ``amed train --preset`` uses)."""
    check_recipe(solver, recipe)
    return TrainConfig.reference(**overrides) if recipe == "reference" else TrainConfig.improved(solver, **overrides)


@dataclass
class TrainProgress:
    """One optimiser step: batch index, student step, loss (mean over samples of ||err||^2), policy statistics."""

    batch: int
    step: int
    loss: float
    r_mean: float
    r_std: float
    scale_dir_mean: float
    scale_time_mean: float
    trajectories: int
    total_trajectories: int
    seconds: float


@dataclass
class TrainResult:
    predictor: AMEDPredictor
    spec: SamplerSpec
    config: TrainConfig
    losses: list = field(default_factory=list)  # per batch: [loss at step 0, ..., step N-2] (loss_target final: [loss])
    seconds: float = 0.0
    updates: int = 0
    trajectories: int = 0
    teacher_nfe: int = 0  # per trajectory, on-the-fly teacher only (0 for given batches)
    validation: dict = field(default_factory=dict)  # Tracker.summary() when a validation set was given
    stopped_early: bool = False
    diverged: bool = False


def compute_dtype(denoiser, cfg: TrainConfig) -> torch.dtype:
    """cfg.dtype, or the denoiser's first floating parameter/buffer dtype (float32 when it has none)."""
    if cfg.dtype is not None:
        return _DTYPES[cfg.dtype]
    if isinstance(denoiser, torch.nn.Module):
        for t in list(denoiser.parameters()) + list(denoiser.buffers()):
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def default_teacher(spec: SamplerSpec, cfg: TrainConfig) -> tuple[str, int, dict]:
    """(solver, M, options) of the on-the-fly teacher: the reference's choice unless cfg overrides it."""
    name = cfg.teacher_solver or spec.base_solver
    M = cfg.teacher_M if cfg.teacher_M is not None else (1 if spec.solver == "amed" else 2)
    opts: dict = {}
    if name == spec.base_solver:  # the student's own options (max_order, ...); another teacher runs its defaults
        allowed = set(solver_options(name))
        opts = {k: v for k, v in spec.solver_options().items() if k in allowed and k != "afs" and v is not None}
    return name, M, opts


def teacher_states(denoiser, spec: SamplerSpec, noise: torch.Tensor, *, solver: str, M: int, options: dict | None = None,
                   class_labels=None, afs: bool = False) -> tuple[torch.Tensor, int]:
    """Teacher trajectory at the student's grid: run ``solver`` on grid((M+1)(N-1)+1) (an explicit grid: M points
    inserted per interval), keep every (M+1)-th state.

    Returns (states (N, B, ...), teacher NFE per trajectory)."""
    N = spec.num_steps
    coarse = spec.grid()
    if spec.sigmas is not None:  # an explicit grid (a panel start): M points inserted per interval (schedules.refine)
        from ..schedules import refine

        fine = refine(coarse, M)
    else:
        fine = spec.schedule.grid((M + 1) * (N - 1) + 1)
    if not torch.allclose(fine[:: M + 1], coarse, rtol=1e-9, atol=0):
        raise ValueError(f"the {spec.schedule.schedule_type} teacher grid with M={M} does not contain the student's points")
    with torch.no_grad():
        res = solve(solver, denoiser, noise * fine[0].to(noise.dtype), fine, class_labels=class_labels, afs=afs,
                    return_trajectory=True, **(options or {}))
    states = res.trajectory[:: M + 1].clone()
    states[0] = noise * coarse[0].to(noise.dtype)
    return states, res.nfe


def teacher_batches(denoiser, spec: SamplerSpec, cfg: TrainConfig, *, nfe_out: list | None = None) -> Iterator[TeacherBatch]:
    """The reference's on-the-fly teacher: seeded noise, ceil(num_trajectories / batch_size) batches."""
    name, M, opts = default_teacher(spec, cfg)
    gen = torch.Generator().manual_seed(1_000_003 * (cfg.seed + 1))
    dtype = compute_dtype(denoiser, cfg)
    n_batches = math.ceil(cfg.num_trajectories / cfg.batch_size)
    for k in range(n_batches):
        B = min(cfg.batch_size, cfg.num_trajectories - k * cfg.batch_size)
        noise = torch.randn(B, *denoiser.shape, generator=gen, dtype=dtype)
        labels = None
        if getattr(denoiser, "label_dim", 0):
            idx = torch.randint(denoiser.label_dim, (B,), generator=gen)
            labels = torch.eye(denoiser.label_dim, dtype=dtype)[idx]
        states, nfe = teacher_states(denoiser, spec, noise, solver=name, M=M, options=opts, class_labels=labels,
                                     afs=cfg.teacher_afs)
        if nfe_out is not None:
            nfe_out.append(nfe)
        yield TeacherBatch(noise=noise, class_labels=labels, states=states)


def train_amed(denoiser, spec: SamplerSpec, cfg: TrainConfig | None = None, batches: Iterable[TeacherBatch] | None = None,
               callback: Callable[[TrainProgress], None] | None = None, *, predictor: AMEDPredictor | None = None,
               validation: ValidationSet | None = None) -> TrainResult:
    """Fit an AMED predictor for ``spec`` to teacher trajectories (see the module docstring); deterministic under
    cfg.seed. ``predictor``: start from this one (e.g. :func:`amed_core.amed.predictor.init_from_steps`);
    ``validation``: held-out trajectories that pick the checkpoint, stop training and flag divergence."""
    cfg = cfg or TrainConfig()
    if spec.solver not in STEPS:
        raise ValueError(f"spec.solver must be one of {sorted(STEPS)}, got {spec.solver!r}")
    dtype = compute_dtype(denoiser, cfg)
    torch.manual_seed(cfg.seed)  # nothing random should remain, but keep stray draws reproducible
    predictor = predictor or AMEDPredictor(spec.predictor, seed=cfg.seed)
    predictor.train().requires_grad_(True)
    opt = Adam(predictor.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    restart = cfg.restart_mode(spec.solver)
    step_fn = STEPS[spec.solver]
    grid = spec.grid()
    N = spec.num_steps
    nfe_log: list[int] = []

    def epochs_of(source):
        if cfg.epochs == 1:
            yield from source
            return
        if batches is not None and not isinstance(batches, Iterator):  # re-iterable (a list, a store view)
            for _ in range(cfg.epochs):
                yield from batches
            return
        cached = list(source)  # the same trajectories, revisited
        for _ in range(cfg.epochs):
            yield from cached

    source = batches if batches is not None else teacher_batches(denoiser, spec, cfg, nfe_out=nfe_log)
    total = cfg.num_trajectories * cfg.epochs
    result = TrainResult(predictor=predictor, spec=spec, config=cfg)
    t0 = time.perf_counter()
    seen = 0
    validator = None
    if validation is not None:
        validator = Validator(validation, predictor, lambda n, lab: solve(
            spec.solver, denoiser, n.to(dtype) * grid[0].to(dtype), grid, policy=predictor,
            class_labels=None if lab is None else lab.to(dtype), **spec.solver_options()).x, cfg)
        validator.check(0, 0)
    for k, batch in enumerate(epochs_of(source)):
        if seen >= total:
            break
        states = batch.states.to(dtype)
        if states.shape[0] != N:
            raise ValueError(f"teacher batch has states at {states.shape[0]} times but the student grid has N={N} points")
        B = states.shape[1]
        labels = batch.class_labels.to(dtype) if batch.class_labels is not None else None
        ctx = make_context(spec.solver, denoiser, states[0], grid, policy=predictor, class_labels=labels,
                           **spec.solver_options())
        x, history, batch_losses = states[0], History(), []
        seen += B

        def objective(out_x, target, start):
            err = ((out_x - target) ** 2).reshape(B, -1).sum(dim=1)
            loss = tail_objective(err, cfg.objective, cfg.tail_weight)
            if cfg.loss_weighting == "relative":
                loss = loss / (((target - start) ** 2).sum() / B)
            return loss

        def update(loss, out, i) -> None:
            if loss.requires_grad:  # a single-evaluation step has nothing to learn
                descend(loss, opt, predictor.parameters())
                result.updates += 1
            value = float(loss.detach())
            batch_losses.append(value)
            if callback is not None:
                callback(TrainProgress(batch=k, step=i, loss=value, r_mean=float(out.r.detach().mean()),
                                       r_std=float(out.r.detach().std()) if B > 1 else 0.0,
                                       scale_dir_mean=float(out.scale_dir.detach().mean()),
                                       scale_time_mean=float(out.scale_time.detach().mean()),
                                       trajectories=seen, total_trajectories=total, seconds=time.perf_counter() - t0))

        if cfg.loss_target == "final":  # one rollout with gradients through every state, one loss on the last
            opt.zero_grad(set_to_none=True)
            for i in range(N - 1):
                out = step_fn(ctx, x, i, history)
                x, history = out.x, out.history
            update(objective(x, states[-1], states[0]), out, N - 2)
        else:
            for i in range(N - 1):
                opt.zero_grad(set_to_none=True)
                out = step_fn(ctx, x, i, history)
                update(objective(out.x, states[i + 1], states[i]), out, i)
                x = states[i + 1] if restart == "teacher" else out.x.detach()
                history = out.history
        result.losses.append(batch_losses)
        if validator is not None and validator.after_batch(k, result.updates, seen):
            result.stopped_early = True
            break
    result.validation, result.diverged = (validator.finish(result.updates, seen) if validator is not None
                                          else ({}, loss_diverged(result.losses, cfg.diverge_factor)))
    predictor.eval().requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    result.trajectories = seen
    result.teacher_nfe = nfe_log[0] if nfe_log else 0
    return result


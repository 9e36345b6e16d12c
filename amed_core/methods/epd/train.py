"""Fitting EPD-Solver's tables from stored teacher trajectories, and their checkpoint files.

:func:`train_epd` mirrors :func:`amed_core.amed.train.train_amed`: one interval per optimiser step against the teacher's
state at t_{n+1}; departures from the reference (L2 loss on every step instead of its Inception-feature last-step
loss; the state detached between steps) are stated on :class:`EPDTrainConfig` and :func:`train_epd`.
:func:`epd_files` / :func:`epd_from_files` write and read ``epd.safetensors`` + ``epd.json`` (reproducible bytes;
loading never unpickles). The sampler itself is :mod:`amed_core.methods.epd.sampler`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ...optim import Adam, descend
from ...schedules import check_grid
from ...validation import ValidationSet, Validator, loss_diverged
from .sampler import EPD_SOLVERS, EPDEvaluator, EPDParams, epd_step

__all__ = ["EPDTrainConfig", "EPDTrainProgress", "EPDTrainResult", "train_epd", "epd_files", "epd_from_files",
           "save_epd", "load_epd", "params_from_values", "PARAMS_FILE", "CONFIG_FILE"]


@dataclass(frozen=True)
class EPDTrainConfig:
    """How to fit :class:`EPDParams` (frozen; JSON round-trip with to_dict/from_dict).

    solver: "epd" or "epd+ipndm"; num_points (K), scale_dir (b_d), scale_time (b_t), fcn: the parameters'
      hyperparameters (the reference's defaults: K=2, b_d=0.01, b_t=0); afs, max_order: the student's options.
    lr, beta1, beta2, eps: Adam (the reference: 5e-3, 0.9, 0.999, 1e-8). seed: the tables' initialisation
      (standard normal, as the reference).
    restart: the student's input at step n: "own" (its own detached output and, for the plugin, its
      history; the reference continues from its own output) or "teacher" (the teacher's state x_n).
    batched: the K points in one call (True) or the sequential form (False; the reference's training).
    num_trajectories: stop after this many trajectories (None = when the batches run out).
    dtype: "float32" / "float64" / None (= the teacher batch's dtype).
    loss_weighting: "sum" (sum_b ||x_{n+1} - x^T_{n+1}||^2 / B) or "relative" (divided by the teacher's
      sum_b ||x^T_{n+1} - x^T_n||^2 / B), as in train_amed.
    val_every / patience / select / diverge_factor (ours): with a validation set, as
      :class:`amed_core.amed.train.TrainConfig`'s (left out of to_dict at their defaults).
    """

    solver: str = "epd"
    num_points: int = 2
    scale_dir: float = 0.01
    scale_time: float = 0.0
    fcn: bool = False
    afs: bool = False
    max_order: int = 4
    lr: float = 5e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    restart: str = "own"
    batched: bool = True
    num_trajectories: Optional[int] = None
    dtype: Optional[str] = None
    loss_weighting: str = "sum"
    val_every: int = 4
    patience: int = 0
    select: str = "best"
    diverge_factor: float = 10.0

    def __post_init__(self):
        if self.select not in ("best", "last"):
            raise ValueError(f"select must be 'best' or 'last', got {self.select!r}")
        for name in ("val_every", "patience"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not float(self.diverge_factor) > 1:
            raise ValueError(f"diverge_factor must be a number > 1, got {self.diverge_factor!r}")
        if self.solver not in EPD_SOLVERS:
            raise ValueError(f"solver must be one of {sorted(EPD_SOLVERS)}, got {self.solver!r}")
        if self.restart not in ("own", "teacher"):
            raise ValueError(f"restart must be 'own' or 'teacher', got {self.restart!r}")
        if self.loss_weighting not in ("sum", "relative"):
            raise ValueError(f"loss_weighting must be 'sum' or 'relative', got {self.loss_weighting!r}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")
        if not isinstance(self.max_order, int) or isinstance(self.max_order, bool) or not 1 <= self.max_order <= 4:
            raise ValueError(f"max_order must be an integer in [1, 4], got {self.max_order!r}")
        if self.num_trajectories is not None and (not isinstance(self.num_trajectories, int) or self.num_trajectories < 1):
            raise ValueError(f"num_trajectories must be a positive integer or None, got {self.num_trajectories!r}")
        for name in ("lr", "eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        from dataclasses import asdict
        d = asdict(self)
        for k, v in (("val_every", 4), ("patience", 0), ("select", "best"), ("diverge_factor", 10.0)):
            if d[k] == v:  # added later: left out at the default, so earlier configs keep their ids
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EPDTrainConfig":
        from dataclasses import fields
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown EPDTrainConfig field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    def sampler_options(self) -> dict:
        """Keyword options of the sampler these parameters are for (besides policy=)."""
        opts = {"afs": self.afs, "batched": self.batched}
        if self.solver == "epd+ipndm":
            opts["max_order"] = self.max_order
        return opts


@dataclass
class EPDTrainProgress:
    """One optimiser step: batch index, student step, loss, and the step's coefficients (means over K)."""

    batch: int
    step: int
    loss: float
    r_mean: float
    weight_max: float
    scale_dir_mean: float
    scale_time_mean: float
    trajectories: int
    seconds: float


@dataclass
class EPDTrainResult:
    params: EPDParams
    config: EPDTrainConfig
    losses: list  # per batch: [loss at step 0, ..., step N-2]
    updates: int = 0
    trajectories: int = 0
    seconds: float = 0.0
    validation: dict = None  # Tracker.summary() when a validation set was given ({} without)
    stopped_early: bool = False
    diverged: bool = False


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def train_epd(denoiser, sigmas, batches, cfg: EPDTrainConfig | None = None, *, params: EPDParams | None = None,
              callback: Callable[[EPDTrainProgress], None] | None = None,
              validation: ValidationSet | None = None) -> EPDTrainResult:
    """Fit EPD's tables to teacher trajectories (``batches``: an iterable of ``amed_core.teacher.TeacherBatch``
    whose ``states`` are at the N points of ``sigmas``), one interval per Adam step, as ``train_amed`` does:

        loss_n = sum_b || EPD-step(x_n) - x^T_{n+1}(b) ||^2 / B,   n = 0..N-2,  then one Adam step
        (non-finite gradient entries zeroed).

    Departures from the reference's training loop (BeierZhu/EPD ``training/loss.py``, ``training_loop.py``),
    for a project without Inception features on every teacher: the last step's loss there is replaced by
    ``alpha`` x an Inception-feature MSE (and for EPD with N < 6 on pixel datasets only that last loss is
    back-propagated); here every step uses the L2 loss. There the student's own output is fed on *without*
    detaching (retain_graph: later losses reach earlier rows of the tables through the chain); here the input
    is detached (``restart="own"``) or the teacher's state (``restart="teacher"``), so row n is fitted by loss n only.
    """
    import time

    cfg = cfg or EPDTrainConfig()
    t_grid = check_grid(torch.as_tensor(sigmas, dtype=torch.float64))
    N = int(t_grid.shape[0])
    if params is None:
        gen = torch.Generator().manual_seed(cfg.seed)
        params = EPDParams(N, cfg.num_points, scale_dir=cfg.scale_dir, scale_time=cfg.scale_time, fcn=cfg.fcn,
                           generator=gen)
    elif params.num_steps != N:
        raise ValueError(f"params were made for num_steps={params.num_steps} but the grid has {N} points")
    params.train().requires_grad_(True)
    opt = Adam(params.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    max_order = cfg.max_order if cfg.solver == "epd+ipndm" else None
    result = EPDTrainResult(params=params, config=cfg, losses=[])
    t0 = time.perf_counter()
    validator = None
    if validation is not None:
        opts = cfg.sampler_options()
        validator = Validator(validation, params, lambda n, lab: EPD_SOLVERS[cfg.solver](
            denoiser, n * t_grid[0].to(n.dtype), t_grid.to(n.dtype), policy=params, class_labels=lab, **opts).x, cfg)
        validator.check(0, 0)
    for k, batch in enumerate(batches):
        if cfg.num_trajectories is not None and result.trajectories >= cfg.num_trajectories:
            break
        states = batch.states if cfg.dtype is None else batch.states.to(_DTYPES[cfg.dtype])
        if states.shape[0] != N:
            raise ValueError(f"teacher batch has states at {states.shape[0]} times but the grid has {N} points")
        B = states.shape[1]
        t_steps = t_grid.to(dtype=states.dtype, device=states.device)
        labels = batch.class_labels.to(states.dtype) if batch.class_labels is not None else None
        D = EPDEvaluator(denoiser, labels)
        x, history, losses = states[0], (), []
        result.trajectories += B
        for n in range(N - 1):
            opt.zero_grad(set_to_none=True)
            out = epd_step(D, x, t_steps[n], t_steps[n + 1], params(n), afs_step=cfg.afs and n == 0, history=history,
                           max_order=max_order, batched=cfg.batched)
            loss = ((out.x - states[n + 1]) ** 2).sum() / B
            if cfg.loss_weighting == "relative":
                loss = loss / (((states[n + 1] - states[n]) ** 2).sum() / B)
            descend(loss, opt, params.parameters())
            result.updates += 1
            value = float(loss.detach())
            losses.append(value)
            x = states[n + 1] if cfg.restart == "teacher" else out.x.detach()
            history = out.history
            if callback is not None:
                c = out.coefficients
                callback(EPDTrainProgress(batch=k, step=n, loss=value, r_mean=float(c.r.detach().mean()),
                                          weight_max=float(c.weight.detach().max()),
                                          scale_dir_mean=float(c.scale_dir.detach().mean()),
                                          scale_time_mean=float(c.scale_time.detach().mean()),
                                          trajectories=result.trajectories, seconds=time.perf_counter() - t0))
        result.losses.append(losses)
        if validator is not None and validator.after_batch(k, result.updates, result.trajectories):
            result.stopped_early = True
            break
    result.validation, result.diverged = (validator.finish(result.updates, result.trajectories) if validator is not None
                                          else ({}, loss_diverged(result.losses, cfg.diverge_factor)))
    params.eval().requires_grad_(False)
    result.seconds = time.perf_counter() - t0
    return result


def params_from_values(r, *, scale_dir: float = 0.0, scale_time: float = 0.0, fcn: bool = False,
                       dtype: torch.dtype = torch.float64) -> EPDParams:
    """EPD tables that start at given intermediate points ``r`` ((N - 1, K) values in (0, 1)) with equal weights and
    unit scales (raw weights and scale tables 0): a deterministic start instead of the reference's random draws."""
    import math

    rows = [[math.log(v / (1 - v)) for v in row] for row in r]
    zeros = [[0.0] * len(row) for row in rows]
    return EPDParams.from_raw(rows, zeros, zeros, zeros, scale_dir=scale_dir, scale_time=scale_time, fcn=fcn, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Files: the raw tables in safetensors, the hyperparameters (and what the sampler needs) in JSON

PARAMS_FILE = "epd.safetensors"
CONFIG_FILE = "epd.json"
_FORMAT = "epd-params"


def epd_files(params: EPDParams, sampler: dict | None = None) -> dict[str, bytes]:
    """{"epd.safetensors": the four raw tables, "epd.json": {"format", "version", "params": config, "sampler"}}.

    ``sampler`` is any JSON-able description of the run the tables are for (solver, sigmas, afs, max_order, ...);
    it is stored as given. Equal tables give equal bytes (one safetensors metadata key)."""
    from safetensors.torch import save as st_save

    cfg = params.config()
    tensors = {name: getattr(params, name).detach().to("cpu").contiguous() for name in EPDParams.TABLES}
    about = json.dumps({"format": _FORMAT, **cfg}, sort_keys=True)
    doc = {"format": _FORMAT, "version": 1, "params": cfg, "sampler": sampler or {}}
    return {PARAMS_FILE: st_save(tensors, metadata={"amed": about}),
            CONFIG_FILE: (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()}


def epd_from_files(files) -> tuple[EPDParams, dict]:
    """Inverse of :func:`epd_files`: (EPDParams in the stored dtype, the stored sampler description). Never unpickles."""
    from safetensors.torch import load as st_load

    for name in (PARAMS_FILE, CONFIG_FILE):
        if name not in files:
            raise ValueError(f"EPD checkpoint lacks {name}")
    doc = json.loads(bytes(files[CONFIG_FILE]).decode())
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{CONFIG_FILE} is not an EPD parameter file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != 1:
        raise ValueError(f"unsupported EPD parameter file version {doc.get('version')!r}")
    cfg = doc["params"]
    tensors = st_load(bytes(files[PARAMS_FILE]))
    missing = set(EPDParams.TABLES) - set(tensors)
    if missing:
        raise ValueError(f"{PARAMS_FILE} lacks tables {sorted(missing)}")
    shape = (int(cfg["num_steps"]) - 1, int(cfg["num_points"]))
    for name in EPDParams.TABLES:
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"table {name} has shape {tuple(tensors[name].shape)}, the config says {shape}")
    params = EPDParams.from_raw(*(tensors[n] for n in EPDParams.TABLES), scale_dir=float(cfg["scale_dir"]),
                                scale_time=float(cfg["scale_time"]), fcn=bool(cfg["fcn"]),
                                dtype=tensors["r_params"].dtype)
    return params.eval().requires_grad_(False), dict(doc.get("sampler") or {})


def save_epd(directory, params: EPDParams, sampler: dict | None = None):
    """Write epd.safetensors and epd.json into ``directory`` (each atomically); returns the folder's Path."""
    import os
    import tempfile
    from pathlib import Path

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in epd_files(params, sampler).items():
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, folder / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return folder


def load_epd(directory) -> tuple[EPDParams, dict]:
    """Read what :func:`save_epd` wrote: (EPDParams, sampler description)."""
    from pathlib import Path

    folder = Path(directory)
    return epd_from_files({name: (folder / name).read_bytes() for name in (PARAMS_FILE, CONFIG_FILE)})

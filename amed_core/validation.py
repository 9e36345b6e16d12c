"""Validation on held-out teacher trajectories (ours, issue 21): what picks a learned sampler's checkpoint, stops its
training early and flags a diverged run, for every trained family (AMED: :func:`amed_core.amed.train.train_amed`;
EPD: :func:`amed_core.methods.epd.train_epd`; GITS: :func:`amed_core.families.gits.fit` chooses between schedules).

A :class:`ValidationSet` is a split of the stored teacher that training never reads: its noise and the teacher's
final states. A candidate is scored by sampling from that noise and comparing with those states: the RMSE over all
samples and pixels (``sqrt(mean(err^2))``, what ``metric: rmse`` reports), so the number the checkpoint is picked
on is the number the user is shown, tail included. The teacher's own error is the floor of this score; it never
reaches the near-exact reference (``bench/families.py`` measures both).

:class:`Tracker` keeps the best state seen (a copy of its tensors), counts validations without a relative
improvement of at least ``min_improvement`` (``patience`` of them stop training) and says whether the run
diverged: a non-finite score, or a last score above ``diverge_factor`` times the first (the starting point, for a
panel-initialised sampler the training-free winner itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

__all__ = ["ValidationSet", "Tracker", "Validator", "per_sample_rmse", "tail_objective", "OBJECTIVES", "check_objective",
           "loss_diverged"]

OBJECTIVES = ("mean", "topk", "q")


def check_objective(objective: str) -> tuple[str, float]:
    """``"mean"``, ``"topk:F"`` (the mean of the worst fraction F of per-sample errors, 0 < F <= 1) or ``"q:F"`` (their
    F-quantile, 0 < F < 1) -> (kind, F); ValueError naming the forms otherwise."""
    kind, _, frac = str(objective).partition(":")
    if kind == "mean" and not frac:
        return "mean", 0.0
    try:
        f = float(frac)
    except ValueError:
        f = float("nan")
    if (kind == "topk" and 0 < f <= 1) or (kind == "q" and 0 < f < 1):
        return kind, f
    raise ValueError(f"objective must be 'mean', 'topk:F' (0 < F <= 1: the mean of the worst F of per-sample "
                     f"errors) or 'q:F' (0 < F < 1: their F-quantile), got {objective!r}")


def tail_objective(errors: torch.Tensor, objective: str, weight: float) -> torch.Tensor:
    """mean(errors) + weight * tail(errors) over per-sample errors ``(B,)`` (``objective`` as :func:`check_objective`;
    "mean" adds nothing): the loss that weighs the samples that decide a mean RMSE (issue 21)."""
    kind, f = check_objective(objective)
    out = errors.mean()
    if kind == "mean" or not weight:
        return out
    if kind == "topk":
        k = max(1, math.ceil(f * errors.shape[0]))
        return out + weight * torch.topk(errors, k).values.mean()
    return out + weight * torch.quantile(errors, f)


def per_sample_rmse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample RMSE ``(B,)`` in float64."""
    d = (x.to(torch.float64) - target.to(torch.float64)).reshape(x.shape[0], -1)
    return (d * d).mean(dim=1).sqrt()


@dataclass
class ValidationSet:
    """Held-out teacher trajectories: noise ``(B, C, H, W)``, the teacher's final states (same shape) and labels."""

    noise: torch.Tensor
    final: torch.Tensor
    class_labels: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.noise.shape != self.final.shape or self.noise.shape[0] < 1:
            raise ValueError(f"validation: noise {tuple(self.noise.shape)} and final states {tuple(self.final.shape)} "
                             "must be one non-empty batch of the same shape")

    @classmethod
    def from_batches(cls, batches: Iterable) -> "ValidationSet":
        """From TeacherBatches (``amed_core.teacher.TeacherBatch``): their noise and last states, concatenated."""
        noise, final, labels = [], [], []
        for b in batches:
            noise.append(b.noise)
            final.append(b.states[-1])
            labels.append(b.class_labels)
        if not noise:
            raise ValueError("validation: no held-out trajectories (raise the teacher's num_trajectories or lower "
                             "the validation split)")
        lab = None if any(v is None for v in labels) else torch.cat(labels)
        return cls(torch.cat(noise), torch.cat(final), lab)

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def to(self, device) -> "ValidationSet":
        return ValidationSet(self.noise.to(device), self.final.to(device),
                             None if self.class_labels is None else self.class_labels.to(device))

    def score(self, run: Callable, *, batch_size: int = 512) -> float:
        """RMSE of ``run(noise, class_labels) -> x`` against the teacher's final states (no gradients)."""
        errs = self.errors(run, batch_size=batch_size)
        return float((errs * errs).mean().sqrt())

    def errors(self, run: Callable, *, batch_size: int = 512) -> torch.Tensor:
        """Per-sample RMSE ``(B,)`` of ``run`` against the teacher's final states (no gradients)."""
        out = []
        with torch.no_grad():
            for lo in range(0, len(self), batch_size):
                sl = slice(lo, lo + batch_size)
                labels = None if self.class_labels is None else self.class_labels[sl]
                out.append(per_sample_rmse(run(self.noise[sl], labels), self.final[sl]))
        return torch.cat(out)


@dataclass
class Tracker:
    """Validation scores of one training run: the best state, early stopping and the divergence flag."""

    patience: int = 0                  # validations without improvement that stop training (0: never stop)
    min_improvement: float = 1e-3      # relative improvement that counts
    diverge_factor: float = 10.0       # last score above this times the first: diverged
    history: list = field(default_factory=list)   # [(updates, trajectories, score)]
    best_score: float = math.inf
    best_updates: int = 0
    best_state: Optional[dict] = None
    stale: int = 0

    def record(self, updates: int, trajectories: int, score: float, state: Optional[dict] = None) -> bool:
        """Add one validation (``state``: the tensors to keep if it is the best so far); True = stop training."""
        self.history.append((int(updates), int(trajectories), float(score)))
        if math.isfinite(score) and score < self.best_score * (1 - self.min_improvement):
            self.best_score, self.best_updates, self.stale = float(score), int(updates), 0
            if state is not None:
                self.best_state = {k: v.detach().clone() for k, v in state.items()}
            return False
        if math.isfinite(score) and score < self.best_score:  # better, but not by enough to reset patience
            self.best_score, self.best_updates = float(score), int(updates)
            if state is not None:
                self.best_state = {k: v.detach().clone() for k, v in state.items()}
        self.stale += 1
        return bool(self.patience) and self.stale >= self.patience

    @property
    def first_score(self) -> Optional[float]:
        return self.history[0][2] if self.history else None

    @property
    def last_score(self) -> Optional[float]:
        return self.history[-1][2] if self.history else None

    @property
    def diverged(self) -> bool:
        if not self.history:
            return False
        first, last = self.first_score, self.last_score
        return not math.isfinite(last) or (math.isfinite(first) and last > self.diverge_factor * first)

    @property
    def improved(self) -> bool:
        """Whether any validation after the first beat the first (the starting point)."""
        return bool(self.history) and self.best_updates > self.history[0][0] and self.best_score < self.first_score

    def summary(self) -> dict:
        """JSON-able: scores, the selected point, whether it diverged or stopped early."""
        return {"scores": [list(h) for h in self.history], "first": self.first_score, "last": self.last_score,
                "best": self.best_score if math.isfinite(self.best_score) else None, "best_updates": self.best_updates,
                "improved": self.improved, "diverged": self.diverged}


class Validator:
    """What a training loop calls (``train_amed``, ``train_epd``): :meth:`check` at the start, :meth:`after_batch`
    after each batch (True: stop), :meth:`finish` at the end (restores the best state when ``cfg.select`` is "best").
    ``run(noise, labels) -> x`` samples with ``module`` as it is; ``cfg`` has patience, diverge_factor, val_every and
    select (TrainConfig / EPDTrainConfig)."""

    def __init__(self, validation: ValidationSet, module: torch.nn.Module, run: Callable, cfg):
        self.tracker = Tracker(cfg.patience, diverge_factor=cfg.diverge_factor)
        self.vset = validation.to(next(module.parameters()).device)
        self.module, self.run, self.every, self.select = module, run, cfg.val_every, cfg.select
        self.at: Optional[int] = None

    def check(self, updates: int, trajectories: int) -> bool:
        self.module.eval()
        score = self.vset.score(self.run)
        self.module.train()
        self.at = updates
        return self.tracker.record(updates, trajectories, score, self.module.state_dict())

    def after_batch(self, k: int, updates: int, trajectories: int) -> bool:
        return bool(self.every) and (k + 1) % self.every == 0 and self.check(updates, trajectories)

    def finish(self, updates: int, trajectories: int) -> tuple[dict, bool]:
        """(the tracker's summary, diverged) after a last check where the last batch was not validated."""
        if self.at != updates:
            self.check(updates, trajectories)
        if self.select == "best" and self.tracker.best_state is not None:
            self.module.load_state_dict(self.tracker.best_state)
        return self.tracker.summary(), self.tracker.diverged


def loss_diverged(losses: list, factor: float = 10.0) -> bool:
    """Whether a run's training loss ended far above where it started: the last batch's summed loss non-finite or
    above ``factor`` x the first batch's (``losses``: per batch, per step, as :attr:`TrainResult.losses`)."""
    if not losses:
        return False
    first, last = float(sum(losses[0])), float(sum(losses[-1]))
    return not math.isfinite(last) or (math.isfinite(first) and last > factor * first)

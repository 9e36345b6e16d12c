"""Every learned family started from the training-free panel's winner at its (teacher, NFE) (ours, issue 21 item 3).

The winner is a free sampler (:class:`Winner`: solver, its explicit grid, AFS, options). Then:

- **AMED** (:func:`amed_init`): the plugin on the winner's own solver (``PLUGIN_FOR``: iPNDM, DPM-Solver++, DEIS,
  UniPC, Euler; DPM-Solver-2 and Heun through ``amed+dpm``) sits on the winner's grid: the winner's M intervals are
  paired into AMED steps (coarse points t_i, the point between them is s_i), an odd M leaves one single-evaluation
  step (``single_step_at``: first or last), AFS and options as the winner's (the AFS estimate in the history, as the
  free solvers keep it). The predictor gets one r logit per step (``PredictorConfig.step_bias``) set to
  r_i = log(s_i / t_i) / log(t_{i+1} / t_i) and zero heads (:func:`amed_core.amed.predictor.init_from_steps`):
  before training the sampler *is* the winner, to rounding (``AMEDInit.exact``; tests/test_panel_init.py). Where no
  plugin reproduces the winner (variable-step iPNDM: the constant-step plugin on its grid; UniPC's extra warm-up
  corrector on grids of <= max_order points), ``exact`` is False and only the validation fallback guards the result.
- **EPD** (:func:`epd_init`): EPD's step x_{n+1} = x_n + h sum_k lambda_k d_k has no multistep history, so it cannot
  reproduce a multistep winner; it starts on the winner's grid (paired like AMED's when the NFE allows, else the
  winner's schedule at EPD's N) with its K points spread around the winner's intermediate point, equal weights and
  unit scales (the reference starts from random tables). ``exact`` is False: validation decides.
- **GITS** (:func:`gits_fine_grid`): the winner's base solver and options, and a fine grid that contains the
  winner's points, so the DP can return the winner's schedule itself; the fit keeps the winner's schedule unless
  the selected one is better on held-out trajectories (:func:`amed_core.families.gits.fit` ``keep=``).

A trained candidate that validation finds no better than its start stays there (``select="best"``), so a
panel-initialised AMED candidate is never worse than the winner on validation by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["Winner", "AMEDInit", "EPDInit", "PLUGIN_FOR", "amed_init", "amed_spec", "amed_predictor", "epd_init",
           "gits_fine_grid", "SINGLE_STEP_AT", "START_LR"]

# Adam's learning rate for a panel-started AMED predictor (the recipe's 5e-3 is for a random start; a start at the
# winner is already good, so smaller steps: bench/factors.py uses it, the sweep's init.lr defaults to it; its
# validation table moves it 10x).
START_LR = 1e-3

# The AMED plugin that runs each training-free solver's own update on the refined grid.
PLUGIN_FOR = {"ipndm": "amed+ipndm", "dpmpp": "amed+dpmpp", "deis": "amed+deis", "unipc": "amed+unipc",
              "euler": "amed+euler", "dpm2": "amed+dpm", "heun": "amed+dpm", "ipndm_v": "amed+ipndm"}
_PLUGIN_OPTIONS = ("max_order", "predict_x0", "lower_order_final", "dynamic_thresholding", "deis_mode", "variant")
SINGLE_STEP_AT = ("first", "last")


@dataclass(frozen=True)
class Winner:
    """A training-free sampler: ``solver`` on the explicit grid ``sigmas``, with ``afs`` and ``options``;
    ``schedule``: the ScheduleSpec JSON the grid came from (optional)."""

    solver: str
    sigmas: tuple[float, ...]
    afs: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    schedule: Mapping[str, Any] | None = None

    def __post_init__(self):
        from ..methods import get_method

        if get_method(self.solver).family != "free":
            raise ValueError(f"winner: {self.solver!r} is not a training-free solver")
        s = tuple(float(v) for v in self.sigmas)
        if len(s) < 2 or any(not v > 0 for v in s) or any(b >= a for a, b in zip(s, s[1:])):
            raise ValueError("winner: sigmas must be at least 2 positive, strictly decreasing values")
        object.__setattr__(self, "sigmas", s)
        object.__setattr__(self, "options", {k: v for k, v in dict(self.options).items() if k != "afs"})

    @property
    def nfe(self) -> int:
        from ..methods import nfe_for

        return nfe_for(self.solver, len(self.sigmas), self.afs, self.options)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Winner":
        """From a free sampler's ``sampler.json`` (StaticSpec) or a dict with solver, sigmas, afs, options."""
        unknown = set(d) - {"solver", "sigmas", "afs", "options", "schedule", "kind", "method", "nfe", "teacher",
                            "fit", "format_version", "num_steps", "id", "value"}
        if unknown:
            raise ValueError(f"winner: unknown field(s) {sorted(unknown)}")
        opts = dict(d.get("options") or {})
        afs = bool(d.get("afs", opts.get("afs", False)))
        return cls(str(d["solver"]), tuple(d["sigmas"]), afs, opts, d.get("schedule"))

    def to_dict(self) -> dict:
        return {"solver": self.solver, "sigmas": list(self.sigmas), "afs": self.afs, "options": dict(self.options),
                "schedule": None if self.schedule is None else dict(self.schedule)}

    def sampler(self, teacher: Mapping | None = None):
        """The winner as a free sampler (:class:`amed_core.families.StaticSampler`)."""
        from .static import StaticSampler, StaticSpec

        return StaticSampler(StaticSpec("free", self.solver, self.solver, self.nfe, self.sigmas, self.afs,
                                        dict(self.options), self.schedule, dict(teacher or {})))


@dataclass(frozen=True)
class AMEDInit:
    """Where a panel-initialised AMED sampler starts: the plugin, its coarse grid (N points), r per step (1.0 on
    single steps, unused), the single steps, AFS, plugin options, and whether it reproduces the winner."""

    solver: str
    sigmas: tuple[float, ...]
    r: tuple[float, ...]
    single_steps: tuple[int, ...]
    afs: bool
    options: Mapping[str, Any]
    exact: bool
    nfe: int


def _pair(sigmas: Sequence[float], single_step_at: str):
    """Pair a grid's intervals into AMED steps: (coarse points, r per step, single-step indices)."""
    if single_step_at not in SINGLE_STEP_AT:
        raise ValueError(f"single_step_at must be one of {SINGLE_STEP_AT}, got {single_step_at!r}")
    T = list(sigmas)
    M = len(T) - 1
    single_first = M % 2 == 1 and single_step_at == "first"
    coarse, r, single = [T[0]], [], []
    j = 0
    while j < M:
        one = (single_first and j == 0) or (M % 2 == 1 and not single_first and j == M - 1)
        if one:
            single.append(len(r))
            r.append(1.0)
            j += 1
        else:
            t_cur, s, t_next = T[j], T[j + 1], T[j + 2]
            r.append(math.log(s / t_cur) / math.log(t_next / t_cur))
            j += 2
        coarse.append(T[j])
    return tuple(coarse), tuple(r), tuple(single)


def amed_init(winner: Winner, *, single_step_at: str = "first") -> AMEDInit:
    """The AMED start that reproduces ``winner`` (see the module docstring)."""
    from ..methods import get_method, nfe_for

    plugin = PLUGIN_FOR.get(winner.solver)
    if plugin is None:
        raise ValueError(f"no AMED plugin starts from {winner.solver!r}; winners it can start from: {sorted(PLUGIN_FOR)}")
    accepted = get_method(plugin).options
    opts = {k: v for k, v in winner.options.items() if k in _PLUGIN_OPTIONS and k in accepted}
    if "afs_in_history" in accepted:
        opts["afs_in_history"] = True  # the free solvers keep the AFS estimate in their history
    exact = winner.solver not in ("ipndm_v", "heun")
    if winner.solver in ("heun", "dpm2"):  # single-step methods with their own intermediate point: the same grid
        r_fixed = 1.0 if winner.solver == "heun" else float(winner.options.get("r", 0.5))
        coarse, r, single = winner.sigmas, (r_fixed,) * (len(winner.sigmas) - 1), ()
    else:
        coarse, r, single = _pair(winner.sigmas, single_step_at)
        if winner.solver == "unipc" and len(winner.sigmas) <= int(winner.options.get("max_order", 3)) \
                and winner.options.get("warmup_final_corrector", True):
            exact = False  # the free solver's extra warm-up corrector: the plugin never spends it
    nfe = nfe_for(plugin, len(coarse), winner.afs, {"single_steps": single})
    if exact and nfe != winner.nfe:
        raise ValueError(f"amed_init: {plugin} on the winner's grid spends {nfe} evaluations, the winner "
                         f"{winner.nfe} (a bug: please report)")
    return AMEDInit(plugin, tuple(coarse), tuple(r), single, winner.afs, opts, exact, nfe)


def amed_spec(init: AMEDInit, *, predictor=None, denoiser=None, schedule=None):
    """The SamplerSpec of ``init``: the winner's coarse grid as explicit sigmas, its single steps, AFS and options, and
    a predictor config with one r logit per step (``predictor``: the sizes and scale ranges to start from)."""
    from dataclasses import replace

    from ..amed import PredictorConfig, SamplerSpec
    from ..schedules import ScheduleSpec

    pc = replace(predictor or PredictorConfig(), step_bias=len(init.sigmas) - 1)
    sched = schedule or ScheduleSpec("polynomial", sigma_min=init.sigmas[-1], sigma_max=init.sigmas[0])
    return SamplerSpec.create(init.solver, init.nfe, afs=init.afs, schedule=sched, predictor=pc, denoiser=denoiser,
                              single_steps=init.single_steps or None, sigmas=init.sigmas, **dict(init.options))


def amed_predictor(spec, init: AMEDInit, *, seed: int = 0):
    """An AMEDPredictor for ``spec`` that is the fixed policy of ``init.r`` (the winner, before any training)."""
    from ..amed import AMEDPredictor, init_from_steps

    return init_from_steps(AMEDPredictor(spec.predictor, seed=seed), init.r)


@dataclass(frozen=True)
class EPDInit:
    """Where a panel-initialised EPD sampler starts: its grid (N points), AFS, and the raw tables' start values."""

    sigmas: tuple[float, ...]
    afs: bool
    r: tuple[tuple[float, ...], ...]      # (N - 1, K) values in (0, 1)
    exact: bool = False


def epd_init(winner: Winner, nfe: int, num_points: int) -> EPDInit:
    """EPD on the winner's grid (see the module docstring): paired like AMED's where 2 (N - 1) - afs = ``nfe`` allows,
    else the winner's schedule regenerated at EPD's N (AFS where the NFE is odd); K points at r_k spread evenly
    around the winner's intermediate point (or the geometric midpoint)."""
    from ..methods import num_steps_for
    from ..schedules import ScheduleSpec

    M = len(winner.sigmas) - 1
    afs = nfe % 2 == 1
    mids = None
    if M % 2 == 0 and 2 * (M // 2) - int(afs) == nfe:
        coarse, r0, _ = _pair(winner.sigmas, "first")
        mids = r0
    else:
        N = num_steps_for("epd", nfe, afs)
        if winner.schedule is None:
            raise ValueError("epd_init: the winner's grid does not pair into EPD steps at this NFE and it names no "
                             "schedule to regenerate at EPD's number of points")
        coarse = tuple(float(v) for v in ScheduleSpec.from_dict(dict(winner.schedule)).grid(N))
    K = int(num_points)
    rows = []
    for i in range(len(coarse) - 1):
        centre = mids[i] if mids is not None else 0.5
        spread = [centre] if K == 1 else [min(max(centre + 0.25 * (k / (K - 1) - 0.5), 0.02), 0.98) for k in range(K)]
        rows.append(tuple(spread))
    return EPDInit(tuple(coarse), afs, tuple(rows))


def gits_fine_grid(base, winner_sigmas: Sequence[float]):
    """The GITS teacher's fine grid with the winner's points in it: the union of ``base`` (the configured fine grid)
    and the winner's grid (:func:`amed_core.schedules.union`; every point kept exactly)."""
    import torch

    from ..schedules import union

    return union(torch.as_tensor(base, dtype=torch.float64), torch.tensor(list(winner_sigmas), dtype=torch.float64))

"""The method table: one entry per sampler name, holding every fact the rest of the code asks about it.

A :class:`Method` names its solver function (the shared solver signature, :mod:`amed_core.solvers`), its
family (``"free"``: training-free solvers; ``"amed"``: AMED-Solver and AMED-Plugins, arXiv 2312.00094;
``"gits"``: a base solver on a GITS schedule; ``"epd"``: EPD-Solver / EPD-Plugin; ``"gs"``: GS, the generalized
solver), the
denoiser evaluations it spends per step, the training-free solver a learned method builds on (``base``: the
reference's teacher for the plugins and the baseline at equal NFE), whether it carries a multistep history,
and its default schedule and options (the diff-solvers reference's recommended settings, its launch.sh).

Adding a family is adding entries to :data:`METHODS` (its sampler module must not import this one: the table
imports the families, the families import only :mod:`amed_core.solvers`). The NFE <-> N mapping
(:func:`evals_per_step`, :func:`nfe_for`, :func:`num_steps_for`) and the name -> function registry
(:func:`get_solver`, :func:`solve`) read the table and nothing else.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from ..schedules import ScheduleSpec
from ..solvers import COMMON_OPTIONS, SolveResult, deis, dpm2, dpmpp, euler, heun, ipndm, ipndm_v, unipc
from . import amed as _amed
from . import epd as _epd
from . import gs as _gs

__all__ = ["Method", "METHODS", "FAMILIES", "SOLVERS", "get_method", "method_names", "evals_per_step", "nfe_for",
           "num_steps_for", "pick_afs", "get_solver", "solver_options", "solve"]


def _amed_single_steps(num_steps: int, options: Mapping[str, Any]) -> int:
    """AMED's single-evaluation steps (``single_steps``) each save one evaluation."""
    return -_amed.single_step_count(options)


def _unipc_final_corrector(num_steps: int, options: Mapping[str, Any]) -> int:
    """UniPC's extra evaluation: on grids with N <= max_order the final step is a warm-up step and the reference
    corrects it (one more NFE) unless ``warmup_final_corrector=False`` (see :mod:`amed_core.solvers.unipc`)."""
    warm = options.get("warmup_final_corrector", True) and num_steps <= options.get("max_order", 3)
    return int(bool(warm))


@dataclass(frozen=True)
class Method:
    """One sampler: its function and the facts about it (see the module docstring).

    ``default_options``: keyword options used unless the caller overrides them (for the AMED solvers: their
    keyword defaults; None = follow another option, e.g. dynamic_thresholding follows predict_x0).
    ``options``: the keyword options ``fn`` accepts besides the common ones (:data:`COMMON_OPTIONS`) and
    ``policy=`` (derived from the signature). ``extra_nfe(num_steps, options)``: evaluations beyond
    ``evals_per_step * (N - 1) - afs`` (UniPC's final corrector on short grids).
    """

    name: str
    family: str
    fn: Callable[..., SolveResult]
    evals_per_step: int
    base: str | None = None
    multistep: bool = False
    default_schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    default_options: Mapping[str, Any] = field(default_factory=dict)
    extra_nfe: Callable[[int, Mapping[str, Any]], int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "default_options", MappingProxyType(dict(self.default_options)))
        unknown = sorted(set(self.default_options) - self.options)
        if unknown:
            raise ValueError(f"method {self.name!r}: default_options {unknown} are not options of {self.fn.__name__}")

    @property
    def learned(self) -> bool:
        """Whether the method has trained parameters (a learned method always names its base solver)."""
        return self.base is not None

    @property
    def options(self) -> frozenset[str]:
        """Keyword options of ``fn`` besides the common ones and ``policy``."""
        params = inspect.signature(self.fn).parameters.values()
        return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY
                         and p.name not in COMMON_OPTIONS and p.name != "policy")

    def nfe(self, num_steps: int, afs: bool, options: Mapping[str, Any] | None = None) -> int:
        """Evaluations a run on N = ``num_steps`` points spends: k (N - 1) - afs (+ :attr:`extra_nfe`)."""
        n = self.evals_per_step * (num_steps - 1) - int(bool(afs))
        if self.extra_nfe is not None:
            n += self.extra_nfe(num_steps, {**self.default_options, **(options or {})})
        return n


_EDM = ScheduleSpec("polynomial", rho=7.0)
_LOGSNR = ScheduleSpec("logsnr")

_FREE: dict[str, Method] = {m.name: m for m in (
    # Training-free solvers, with the reference's recommended schedules and options.
    Method("euler", "free", euler, 1, default_schedule=_EDM),
    Method("heun", "free", heun, 2, default_schedule=_EDM),
    Method("dpm2", "free", dpm2, 2, default_schedule=_EDM),
    Method("ipndm", "free", ipndm, 1, multistep=True, default_schedule=_EDM, default_options={"max_order": 4}),
    Method("ipndm_v", "free", ipndm_v, 1, multistep=True, default_schedule=_EDM, default_options={"max_order": 4}),
    Method("dpmpp", "free", dpmpp, 1, multistep=True, default_schedule=_LOGSNR,
           default_options={"max_order": 3, "predict_x0": True, "lower_order_final": True}),
    Method("unipc", "free", unipc, 1, multistep=True, default_schedule=_LOGSNR,
           default_options={"max_order": 3, "predict_x0": True, "lower_order_final": True, "variant": "bh2"},
           extra_nfe=_unipc_final_corrector),
    Method("deis", "free", deis, 1, multistep=True, default_schedule=ScheduleSpec("time_uniform", rho=2.0),
           default_options={"max_order": 4, "deis_mode": "tab"}),
)}
_GITS_BASES = ("ipndm", "dpmpp", "deis", "unipc", "heun", "euler")

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in (
    *_FREE.values(),
    # AMED (arXiv 2312.00094): 2 evaluations per step (AFS saves one; so does each of ``single_steps``, ours);
    # the reference's schedules. amed+deis / amed+unipc are ours (the reference has no such plugins).
    Method("amed", "amed", _amed.amed, 2, base="heun", default_schedule=ScheduleSpec("time_uniform", rho=1.0),
           default_options=_amed.step_defaults("amed"), extra_nfe=_amed_single_steps),
    Method("amed+euler", "amed", _amed.amed_euler, 2, base="euler", default_schedule=_EDM,
           default_options=_amed.step_defaults("amed+euler"), extra_nfe=_amed_single_steps),
    Method("amed+dpm", "amed", _amed.amed_dpm, 2, base="dpm2", default_schedule=_EDM,
           default_options=_amed.step_defaults("amed+dpm"), extra_nfe=_amed_single_steps),
    Method("amed+ipndm", "amed", _amed.amed_ipndm, 2, base="ipndm", multistep=True, default_schedule=_EDM,
           default_options=_amed.step_defaults("amed+ipndm"), extra_nfe=_amed_single_steps),
    Method("amed+dpmpp", "amed", _amed.amed_dpmpp, 2, base="dpmpp", multistep=True,
           default_schedule=ScheduleSpec("logsnr", rho=1.0),  # rho unused by logsnr; 1.0 as `amed train` writes it
           default_options=_amed.step_defaults("amed+dpmpp"), extra_nfe=_amed_single_steps),
    Method("amed+deis", "amed", _amed.amed_deis, 2, base="deis", multistep=True,
           default_schedule=ScheduleSpec("time_uniform", rho=2.0), default_options=_amed.step_defaults("amed+deis"),
           extra_nfe=_amed_single_steps),
    Method("amed+unipc", "amed", _amed.amed_unipc, 2, base="unipc", multistep=True,
           default_schedule=ScheduleSpec("logsnr", rho=1.0), default_options=_amed.step_defaults("amed+unipc"),
           extra_nfe=_amed_single_steps),
    # GITS (Chen et al., ICML 2024): a schedule selected from the teacher's fine grid by DP (methods/gits.py), run
    # by the base solver itself; the NFE is the base solver's on the selected points. The schedule shown is the
    # base's (unused: a GITS sampler carries its explicit sigma list).
    *(Method(f"gits+{b}", "gits", METHOD.fn, METHOD.evals_per_step, base=b, multistep=METHOD.multistep,
             default_schedule=METHOD.default_schedule, default_options=METHOD.default_options,
             extra_nfe=METHOD.extra_nfe)
      for b, METHOD in _FREE.items() if b in _GITS_BASES),
    # EPD-Solver / EPD-Plugin (Zhu et al., ICCV 2025): NFE = the paper's parallel count 2 (N - 1) - afs; the
    # denoiser calls a single GPU pays, (N - 1)(K + 1) - afs, are methods.epd.epd_total_evals.
    Method("epd", "epd", _epd.epd, 2, base="heun", default_schedule=_EDM, default_options={"batched": True}),
    Method("epd+ipndm", "epd", _epd.epd_ipndm, 2, base="ipndm", multistep=True, default_schedule=_EDM,
           default_options={"max_order": 4, "batched": True}),
    # GS (Oganov et al., arXiv 2510.17699): N steps, N denoiser calls on N + 1 learned points; its grid, model times
    # and coefficients live in the policy (methods.gs.GSParams). At initialisation (theory mode) it is multistep
    # DPM-Solver++(3M) without a lower-order final step on a grid uniform in VP time: its base and schedule here.
    Method("gs", "gs", _gs.gs, 1, base="dpmpp", multistep=True, default_schedule=ScheduleSpec("time_uniform", rho=1.0)),
)})

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(m.family for m in METHODS.values()))

# name -> solver function, read-only (the registry ``solve`` uses).
SOLVERS: Mapping[str, Callable[..., SolveResult]] = MappingProxyType({n: m.fn for n, m in METHODS.items()})


def get_method(name: str) -> Method:
    """The table entry of ``name``; ValueError naming the choices."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(METHODS)}") from None


def method_names(family: str | None = None) -> tuple[str, ...]:
    """Names in table order, all or those of one family (``"free"``, ``"amed"``, ...)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; choose one of {list(FAMILIES)}")
    return tuple(n for n, m in METHODS.items() if family is None or m.family == family)


# -- the NFE <-> N mapping -------------------------------------------------------------------------

def evals_per_step(solver: str) -> int:
    """Denoiser evaluations per step: 2 for heun, dpm2 and the AMED solvers, 1 for the other training-free solvers."""
    return get_method(solver).evals_per_step


def nfe_for(solver: str, num_steps: int, afs: bool, options: Mapping[str, Any] | None = None) -> int:
    """NFE of a run with N = num_steps grid points: k (N - 1) - afs, k evaluations per step; UniPC adds its final
    corrector on grids with N <= max_order (unless ``warmup_final_corrector=False`` in ``options``)."""
    return get_method(solver).nfe(num_steps, afs, options)


def num_steps_for(solver: str, nfe: int, afs: bool = False, options: Mapping[str, Any] | None = None) -> int:
    """The grid size N that spends exactly ``nfe`` evaluations: nfe = k (N - 1) - afs, k = :func:`evals_per_step`
    (AMED, arXiv 2312.00094: NFE = 2 (N - 1) - afs). The single implementation for every solver name.

    UniPC with N <= max_order spends one more evaluation (its final corrector, as the reference does): then the
    largest smaller grid that spends exactly ``nfe`` is used (max_order 3: NFE 2 -> N = 2, one corrected step),
    and where none does, a ValueError names the fixes (afs=True, or ``warmup_final_corrector=False``)."""
    method = get_method(solver)
    k = method.evals_per_step
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    saved = _amed.single_step_count(options) if "single_steps" in method.options else 0
    steps, rem = divmod(int(nfe) + int(bool(afs)) + saved, k)
    if rem or steps < 1:
        hint = "use afs=True for an odd nfe (AFS saves one evaluation)" if not afs else "use afs=False for an even nfe"
        if "single_steps" in method.options:
            hint += ", or make one step a single-evaluation step (single_steps)"
        raise ValueError(f"nfe={nfe} is not reachable with {solver!r} (afs={bool(afs)}): it spends {k} evaluations "
                         f"per step{' minus 1 with AFS' if afs else ''}; {hint}")
    for n in range(steps + 1, 1, -1):  # the k (N - 1) - afs grid, else a smaller one (extra evaluations)
        spent = method.nfe(n, afs, options)
        if spent == nfe:
            return n
        if spent < nfe:
            break
    raise ValueError(f"nfe={nfe} is not reachable with {solver!r} (afs={bool(afs)}): the {steps + 1}-point grid spends "
                     f"{method.nfe(steps + 1, afs, options)} (the final corrector inside the warm-up, as the reference); "
                     f"use afs=True or options warmup_final_corrector=False")


def pick_afs(solver: str, nfe: int, afs: bool | None) -> bool:
    """``afs=None`` means: AFS only where the NFE needs it (odd NFE with 2-evaluation solvers), as in the AMED paper."""
    if afs is not None:
        return bool(afs)
    return evals_per_step(solver) == 2 and nfe % 2 == 1


# -- the registry ----------------------------------------------------------------------------------

def get_solver(name: str) -> Callable[..., SolveResult]:
    """The solver function of ``name`` (ValueError naming the choices)."""
    return get_method(name).fn


def solver_options(name: str) -> list[str]:
    """Keyword options a solver accepts (beyond denoiser, x, sigmas), the common ones included."""
    sig = inspect.signature(get_solver(name))
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def solve(name: str, denoiser, x, sigmas, **options) -> SolveResult:
    """Run solver ``name``; unknown options raise a ValueError listing the allowed ones."""
    fn = get_solver(name)
    allowed = solver_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"solver {name!r} has no option(s) {unknown}; allowed: {allowed}")
    return fn(denoiser, x, sigmas, **options)

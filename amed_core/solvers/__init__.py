"""Training-free ODE solvers sharing one keyword-only signature, and the name -> function registry.

``solve(name, denoiser, x, sigmas, **options)`` validates option names against the solver's
signature and raises ``ValueError`` naming an unknown solver or option.
"""

from __future__ import annotations

import inspect
from typing import Callable

from ._common import SolveResult, StepInfo, dynamic_threshold
from .deis import deis
from .multistep import dpmpp, dpmpp_update, ipndm, ipndm_combination, ipndm_v
from .single_step import dpm2, euler, heun
from .unipc import unipc

SOLVERS: dict[str, Callable[..., SolveResult]] = {
    "euler": euler,
    "heun": heun,
    "dpm2": dpm2,
    "ipndm": ipndm,
    "ipndm_v": ipndm_v,
    "dpmpp": dpmpp,
    "unipc": unipc,
    "deis": deis,
}


def register(name: str, fn: Callable[..., SolveResult]) -> None:
    SOLVERS[name] = fn


def get_solver(name: str) -> Callable[..., SolveResult]:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def solver_options(name: str) -> list[str]:
    """Keyword options a solver accepts (beyond denoiser, x, sigmas)."""
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


__all__ = ["SOLVERS", "SolveResult", "StepInfo", "deis", "dynamic_threshold", "dpm2", "dpmpp", "dpmpp_update", "euler", "heun",
           "ipndm", "ipndm_combination", "ipndm_v", "unipc", "get_solver", "register",
           "solve", "solver_options"]


# AMED-Solver and AMED-Plugins (amed, amed+euler, amed+dpm, amed+ipndm, amed+dpmpp; option policy=).
# Imported last: amed_core.amed builds on the registry above.
from ..amed.solvers import AMED_SOLVERS  # noqa: E402

SOLVERS.update(AMED_SOLVERS)

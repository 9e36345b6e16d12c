"""Training-free ODE solvers sharing one keyword-only signature.

``fn(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
callback=None, **options) -> SolveResult``. The name -> solver registry (with the learned methods) is the
method table, :mod:`amed_core.methods` (``get_method``, ``get_solver``, ``solve``).
"""

from __future__ import annotations

from ._common import SolveResult, StepInfo, dynamic_threshold
from .deis import deis
from .multistep import dpmpp, dpmpp_update, ipndm, ipndm_combination, ipndm_v
from .single_step import dpm2, euler, heun
from .unipc import unipc

__all__ = ["SolveResult", "StepInfo", "deis", "dynamic_threshold", "dpm2", "dpmpp", "dpmpp_update", "euler", "heun",
           "ipndm", "ipndm_combination", "ipndm_v", "unipc"]

"""Training-free ODE solvers sharing one keyword-only signature.

``fn(denoiser, x, sigmas, *, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
callback=None, **options) -> SolveResult``; the helpers every solver shares (:mod:`._common`) are public here
for the learned methods' step code. The name -> solver registry (with the learned methods) is the
method table, :mod:`amed_core.methods` (``get_method``, ``get_solver``, ``solve``).
"""

from __future__ import annotations

from ._common import (COMMON_OPTIONS, Callback, Counter, SolveResult, StepInfo, afs_direction, check_int_option,
                      check_thresholding, direction, dynamic_threshold, finish, multistep_order, prepare,
                      push, times_shape)
from .deis import deis
from .multistep import dpmpp, dpmpp_update, ipndm, ipndm_combination, ipndm_v
from .single_step import dpm2, euler, heun
from .unipc import unipc

__all__ = ["COMMON_OPTIONS", "Callback", "Counter", "SolveResult", "StepInfo", "afs_direction", "check_int_option",
           "check_thresholding", "direction", "finish", "multistep_order", "prepare", "push", "deis", "dynamic_threshold", "dpm2",
           "dpmpp", "dpmpp_update", "euler", "heun", "ipndm", "ipndm_combination", "ipndm_v", "times_shape", "unipc"]

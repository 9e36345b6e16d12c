"""AMED-Solver and AMED-Plugins: the step code lives in :mod:`amed_core.methods.amed` (next to the method table
that registers it); this module keeps the names importable from ``amed_core.amed.solvers``.

``BASE_SOLVER`` and ``MULTISTEP`` are views of the method table (``get_method(name).base`` / ``.multistep``).
"""

from ..methods.amed import (AMED_SOLVERS, STEPS, History, StepContext, StepOut, amed, amed_deis, amed_dpm, amed_dpmpp,
                            amed_euler, amed_ipndm, amed_unipc, make_context, resolve_options, step_defaults)
from ..methods.table import METHODS, method_names

# Base solver of each AMED solver (the reference's teacher for plugins; the baseline at equal NFE).
BASE_SOLVER = {n: METHODS[n].base for n in method_names("amed")}
MULTISTEP = frozenset(n for n in method_names("amed") if METHODS[n].multistep)

__all__ = ["AMED_SOLVERS", "BASE_SOLVER", "MULTISTEP", "STEPS", "History", "StepContext", "StepOut", "amed", "amed_deis",
           "amed_dpm", "amed_dpmpp", "amed_euler", "amed_ipndm", "amed_unipc", "make_context", "resolve_options",
           "step_defaults"]

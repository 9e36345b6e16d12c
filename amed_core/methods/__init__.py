"""Every sampler by name: the method table (:mod:`amed_core.methods.table`) and the families' step code
(:mod:`amed_core.methods.amed`: AMED-Solver and AMED-Plugins).

    m = get_method("amed+ipndm")   # m.fn, m.family, m.evals_per_step, m.base, m.multistep, m.default_schedule, ...
    N = num_steps_for("amed", nfe=5, afs=True)
"""

from .table import (FAMILIES, METHODS, SOLVERS, Method, evals_per_step, get_method, get_solver, method_names, nfe_for,
                    num_steps_for, pick_afs, solve, solver_options)

__all__ = ["FAMILIES", "METHODS", "SOLVERS", "Method", "evals_per_step", "get_method", "get_solver", "method_names",
           "nfe_for", "num_steps_for", "pick_afs", "solve", "solver_options"]

"""Baselines: which training-free sampler a learned one is compared with, and the one name it is shown by.

A baseline is a training-free solver with its options (AFS, order, DPM-Solver++ flags, thresholding) on a schedule.
The same solver name with other options is another sampler with another score (issue 19: one champion showed
"base ipndm 5.271" in ``amed fetch``, "ipndm 1.508" as the panel's best in the results table and "ipndm 1.4758" in
``amed sample --predictor``: three option sets, none shown). So every place that shows a baseline renders it with
:func:`baseline_name` (``flows.results.results_table``, ``amed fetch`` via ``flows.registry.loading.summary_lines``,
``amed sample --predictor`` via ``amed_core.amed.evaluation.compare_with_base``), and the base solver of a learned
sampler gets its options from :func:`base_options` wherever it is scored (the sweep's plan and ``amed sample``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..methods import get_method

__all__ = ["base_options", "baseline_name", "schedule_label"]


def base_options(base: str, *, afs: bool, max_order: Optional[int] = None, predict_x0: Optional[bool] = None,
                 lower_order_final: Optional[bool] = None, dynamic_thresholding: Optional[bool] = None) -> dict[str, Any]:
    """The options of the base solver ``base`` that match a learned student's (its AFS, order and DPM-Solver++ flags,
    its dynamic thresholding when set: chosen from the data range),
    as far as the base accepts them (the method table's ``options``); the order is capped at the base's default, its
    highest (dpmpp: 3). This is the base solver a sweep scores every candidate next to (``flows.plan``), and the one
    ``amed sample --predictor`` scores."""
    m = get_method(base)
    opts: dict[str, Any] = {"afs": bool(afs)}
    if "max_order" in m.options and max_order is not None:
        opts["max_order"] = min(int(max_order), int(m.default_options["max_order"]))
    for k, v in (("predict_x0", predict_x0), ("lower_order_final", lower_order_final)):
        if k in m.options:
            opts[k] = v
    if "dynamic_thresholding" in m.options and dynamic_thresholding is not None:
        opts["dynamic_thresholding"] = bool(dynamic_thresholding)
    return opts


def schedule_label(schedule: Any = None, rho: Optional[float] = None) -> str:
    """``poly7`` (polynomial, rho 7), ``time_uniform2``, ``logsnr``, ``discrete``; ``schedule`` is a ScheduleSpec, its
    dict (``to_dict``), a schedule type name or None (then "")."""
    if schedule is None:
        return ""
    if isinstance(schedule, str):
        kind = schedule
    elif isinstance(schedule, Mapping):
        kind = schedule.get("schedule_type") or schedule.get("schedule") or ""
        rho = schedule.get("rho", rho) if rho is None else rho
    else:  # a ScheduleSpec
        kind, rho = schedule.schedule_type, getattr(schedule, "rho", rho) if rho is None else rho
    if kind in ("logsnr", "discrete") or rho is None:
        return str(kind)
    return f"{'poly' if kind == 'polynomial' else kind}{float(rho):g}"


def baseline_name(solver: str, options: Optional[Mapping[str, Any]] = None, schedule: Any = None,
                  rho: Optional[float] = None) -> str:
    """The one name of a training-free sampler, with everything that changes its score:
    ``ipndm[poly7,afs=True,max_order=4]`` (schedule first, then the options sorted; ``None`` values left out).

    ``options`` are the solver's keyword options including ``afs``; ``schedule`` a ScheduleSpec, its dict, or a type
    name with ``rho``. A sampler given without options or schedule is shown by its name alone."""
    parts = [schedule_label(schedule, rho)]
    parts += [f"{k}={v}" for k, v in sorted(dict(options or {}).items()) if v is not None]
    parts = [p for p in parts if p]
    return f"{solver}[{','.join(parts)}]" if parts else str(solver)

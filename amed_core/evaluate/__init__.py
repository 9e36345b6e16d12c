"""Sampling with the training-free solvers and scoring them: the quality-vs-NFE table.

- ``seeded_noise(seeds, shape)``: one ``torch.Generator`` per sample seed (EDM's convention), so a
  sample depends only on its seed, never on the batch it was drawn in.
- ``num_steps_for(solver, nfe, afs)``: the grid size N that spends exactly ``nfe`` evaluations
  (NFE = k (N - 1) - afs, k = 2 for heun/dpm2 and the AMED solvers, 1 otherwise; see DESIGN.md). One
  implementation for every solver: it lives in :mod:`amed_core.amed.spec` and is re-exported here.
- ``sample_solver(...)``: samples of one solver at one NFE; ``reference_solution(...)``: the
  near-exact ODE solution of the same noise (for RMSE); ``quality_table(...)``: FD to exact
  mixture samples and RMSE to the near-exact solution, per solver and NFE (AMED paper, Zhou et
  al. 2024, arXiv 2312.00094, Tables 1-3 report the same kind of table with FID on real data).
  A teacher that cannot draw exact samples (a network: no ``.sample``; see ``has_exact_samples``)
  gets RMSE only: its FD fields are None.
- ``score_run(run, denoiser, ...)``: one sampler's score under a sweep's evaluation protocol (fd_exact,
  rmse or fid) on per-seed noise, resumable for FID (partial :class:`~amed_core.fid.FIDStats`).
- ``baseline_name(solver, options, schedule)``: the one name a training-free baseline is shown by, with its options
  (``ipndm[poly7,afs=True,max_order=4]``); ``base_options(base, afs=, ...)``: the base solver's options for a student.
- ``rank_samplers(...)``: many samplers on one shared noise draw (and one reference), the panel's ranking round.
- ``save_grid_png`` / ``save_side_by_side_png`` / ``save_quality_plot``: the pictures (PIL / matplotlib Agg), written atomically.

Modules: :mod:`.sampling` (noise, grids, sampling, the reference solution), :mod:`.tables` (the quality table),
:mod:`.baselines` (a baseline's options and name),
:mod:`.pictures` (PNG files), :mod:`.score` (the sweep's evaluate stage); this package re-exports their names.
"""

from ..io import atomic_write
from ..methods import evals_per_step, num_steps_for, pick_afs
from ..metrics import rmse
from .baselines import base_options, baseline_name, schedule_label
from .pictures import (figure_png, save_figure_png, save_grid_png, save_quality_plot, save_side_by_side_png,
                       shown_channels)
from .sampling import (BASE_SOLVERS, DEFAULT_OPTIONS, DEFAULT_SCHEDULES, REFERENCE_OPTIONS, REFERENCE_SOLVER, SampleRun,
                       batch_ranges, default_schedule, denoiser_range, reference_solution, sample_solver, schedule_for,
                       seeded_noise, solve_batches)
from .intervals import margin_interval, verdict
from .reference import (reference_check_spec, reference_convergence, reference_final_states, reference_points,
                        reference_spec)
from .rank import rank_samplers
from .score import SCORE_METRICS, FIDSetup, ScoreResult, score_run, to_images
from .tables import QualityRow, QualityTable, exact_samples, fmt_score, format_table, has_exact_samples, quality_table

__all__ = [
    "BASE_SOLVERS",
    "base_options",
    "baseline_name",
    "schedule_label",
    "atomic_write",
    "DEFAULT_OPTIONS",
    "DEFAULT_SCHEDULES",
    "QualityRow",
    "QualityTable",
    "SampleRun",
    "FIDSetup",
    "ScoreResult",
    "SCORE_METRICS",
    "score_run",
    "rank_samplers",
    "default_schedule",
    "denoiser_range",
    "schedule_for",
    "evals_per_step",
    "num_steps_for",
    "pick_afs",
    "quality_table",
    "reference_solution",
    "REFERENCE_SOLVER",
    "REFERENCE_OPTIONS",
    "sample_solver",
    "solve_batches",
    "figure_png",
    "save_figure_png",
    "save_grid_png",
    "shown_channels",
    "to_images",
    "save_quality_plot",
    "save_side_by_side_png",
    "seeded_noise",
    "format_table",
    "fmt_score",
    "has_exact_samples",
    "exact_samples",
    "batch_ranges",
    "rmse",
    "margin_interval",
    "verdict",
    "reference_spec",
    "reference_check_spec",
    "reference_points",
    "reference_final_states",
    "reference_convergence",
]

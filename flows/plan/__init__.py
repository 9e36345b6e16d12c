"""The plan of a sweep: what it will run, as typed jobs with content-addressed store keys.

``plan_sweep(cfg) -> SweepPlan`` needs neither Prefect nor Ray; everything that can be checked is checked here,
before any work starts (a teacher that cannot be loaded, an NFE a solver cannot reach): ValueError naming the
dataset / solver / NFE. Per dataset (:func:`plan_dataset`) it loads the teacher once, builds the SamplerSpec of
every (solver, NFE) and the one TeacherSpec serving them all (a :class:`TeacherJob`); per (solver, NFE) the
training-free base solver at the same NFE (:func:`plan_baseline`, an :class:`EvalJob`, shared by the candidates
that compare with it); per (solver, NFE, seed) a :class:`Candidate` (:func:`plan_candidate`: a :class:`TrainJob`
and the :class:`EvalJob` scoring its checkpoint).

Ids and store keys are hashes of what determines the output (teacher spec, SamplerSpec, training config,
evaluation protocol), so a rerun finds what is already committed. The jobs are what Prefect tasks take as
parameters and Ray tasks as arguments; workers read their attributes (``job.checkpoint``), never string keys.

The package: ``jobs`` (the typed jobs and ``SweepPlan``), ``sweep`` (``plan_sweep`` and the AMED students: teacher,
base solvers, candidates), ``families`` (the training-free panel, GITS, EPD and GS candidates), ``common`` (pieces both
build from: schedules, the evaluate jobs' common fields, the teacher's identity).
"""

from flows.plan.common import eval_common, identity, schedule_for
from flows.plan.families import (
    epd_spec,
    gs_base_job,
    panel_job,
    plan_epd_candidate,
    plan_gits_candidate,
    plan_gits_teacher,
    plan_gs_candidate,
    plan_gs_teacher,
    plan_panel,
)
from flows.plan.jobs import Candidate, EvalJob, PanelSlot, ScoreSettings, SweepPlan, TeacherJob, TrainJob, slug
from flows.plan.sweep import (get_family_name, plan_baseline, plan_candidate, plan_dataset, plan_reference, plan_sweep,
                              teacher_id)

__all__ = ["TeacherJob", "TrainJob", "EvalJob", "ScoreSettings", "Candidate", "PanelSlot", "SweepPlan", "plan_sweep",
           "plan_dataset", "plan_reference", "plan_baseline", "plan_candidate", "plan_panel", "panel_job", "plan_gits_teacher",
           "plan_gits_candidate", "plan_epd_candidate", "plan_gs_teacher", "plan_gs_candidate", "gs_base_job", "teacher_id",
           "slug",
           # also public: the pieces the modules share, EPD's student spec, a method's family
           "eval_common", "identity", "schedule_for", "epd_spec", "get_family_name"]

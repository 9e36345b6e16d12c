"""The typed jobs of a plan (frozen pydantic models: Prefect task parameters, Ray task arguments) and ``SweepPlan``,
which holds them; ``slug`` makes names safe in store keys. The plan's overview is the package docstring (flows.plan)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

from flows.config import DatasetConfig
from flows.results import EvalProtocol

__all__ = ["TeacherJob", "TrainJob", "EvalJob", "RankJob", "ScoreSettings", "Candidate", "PanelSlot", "SweepPlan", "slug"]


def slug(s: str) -> str:
    """A name safe in store keys and run names: ``amed+ipndm`` -> ``amed_ipndm``, ``gmm:a/b`` -> ``gmm-a-b``."""
    return s.replace("+", "_").replace(":", "-").replace("/", "-")


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _StoreJob(_Job):
    """What every job of a sweep carries: its id, where the store is, the teacher and the worker's threads."""

    id: str
    store_url: str
    storage_options: dict[str, Any] = {}
    torch_threads: int = 1
    dataset: DatasetConfig  # paths expanded on the driver (Ray workers may lack its environment)


class TeacherJob(_Job):
    """The shared teacher of one dataset: a TeacherSpec (JSON) whose shards the teacher stage generates.

    role "students": the trajectories at the union of the student grids (AMED, EPD); role "gits": a small teacher on
    the fine grid GITS selects from (``families.gits``: warmup trajectories, grid_points points); role "gs": the end
    points only (``families.gs``: train_size + val_size trajectories); role "reference": the near-exact solution of
    every evaluation seed (metric rmse, ``amed_core.evaluate.reference_spec``), and "reference_check" the same on
    2N - 1 points for its convergence. ``reference_spec``: the reference's spec JSON, which the evaluate jobs of this
    teacher score against (None unless metric rmse)."""

    name: str                  # the dataset's name
    role: Literal["students", "gits", "gs", "reference", "reference_check"] = "students"
    dataset: DatasetConfig
    spec_json: str
    spec_hash: str
    num_shards: int
    num_trajectories: int
    store_url: str
    storage_options: dict[str, Any] = {}
    reference_spec: Optional[str] = None

    @property
    def key(self) -> str:
        """The teacher's key in a sweep: the dataset's name (role students), ``<name>:gits`` (role gits)."""
        return self.name if self.role == "students" else f"{self.name}:{self.role}"


class ScoreSettings(_Job):
    """How an evaluate job scores (``EvalProtocol`` plus what only the worker needs: batch size, FID inputs)."""

    metric: Literal["fd_exact", "rmse", "fid"]
    num_samples: int
    seed: int
    batch_size: int
    reference_steps: int
    fid_stats: Optional[str] = None            # metric fid: fsspec URLs of the user's copies
    inception_weights: Optional[str] = None


class EvalJob(_StoreJob):
    """Score a committed checkpoint (``checkpoint``) or a training-free solver (``solver``, ``num_steps``)."""

    kind: Literal["baseline", "candidate"]
    protocol: ScoreSettings
    protocol_hash: str
    grid_samples: int
    reference_spec: Optional[str] = None       # metric rmse: the stored reference's TeacherSpec JSON (scored against)
    schedule: dict[str, Any]                   # ScheduleSpec JSON
    result_key: str                            # evals/<hash>.json: the cached score
    grid_key: str                              # the PNG of the first grid_samples samples
    title: str
    checkpoint: Optional[str] = None           # candidate
    solver: Optional[str] = None               # baseline
    nfe: Optional[int] = None
    num_steps: Optional[int] = None
    solver_options: dict[str, Any] = {}
    tags: list[str] = []
    family: str = "amed"                       # candidate: the checkpoint's family; baseline: "free"
    teacher_identity: dict[str, Any] = {}      # baseline: written into its free sampler.json


class TrainJob(_StoreJob):
    """Train one predictor on the stored teacher and commit ``checkpoint/`` (train.json last)."""

    name: str
    solver: str
    nfe: int
    seed: int
    sampler_spec: dict[str, Any]               # SamplerSpec JSON
    train: dict[str, Any]                      # amed_core TrainConfig fields
    epochs: int
    teacher_hash: str
    checkpoint: str                            # key of the checkpoint folder in the run store
    tags: list[str] = []
    family: str = "amed"                       # amed | gits | epd | gs (what train_job fits)
    fit: dict[str, Any] = {}                   # gits: metric, coeff, warmup, options, afs; epd: EPDTrainConfig fields;
                                               # gs: config, init, panel, loss
    init: dict[str, Any] = {}                  # a panel start (issue 21): winner, r (per step), exact
    val_trajectories: int = 0                  # the teacher's last trajectories held out for validation
    objectives: list[str] = []                 # amed: one training per objective, the best on validation kept


class RankJob(_StoreJob):
    """The panel's ranking round at one (dataset, NFE): every entry on the first ``num_samples`` evaluation seeds in
    one task (one noise draw, one reference; amed_core.evaluate.rank_samplers). ``entries``: ids of the full-count
    jobs (in ``SweepPlan.baselines``), whose solver, schedule and options it ranks."""

    nfe: int
    num_samples: int
    seed: int
    metric: str
    batch_size: int
    reference_steps: int
    protocol_hash: str
    entries: list[EvalJob]
    result_key: str


class Candidate(_Job):
    """One trained predictor of the sweep: its training, its evaluation and the baseline it is compared with."""

    train: TrainJob
    eval: EvalJob
    base_id: str                               # "" when the base solver is not evaluated (panel.include_base_solvers)
    base_solver: str
    protocol: EvalProtocol
    family: str = "amed"
    teacher_id: str = ""

    @property
    def id(self) -> str:
        return self.train.id

    @property
    def name(self) -> str:
        return self.train.name


class PanelSlot(_Job):
    """The training-free panel of one (dataset, NFE): ids of its evaluate jobs (in ``SweepPlan.baselines``)."""

    dataset: str
    nfe: int
    teacher_id: str
    protocol: EvalProtocol
    entries: list[str]


class SweepPlan(_Job):
    sweep: str
    store_url: str
    storage_options: dict[str, Any] = {}
    teachers: list[TeacherJob]
    candidates: list[Candidate]
    baselines: list[EvalJob]
    panels: list[PanelSlot] = []
    rank: list[RankJob] = []                   # the panel's ranking round (successive halving), one job per slot
    pending_init: bool = False                 # init panel: candidates and teachers come after the ranking round

    def panel_for(self, dataset: str, nfe: int) -> Optional[PanelSlot]:
        return next((p for p in self.panels if p.dataset == dataset and p.nfe == nfe), None)

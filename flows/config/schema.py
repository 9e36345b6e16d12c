"""The sweep config's models: a dataset, the teacher, the sampler, training, evaluation, compute, and the sweep
(``SweepConfig``) that holds them with the panel and families sections (flows.config.families). The schema's
recipe and defaults are described in the package docstring (flows.config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, StrictInt, field_validator, model_validator

from amed_core.methods import get_method, method_names
from flows.config.base import MAX_NFE, MAX_OPTION_DEPTH, MAX_SEED, Name, StrictModel, depth
from flows.config.families import FamiliesConfig, InitConfig, PanelConfig
from flows.storage.checksums import json_digest
from flows.storage.credentials import secret_paths

__all__ = ["AMED_SOLVERS", "DatasetConfig", "TeacherConfig", "SamplerConfig", "TrainingConfig", "EvalConfig",
           "ComputeConfig", "SweepConfig"]


# Student solvers: the method table's AMED family (each is compared with its ``base`` solver at the same NFE).
AMED_SOLVERS = method_names("amed")


class DatasetConfig(StrictModel):
    """One dataset = one teacher denoiser.

    ``teacher`` is resolved by ``amed_core.denoisers.load_teacher(teacher, **options)``:
    ``digits-gmm`` (built in), ``gmm:PATH.npz`` (a mixture file) or a model adapter's name; adapters
    take their weights from ``weights_url`` (a local path or fsspec URL; never fetched from a hub).
    """

    name: Name = Field(description="label used in tags, store paths and registered model names")
    teacher: str = Field(description="digits-gmm | gmm:PATH.npz | <adapter name> (with weights_url)")
    weights_url: Optional[str] = Field(default=None, description="model adapters: weights file (path or URL)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options for load_teacher")
    model_id: Optional[Name] = Field(default=None, description="names the registered models (amed-<model_id>-nfe<N>); "
                                     "default: <name>-<first 8 hex of the teacher's content hash>")

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a teacher: digits-gmm, gmm:PATH.npz or a model adapter")
        if v.startswith("gmm:"):
            path = v[4:]
            if "://" not in path and not Path(path).expanduser().is_file():
                raise ValueError(f"mixture file {path!r} does not exist (gmm:PATH.npz needs an existing .npz file)")
        return v

    @model_validator(mode="after")
    def _options(self):
        unknown, allowed = _unknown_teacher_options(self.teacher, self.options)
        if unknown:
            raise ValueError(f"options: teacher {self.teacher!r} takes no option(s) {unknown}; allowed: {allowed}")
        if depth(self.options) > MAX_OPTION_DEPTH:
            raise ValueError(f"options: nested more than {MAX_OPTION_DEPTH} levels deep")
        if self.teacher.startswith("py:"):
            _check_py_teacher_paths(self.teacher, self.options)
        return self

    @property
    def analytic(self) -> bool:
        """True for Gaussian-mixture teachers (exact moments: metric fd_exact is available)."""
        return self.teacher == "digits-gmm" or self.teacher.startswith("gmm:")

    def load_kwargs(self) -> dict[str, Any]:
        kw = dict(self.options)
        if self.weights_url is not None:
            kw["weights_url"] = self.weights_url
        return kw


# A py: teacher's options are its builder's keyword arguments, which cannot be known without importing the user's code;
# a string that is plainly a local file path (an absolute, ~ or ./ path, or a weights file's suffix) must exist.
_WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".npz", ".npy", ".pkl", ".onnx", ".h5")


def _check_py_teacher_paths(teacher: str, options: dict) -> None:
    """Fail at load, before any service starts, for a missing file named by a ``py:`` teacher's options (issue 19: a
    missing weights file was reported after 118 s, once Ray and Prefect had started and the teacher was probed)."""
    import os

    for key, value in options.items():
        if not isinstance(value, str) or "://" in value:
            continue
        path = os.path.expandvars(os.path.expanduser(value))
        looks_like_path = value.startswith(("/", "~", "./", "../", "$")) or value.lower().endswith(_WEIGHTS_SUFFIXES)
        if looks_like_path and not Path(path).exists():
            raise ValueError(f"options.{key}: {value!r} does not exist (teacher {teacher!r} gets it as its {key!r}); "
                             "create the file first or fix the path")


def _unknown_teacher_options(teacher: str, options: dict) -> tuple[list[str], list[str]]:
    """Options the teacher's constructor does not take (checked here, before any service starts), and those it does."""
    import inspect

    from amed_core.adapters import BUILTIN_NETWORKS, BUILTIN_TEACHERS, TEACHER_PREFIXES, GaussianMixtureDenoiser

    if teacher in BUILTIN_TEACHERS or teacher.startswith("gmm:"):
        params = inspect.signature(GaussianMixtureDenoiser.__init__).parameters.values()
        allowed = sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        if teacher in BUILTIN_TEACHERS:
            allowed.remove("name")  # set by the built-in name
    elif teacher in BUILTIN_NETWORKS:
        allowed = sorted(TEACHER_PREFIXES["tiny-unet"])
    elif teacher.partition(":")[0] in TEACHER_PREFIXES:
        allowed = sorted(TEACHER_PREFIXES[teacher.partition(":")[0]])
    else:
        return [], []  # an unknown teacher name is reported when it is loaded (plan_sweep), naming the choices
    return sorted(set(options) - set(allowed)), allowed


class TeacherConfig(StrictModel):
    """How teacher trajectories are made and stored (one teacher per dataset serves every student)."""

    solver: str = Field(default="heun", description="training-free solver the teacher integrates with")
    M: int = Field(default=1, ge=1, le=16, description="teacher sub-steps inserted between two student points")
    num_trajectories: int = Field(default=10_000, ge=1, le=MAX_SEED, description="stored trajectories (paper: 10k)")
    shard_size: int = Field(default=1_000, ge=1, description="trajectories per shard file")
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="noise seed of trajectory 0 (trajectory i uses seed + i)")


class SamplerConfig(StrictModel):
    """Schedule and solver settings shared by students and baselines (reference flags of train.py)."""

    schedule_type: Literal["polynomial", "logsnr", "time_uniform", "discrete"] = "polynomial"
    schedule_rho: float = Field(default=7.0, gt=0)
    sigma_min: Optional[float] = Field(default=None, gt=0, description="default: the teacher's")
    sigma_max: Optional[float] = Field(default=None, gt=0, description="default: the teacher's")
    afs: Union[bool, Literal["auto"]] = Field(
        default="auto", description="analytical first step (saves one evaluation); auto: on for odd NFEs (paper)")
    max_order: Optional[int] = Field(default=None, ge=1, le=4, description="amed+ipndm (<= 4, default 4), amed+dpmpp (<= 3, default 3)")
    predict_x0: Optional[bool] = Field(default=None, description="amed+dpmpp only (default true)")
    lower_order_final: Optional[bool] = Field(default=None, description="amed+dpmpp only (default true)")
    scale_dir: float = Field(default=0.01, ge=0, description="direction scaled in [1 - s, 1 + s]")
    scale_time: float = Field(default=0.0, ge=0, description="evaluation time scaled in [1 - s, 1 + s]")
    afs_in_history: Optional[bool] = Field(
        default=None, description="amed+ipndm / amed+dpmpp: keep the AFS estimate in the multistep history "
                                  "(default true = the reference; false = the improved recipe)")

    def afs_for(self, nfe: int) -> bool:
        """AFS for this NFE: AMED spends 2 evaluations per step, so odd NFEs need AFS (NFE = 2 (N - 1) - afs)."""
        return bool(nfe % 2 == 1) if self.afs == "auto" else bool(self.afs)

    @model_validator(mode="after")
    def _range(self):
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class TrainingConfig(StrictModel):
    """Predictor training (the paper's recipe: Adam, lr 5e-3, batch 128, one pass over 10k trajectories)."""

    lr: float = Field(default=5e-3, gt=0)
    batch_size: int = Field(default=128, ge=1)
    epochs: int = Field(default=1, ge=1, description="passes over the stored teacher trajectories")
    hidden_dim: Optional[int] = Field(default=None, ge=1, description="predictor width (default: amed_core's)")
    loss_weighting: Literal["sum", "relative"] = Field(
        default="sum", description="sum (the paper) or relative (every student step weighs alike; the improved recipe)")
    # Validation and objectives (issue 21; amed_core.validation): AMED and EPD trainings.
    val_trajectories: Optional[int] = Field(
        default=None, ge=0, description="held-out teacher trajectories (the last ones) that pick the checkpoint, stop "
                                        "training and flag divergence; default min(1024, teacher.num_trajectories // 8); 0 = none")
    val_every: int = Field(default=4, ge=1, description="validate every this many batches")
    patience: int = Field(default=0, ge=0, description="validations without improvement that stop training (0: never)")
    objectives: list[str] = Field(default_factory=lambda: ["mean"], min_length=1, description="AMED: one training per "
                                  "objective (mean | topk:F | q:F), the best on validation kept")
    tail_weight: float = Field(default=1.0, ge=0, description="weight of the tail term of topk / q objectives")
    loss_target: Literal["steps", "final"] = Field(default="steps", description="AMED: a loss per student step (the "
                                                   "paper) or on the final sample only")

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        from amed_core.validation import check_objective

        for o in v:
            check_objective(o)
        if len(set(v)) != len(v):
            raise ValueError("objectives must not repeat")
        return v

    def val_count(self, num_trajectories: int) -> int:
        """Held-out trajectories for a teacher of ``num_trajectories``."""
        if self.val_trajectories is not None:
            return int(self.val_trajectories)
        return min(1024, num_trajectories // 8)


class EvalConfig(StrictModel):
    """How candidates and base solvers are scored (lower is better); per-sample seeds, so batching never matters."""

    metric: Literal["fd_exact", "rmse", "fid"] = Field(default="fd_exact")
    num_samples: int = Field(default=10_000, ge=2, le=MAX_SEED)
    seed: int = Field(default=1_000_000, ge=0, le=MAX_SEED, description="noise seed of sample 0 (disjoint from teacher seeds)")
    batch_size: int = Field(default=1_000, ge=1)
    fid_stats: Optional[str] = Field(default=None, description="metric fid: reference statistics (.npz path/URL)")
    inception_weights: Optional[str] = Field(default=None, description="metric fid: Inception weights (path/URL)")
    grid_samples: int = Field(default=64, ge=0, le=256, description="samples drawn into each PNG grid")
    reference_steps: int = Field(default=257, ge=3, le=100_000, description="metric rmse: log-SNR points of the near-exact "
                                 "reference (DPM-Solver++(3M), float64), computed once per (teacher, evaluation seeds) "
                                 "and stored beside the teacher")
    reference_check_samples: int = Field(default=256, ge=1, le=MAX_SEED, description="metric rmse: samples on which "
                                         "the reference is also solved on 2N - 1 points (its convergence, recorded)")

    @model_validator(mode="after")
    def _fid(self):
        if self.metric == "fid" and (self.fid_stats is None or self.inception_weights is None):
            raise ValueError("metric 'fid' needs fid_stats and inception_weights (nothing is downloaded)")
        return self


class ComputeConfig(StrictModel):
    """Where work runs: a local Ray (started and stopped by the flow) or the cluster at ray_address."""

    ray_address: Optional[str] = Field(default=None, description="ray://host:10001 or auto; default $RAY_ADDRESS, else local")
    num_cpus: Optional[int] = Field(default=None, ge=1, description="local Ray: CPUs (default: all)")
    object_store_memory: int = Field(default=1_000_000_000, ge=78_643_200, description="local Ray: bytes")
    cpus_per_task: float = Field(default=1.0, gt=0)
    gpus_per_task: float = Field(default=1.0, ge=0, description="requested only when the cluster has GPUs; a fraction "
                                 "(0.25: four tasks share a GPU) or a whole number; the task uses the GPU Ray assigns")
    max_parallel: int = Field(default=8, ge=1, description="training/eval tasks in flight at once")
    teacher_actors: int = Field(default=2, ge=1, description="teacher shards generated at once (Ray tasks on workers that keep the model loaded)")
    torch_threads: int = Field(default=1, ge=1, description="torch threads inside each Ray task")
    task_retries: int = Field(default=2, ge=0, description="Ray retries of a task whose worker died")

    @field_validator("gpus_per_task")
    @classmethod
    def _gpu_share(cls, v: float) -> float:
        if v > 1 and v != int(v):  # Ray's rule: fractions of one GPU, or whole GPUs
            raise ValueError(f"gpus_per_task above 1 must be a whole number of GPUs (Ray packs only fractions of one), got {v}")
        return v



class SweepConfig(StrictModel):
    """datasets x solvers x nfes x seeds, plus how to train, evaluate, store and register them."""

    name: Name = Field(default="sweep", description="names runs/<name>/ in the store and the MLflow experiment")
    datasets: list[DatasetConfig] = Field(min_length=1)
    solvers: list[str] = Field(default_factory=lambda: ["amed"], min_length=1)
    nfes: list[StrictInt] = Field(default_factory=lambda: [3, 5], min_length=1,
                                  description=f"student NFEs, integers 1..{MAX_NFE}")
    seeds: list[StrictInt] = Field(default_factory=lambda: [0], min_length=1, description=f"training seeds 0..{MAX_SEED}")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    solver_options: dict[str, SamplerConfig] = Field(
        default_factory=dict, description="per-solver sampler overrides (full SamplerConfig per named solver)")
    train: TrainingConfig = Field(default_factory=TrainingConfig)
    train_options: dict[str, TrainingConfig] = Field(
        default_factory=dict, description="per-solver training overrides (full TrainingConfig per named solver)")
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    store_url: Optional[str] = Field(default=None, description="fsspec URL (file path, s3://...); default ./amed-runs/<name>/store")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options (no secrets: use AWS_* env)")
    mlflow_tracking_uri: Optional[str] = Field(default=None, description="default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///./amed-runs/<name>/mlflow.db")
    register_models: bool = Field(default=True, description="register winners in MLflow (false: runs/<name>/results.json only)")
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    panel: PanelConfig = Field(default_factory=PanelConfig)
    families: FamiliesConfig = Field(default_factory=FamiliesConfig)
    init: InitConfig = Field(default_factory=InitConfig)

    @field_validator("solvers")
    @classmethod
    def _solvers(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in AMED_SOLVERS]
        if bad:
            raise ValueError(f"unknown solver(s) {bad}; allowed: {list(AMED_SOLVERS)}")
        if len(set(v)) != len(v):
            raise ValueError("solvers must not repeat")
        return v

    @field_validator("nfes", "seeds")
    @classmethod
    def _distinct(cls, v: list[int], info) -> list[int]:
        what, low, high = ("NFEs", 1, MAX_NFE) if info.field_name == "nfes" else ("seeds", 0, MAX_SEED)
        if any(not low <= n <= high for n in v) or len(set(v)) != len(v):
            raise ValueError(f"{what} must be distinct integers in {low}..{high} (got {v})")
        return v

    @field_validator("store_url")
    @classmethod
    def _no_url_secret(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and secret_paths(v):
            raise ValueError("the URL holds credentials (not shown); the config is recorded, so put them in the "
                             "environment instead: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        return v

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        # The config is recorded (MLflow params, sweep.json, Prefect, results.json): no secret may be in it, at any depth.
        secret = secret_paths(v)
        if secret:
            raise ValueError(f"{secret} look like credentials (values not shown); the config is recorded, so put "
                             "them in the environment instead: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                             "AWS_SESSION_TOKEN or AWS_PROFILE")
        if depth(v) > MAX_OPTION_DEPTH:
            raise ValueError(f"nested more than {MAX_OPTION_DEPTH} levels deep")
        return v

    @model_validator(mode="after")
    def _cross(self):
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets: names must be unique (got {names})")
        for field_name in ("solver_options", "train_options"):
            stray = sorted(set(getattr(self, field_name)) - set(self.solvers))
            if stray:
                raise ValueError(f"{field_name}: {stray} are not in solvers {self.solvers}")
        for s, sc in self.solver_options.items():
            if "afs_in_history" not in get_method(s).options and sc.afs_in_history is not None:
                plugins = " / ".join(m for m in AMED_SOLVERS if "afs_in_history" in get_method(m).options)
                raise ValueError(f"solver_options.{s}.afs_in_history: applies to {plugins} only")
        if self.evaluation.metric == "fd_exact":
            exact = [d.name for d in self.datasets if not d.analytic]
            if exact:
                raise ValueError(f"evaluation.metric: 'fd_exact' needs analytic (gmm) teachers; {exact} are not "
                                 "(use 'rmse' or 'fid')")
        if any(self.teacher.num_trajectories < self.train_for(s).batch_size for s in self.solvers):
            raise ValueError(f"teacher.num_trajectories ({self.teacher.num_trajectories}) must be at least "
                             f"train.batch_size ({self.train.batch_size})")
        for s in self.solvers:
            held = self.train_for(s).val_count(self.teacher.num_trajectories)
            if held >= self.teacher.num_trajectories:
                raise ValueError(f"train.val_trajectories ({held}) must leave training trajectories: lower it below "
                                 f"teacher.num_trajectories ({self.teacher.num_trajectories}) or set 0")
        for s in self.solvers:
            for nfe in self.nfes:
                _check_nfe(s, nfe, self.sampler_for(s).afs_for(nfe))
        return self

    # -- derived ----------------------------------------------------------------------------------
    def sampler_for(self, solver: str) -> SamplerConfig:
        return self.solver_options.get(solver, self.sampler)

    def train_for(self, solver: str) -> TrainingConfig:
        return self.train_options.get(solver, self.train)

    def combos(self) -> list[tuple[DatasetConfig, str, int, int]]:
        """Every (dataset, solver, nfe, seed) the sweep trains, in a stable order."""
        return [(d, s, n, seed) for d in self.datasets for s in self.solvers for n in self.nfes for seed in self.seeds]

    def resolved_store_url(self) -> str:
        return self.store_url or str(Path("amed-runs", self.name, "store").absolute())

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @property
    def hash(self) -> str:
        return json_digest(self.model_dump(mode="json"), compact=False)


def _check_nfe(solver: str, nfe: int, afs: bool) -> None:
    """Ask amed_core whether the NFE is reachable; its ValueError names the fix."""
    from amed_core.methods import num_steps_for

    try:
        n = num_steps_for(solver, nfe, afs)
    except ValueError as e:
        raise ValueError(f"nfes: {nfe} is not reachable with solver {solver!r} (sampler.afs={afs}): {e}") from None
    if n < 2:
        raise ValueError(f"nfes: {nfe} gives fewer than 2 time points with solver {solver!r}")


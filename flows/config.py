"""The sweep configuration: one typed, validated schema for YAML files and deployment parameters.

A sweep is ``datasets x solvers x NFEs x seeds``; each combination trains one AMED predictor
(Zhou et al., "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps", arXiv 2312.00094)
against a teacher shared by every student of its dataset. Defaults follow the paper's recipe
(lr 5e-3, batch 128, 10k teacher trajectories, M = 1 inserted teacher step, AFS on,
scale_dir 0.01, scale_time 0); ``configs/quickstart.yaml`` shrinks it for a 2-core laptop.

Bad configs fail before any work starts: :func:`load_sweep` raises ``ValueError`` whose lines each
name a field's path (``evaluation.metric``) and what is allowed there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from amed_core.methods import get_method, method_names
from flows.storage.checksums import json_digest
from flows.storage.credentials import secret_paths

__all__ = [
    "AMED_SOLVERS",
    "DatasetConfig",
    "TeacherConfig",
    "SamplerConfig",
    "TrainingConfig",
    "EvalConfig",
    "ComputeConfig",
    "PanelEntry",
    "PanelConfig",
    "FamiliesConfig",
    "SweepConfig",
    "load_sweep",
    "quickstart_path",
]

# Student solvers: the method table's AMED family (each is compared with its ``base`` solver at the same NFE).
AMED_SOLVERS = method_names("amed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_name(v: str) -> str:
    if not _NAME.match(v):
        raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-' (starting with a letter or digit)")
    return v


Name = Annotated[str, AfterValidator(_check_name)]  # a dataset's or a sweep's name (store paths, tags, model names)

# Bounds that keep a typo from becoming an allocation or an overflow deep inside a Ray task: NFE 10**9 asks for a
# 10**9-point grid; torch seeds are 64-bit and every trajectory adds its index to the base seed.
MAX_NFE = 1000
MAX_SEED = 2**53
# A sweep file is a few KiB; refuse large files and alias-heavy YAML (a "billion laughs" bomb) before parsing into memory.
MAX_SWEEP_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 100_000
MAX_OPTION_DEPTH = 8

def _depth(v: Any, level: int = 0) -> int:
    if level > MAX_OPTION_DEPTH:
        return level
    if isinstance(v, dict):
        return max([_depth(x, level + 1) for x in v.values()] or [level + 1])
    if isinstance(v, (list, tuple)):
        return max([_depth(x, level + 1) for x in v] or [level + 1])
    return level


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DatasetConfig(_Strict):
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
        if _depth(self.options) > MAX_OPTION_DEPTH:
            raise ValueError(f"options: nested more than {MAX_OPTION_DEPTH} levels deep")
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


class TeacherConfig(_Strict):
    """How teacher trajectories are made and stored (one teacher per dataset serves every student)."""

    solver: str = Field(default="heun", description="training-free solver the teacher integrates with")
    M: int = Field(default=1, ge=1, le=16, description="teacher sub-steps inserted between two student points")
    num_trajectories: int = Field(default=10_000, ge=1, le=MAX_SEED, description="stored trajectories (paper: 10k)")
    shard_size: int = Field(default=1_000, ge=1, description="trajectories per shard file")
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="noise seed of trajectory 0 (trajectory i uses seed + i)")


class SamplerConfig(_Strict):
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


class TrainingConfig(_Strict):
    """Predictor training (the paper's recipe: Adam, lr 5e-3, batch 128, one pass over 10k trajectories)."""

    lr: float = Field(default=5e-3, gt=0)
    batch_size: int = Field(default=128, ge=1)
    epochs: int = Field(default=1, ge=1, description="passes over the stored teacher trajectories")
    hidden_dim: Optional[int] = Field(default=None, ge=1, description="predictor width (default: amed_core's)")
    loss_weighting: Literal["sum", "relative"] = Field(
        default="sum", description="sum (the paper) or relative (every student step weighs alike; the improved recipe)")


class EvalConfig(_Strict):
    """How candidates and base solvers are scored (lower is better); per-sample seeds, so batching never matters."""

    metric: Literal["fd_exact", "rmse", "fid"] = Field(default="fd_exact")
    num_samples: int = Field(default=10_000, ge=2, le=MAX_SEED)
    seed: int = Field(default=1_000_000, ge=0, le=MAX_SEED, description="noise seed of sample 0 (disjoint from teacher seeds)")
    batch_size: int = Field(default=1_000, ge=1)
    fid_stats: Optional[str] = Field(default=None, description="metric fid: reference statistics (.npz path/URL)")
    inception_weights: Optional[str] = Field(default=None, description="metric fid: Inception weights (path/URL)")
    grid_samples: int = Field(default=64, ge=0, le=256, description="samples drawn into each PNG grid")
    reference_steps: int = Field(default=257, ge=3, description="metric rmse: grid points of the reference solution "
                                 "(teacher solver on the sampler's schedule)")

    @model_validator(mode="after")
    def _fid(self):
        if self.metric == "fid" and (self.fid_stats is None or self.inception_weights is None):
            raise ValueError("metric 'fid' needs fid_stats and inception_weights (nothing is downloaded)")
        return self


class ComputeConfig(_Strict):
    """Where work runs: a local Ray (started and stopped by the flow) or the cluster at ray_address."""

    ray_address: Optional[str] = Field(default=None, description="ray://host:10001 or auto; default $RAY_ADDRESS, else local")
    num_cpus: Optional[int] = Field(default=None, ge=1, description="local Ray: CPUs (default: all)")
    object_store_memory: int = Field(default=1_000_000_000, ge=78_643_200, description="local Ray: bytes")
    cpus_per_task: float = Field(default=1.0, gt=0)
    gpus_per_task: float = Field(default=1.0, ge=0, description="requested only when the cluster has GPUs; a fraction "
                                 "(0.25: four tasks share a GPU) or a whole number; the task uses the GPU Ray assigns")
    max_parallel: int = Field(default=8, ge=1, description="training/eval tasks in flight at once")
    teacher_actors: int = Field(default=2, ge=1, description="teacher workers (each loads the model once)")
    torch_threads: int = Field(default=1, ge=1, description="torch threads inside each Ray task")
    task_retries: int = Field(default=2, ge=0, description="Ray retries of a task whose worker died")

    @field_validator("gpus_per_task")
    @classmethod
    def _gpu_share(cls, v: float) -> float:
        if v > 1 and v != int(v):  # Ray's rule: fractions of one GPU, or whole GPUs
            raise ValueError(f"gpus_per_task above 1 must be a whole number of GPUs (Ray packs only fractions of one), got {v}")
        return v


class PanelEntry(_Strict):
    """One training-free sampler of the panel: a solver with a schedule, AFS and options (unreachable NFEs skipped)."""

    solver: str
    schedule_type: Optional[Literal["polynomial", "logsnr", "time_uniform", "discrete"]] = Field(
        default=None, description="default: the solver's own (the method table's)")
    schedule_rho: Optional[float] = Field(default=None, gt=0)
    afs: Union[bool, Literal["auto"]] = Field(default=False, description="auto: on where the NFE needs it")
    options: dict[str, Any] = Field(default_factory=dict, description="solver options (over the table's defaults)")

    @field_validator("solver")
    @classmethod
    def _free(cls, v: str) -> str:
        if v not in method_names("free"):
            raise ValueError(f"panel solvers are training-free solvers {list(method_names('free'))}, got {v!r}")
        return v


def _default_panel() -> list[PanelEntry]:
    return [PanelEntry(solver="ipndm"), PanelEntry(solver="ipndm", afs=True), PanelEntry(solver="dpmpp"),
            PanelEntry(solver="deis"), PanelEntry(solver="heun", afs="auto")]


class PanelConfig(_Strict):
    """The training-free panel evaluated at every (dataset, NFE): its best entry is the baseline of every candidate."""

    entries: list[PanelEntry] = Field(default_factory=_default_panel)
    include_base_solvers: bool = Field(default=True, description="each candidate's base solver joins the panel")
    expand: list[str] = Field(default_factory=list, description="solvers whose every option set joins the panel: AFS "
                              "on/off, polynomial 7 / logsnr / time_uniform, dynamic thresholding on/off (dpmpp, unipc)")

    @field_validator("expand")
    @classmethod
    def _expand(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in method_names("free")]
        if bad:
            raise ValueError(f"panel.expand: {bad} are not training-free solvers {list(method_names('free'))}")
        return v


class GITSFamilyConfig(_Strict):
    """GITS candidates (a base solver on a schedule chosen by DP from a fine stored teacher grid)."""

    solvers: list[str] = Field(default_factory=list, description="base solvers, e.g. [ipndm] -> gits+ipndm")
    metric: Literal["dev", "l1", "l2"] = "dev"
    coeff: float = Field(default=1.15, gt=0)
    warmup: int = Field(default=256, ge=1, description="teacher trajectories the cost matrix is built from")
    grid_points: int = Field(default=41, ge=3, le=1001, description="points of the fine teacher grid GITS selects from")
    schedule_type: Literal["polynomial", "logsnr", "time_uniform"] = "polynomial"
    schedule_rho: float = Field(default=7.0, gt=0)
    sub_steps: int = Field(default=1, ge=1, le=16, description="teacher sub-steps between two fine-grid points")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per base solver options")

    @field_validator("solvers")
    @classmethod
    def _bases(cls, v: list[str]) -> list[str]:
        ok = [get_method(m).base for m in method_names("gits")]
        bad = [s for s in v if s not in ok]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"gits solvers must be distinct base solvers among {ok}, got {v}")
        return v


class EPDFamilyConfig(_Strict):
    """EPD candidates (K parallel directions per step, trained on the stored teacher at the student grid)."""

    solvers: list[Literal["epd", "epd+ipndm"]] = Field(default_factory=list)
    num_points: int = Field(default=2, ge=1, le=8)
    scale_dir: float = Field(default=0.01, ge=0)
    scale_time: float = Field(default=0.0, ge=0)
    afs: Union[bool, Literal["auto"]] = "auto"
    max_order: int = Field(default=4, ge=1, le=4)
    schedule_type: Literal["polynomial", "logsnr", "time_uniform"] = "polynomial"
    schedule_rho: float = Field(default=7.0, gt=0)
    # Our recipe (bench/families.py on digits-gmm): from the reference's random init, lr 5e-3 and one pass leave
    # the tables far from trained (FD 670 at NFE 5); lr 5e-2, 8 passes, relative weighting reach FD 0.16.
    lr: float = Field(default=5e-2, gt=0, description="Adam lr (the reference: 5e-3)")
    batch_size: int = Field(default=128, ge=1)
    epochs: int = Field(default=8, ge=1, description="passes over the stored teacher (the reference: 1)")
    loss_weighting: Literal["sum", "relative"] = "relative"


class FamiliesConfig(_Strict):
    gits: GITSFamilyConfig = Field(default_factory=GITSFamilyConfig)
    epd: EPDFamilyConfig = Field(default_factory=EPDFamilyConfig)


class SweepConfig(_Strict):
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

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        # The config is recorded (MLflow params, sweep.json, Prefect, results.json): no secret may be in it, at any depth.
        secret = secret_paths(v)
        if secret:
            raise ValueError(f"{secret} look like credentials (values not shown); the config is recorded, so put "
                             "them in the environment instead: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                             "AWS_SESSION_TOKEN or AWS_PROFILE")
        if _depth(v) > MAX_OPTION_DEPTH:
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


def _format(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            allowed = sorted(parent.model_fields) if parent is not None else []
            msg = f"unknown field; allowed here: {allowed}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        got = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
            shown = repr(got)
            msg += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
        lines.append(f"  {loc}: {msg}")
    return "invalid sweep config:\n" + "\n".join(lines)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = SweepConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
            for inner in getattr(cand, "__args__", ()):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    nxt = inner
        model = nxt
    return model


def quickstart_path() -> Path:
    """configs/quickstart.yaml of this checkout, or of the installed wheel (flows/configs, a link to ../configs)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "configs" / "quickstart.yaml", here / "configs" / "quickstart.yaml"):
        if cand.is_file():
            return cand
    raise ValueError("configs/quickstart.yaml not found: pass a sweep file (amed distill PATH.yaml)")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a long one-line YAML text taken for a file name
        return False


def _read_sweep_file(path: Path, name: str) -> str:
    """The text of a sweep file: a regular file of at most MAX_SWEEP_BYTES (checked before reading; a FIFO or a
    device would block or never end)."""
    import stat

    try:
        st = path.stat()
    except FileNotFoundError:
        raise ValueError(f"sweep file {name!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"sweep file {name!r} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"sweep file {name!r} is not a regular file; give the path of a YAML/JSON file")
    if st.st_size > MAX_SWEEP_BYTES:
        raise ValueError(f"sweep file {name!r} is {st.st_size} bytes; a sweep config is at most {MAX_SWEEP_BYTES} "
                         "bytes (is it the right file?)")
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"sweep file {name!r} is not UTF-8 text (a YAML/JSON sweep config is)") from None


def _safe_yaml(text: str) -> Any:
    """yaml.safe_load after refusing, on the event stream (aliases not expanded), text that is too large or uses too
    many aliases (a "billion laughs" bomb expands a few hundred bytes into gigabytes)."""
    import yaml

    if len(text) > MAX_SWEEP_BYTES:
        raise ValueError(f"sweep config is {len(text)} characters; at most {MAX_SWEEP_BYTES} are read")
    try:
        aliases, sizes, stack = 0, {}, [[None, 0]]  # stack: [anchor, expanded node count] per open collection
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                stack[-1][1] += sizes.get(event.anchor, 1)
            elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                stack.append([event.anchor, 1])
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, n = stack.pop()
                if anchor is not None:
                    sizes[anchor] = n
                stack[-1][1] += n
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor is not None:
                    sizes[event.anchor] = 1
                stack[-1][1] += 1
            if aliases > MAX_YAML_ALIASES or stack[0][1] > MAX_YAML_NODES or any(f[1] > MAX_YAML_NODES for f in stack[-1:]):
                raise ValueError(f"sweep config expands, through YAML aliases (*name), to more than {MAX_YAML_NODES} values "
                                 f"or uses more than {MAX_YAML_ALIASES} aliases; write the values out instead")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"sweep config is not valid YAML/JSON: {e}") from None


def load_sweep(source: Union["SweepConfig", dict, str, Path], **overrides: Any) -> SweepConfig:
    """A validated SweepConfig from a model, a dict, a YAML/JSON file path or a YAML/JSON string.

    ``overrides`` replace top-level fields (e.g. ``store_url=``). Raises ValueError listing every bad
    field's path and what is allowed.
    """
    if isinstance(source, SweepConfig):
        data = source.model_dump(mode="json")
    elif isinstance(source, dict):
        data = dict(source)
    elif isinstance(source, (str, Path)):
        text = str(source)
        path = Path(text).expanduser()
        if isinstance(source, Path) or (("\n" not in text) and (text.endswith((".yaml", ".yml", ".json")) or _is_file(path))):
            text = _read_sweep_file(path, text)
        data = _safe_yaml(text)
        if not isinstance(data, dict):
            raise ValueError("sweep config must be a mapping with at least 'datasets'")
    else:
        raise ValueError(f"sweep must be a SweepConfig, dict, or path/YAML text, not {type(source).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        raise ValueError(_format(e)) from None

"""The candidate families beyond AMED and the training-free panel (sections ``panel`` and ``families`` of a sweep)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from amed_core.methods import get_method, method_names
from flows.config.base import StrictModel

__all__ = ["PanelEntry", "PanelConfig", "GITSFamilyConfig", "EPDFamilyConfig", "GSFamilyConfig", "FamiliesConfig",
           "InitConfig", "DEFAULT_EXPAND"]


class PanelEntry(StrictModel):
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


# The panel searches schedules by default (issue 21): every option set of these solvers joins it.
DEFAULT_EXPAND = ("ipndm", "deis", "dpmpp", "unipc")


class PanelConfig(StrictModel):
    """The training-free panel evaluated at every (dataset, NFE): its best entry is the baseline of every candidate.

    Successive halving (``rank_samples`` > 0): every entry is first scored on the first ``rank_samples`` evaluation
    seeds (at most ``evaluation.num_samples``; one task per (dataset, NFE), one noise draw; fd_exact on those samples,
    else the RMSE to one near-exact reference: amed_core.evaluate.rank), and only
    the best ``finalists`` per (dataset, NFE) on the full ``evaluation.num_samples`` (the same seeds from the same
    start, so a finalist's number is what a full-count run gives); the others keep their ranking score (marked in
    results.json). With ``init.mode: panel`` the ranking round's best entry is where the learned candidates
    start, and their trainings are submitted before the finalists' full-count scores."""

    entries: list[PanelEntry] = Field(default_factory=_default_panel)
    include_base_solvers: bool = Field(default=True, description="each candidate's base solver is evaluated and joins "
                                       "the panel (false: neither; every candidate is compared with the panel alone)")
    expand: list[str] = Field(default_factory=lambda: list(DEFAULT_EXPAND),
                              description="solvers whose every option set joins the panel: AFS on/off, polynomial 7 / "
                              "logsnr / time_uniform, dynamic thresholding on/off (dpmpp, unipc); [] = the entries only")
    rank_samples: int = Field(default=512, ge=0, description="successive halving: samples every entry is ranked on "
                              "(capped at evaluation.num_samples; 0: no ranking, every entry its own full-count job)")
    finalists: int = Field(default=4, ge=1, description="entries per (dataset, NFE) scored on the full count")

    @field_validator("expand")
    @classmethod
    def _expand(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in method_names("free")]
        if bad:
            raise ValueError(f"panel.expand: {bad} are not training-free solvers {list(method_names('free'))}")
        return v


class GITSFamilyConfig(StrictModel):
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


class EPDFamilyConfig(StrictModel):
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


class GSFamilyConfig(StrictModel):
    """GS candidates (the generalized solver, arXiv 2510.17699: a learned grid, model times and corrections to
    DPM-Solver++(3M)'s coefficients) at every NFE of the sweep, one per initialisation and seed, trained on the final
    samples of an endpoint-only teacher of each dataset (train_size + val_size trajectories, its two end points stored).
    Defaults: the reference's (configs/edm/cifar10.yaml, main.py), except the loss (L2: LPIPS weights are not here)."""

    inits: list[Literal["reference", "panel"]] = Field(
        default_factory=list, description="reference: the time-uniform grid; panel: the schedule of the panel's best "
        "entry at that NFE that GS can express (N + 1 points, one evaluation per step, no AFS); empty: no GS")
    order: Optional[int] = Field(default=None, ge=1, le=1000, description="history length (default: the NFE, as the "
                                 "reference's scripts; capped at the NFE)")
    theory: bool = Field(default=True, description="DPM-Solver++-based update (the paper's configs); false: S4S form")
    t_eps: float = Field(default=1e-3, gt=0, lt=1, description="the student's end time in VP time (CIFAR-10: 1e-3)")
    end: Literal["reference", "net"] = Field(default="reference", description="reference: end at the paper VP's "
                                             "sigma(t_eps) (0.0105); net: at the teacher's own sigma_min")
    s4s_rescale: Literal["twice", "once"] = "twice"
    clip_model_time: bool = False
    output: Literal["vp", "edm"] = "vp"
    start: Literal["vp", "edm"] = "vp"
    loss: str = Field(default="l2", description="l2, or py:package.module:function returning a distance (x, y) -> (B,) "
                      "per-sample values (imports and runs that code on every Ray worker, like py: teachers)")
    iterations: int = Field(default=10_000, ge=1, le=10_000_000)
    batch_size: int = Field(default=24, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    eval_every: int = Field(default=500, ge=1, description="validation (EMA parameters) every this many iterations")
    keep: Literal["best", "last"] = "best"
    train_size: int = Field(default=1400, ge=1, le=10_000_000, description="teacher pairs trained on")
    val_size: int = Field(default=1000, ge=1, le=10_000_000, description="held-out teacher pairs (best checkpoint)")
    teacher_steps: int = Field(default=64, ge=2, le=4096, description="teacher solver steps between the stored end "
                               "points (the reference's teacher: UniPC, 20 steps)")

    @field_validator("inits")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"inits must not repeat, got {v}")
        return v

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        if v != "l2" and not (v.startswith("py:") and ":" in v[3:]):
            raise ValueError(f"must be 'l2' or 'py:package.module:function', got {v!r}")
        return v

    @model_validator(mode="after")
    def _batch(self):
        if self.batch_size > self.train_size:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed train_size ({self.train_size}): "
                             "batches drop the remainder, as the reference's loader does")
        return self


class InitConfig(StrictModel):
    """Where learned candidates start (issue 21). ``panel``: from the training-free panel's best entry at their
    (dataset, NFE) (``amed_core.families.init``): one AMED candidate per (dataset, NFE, seed), the plugin of the
    winner's solver on the winner's grid, reproducing it before training (``solvers`` is then not used); EPD on the
    winner's grid; GITS on the winner's solver with its fine grid containing the winner's points. Validation keeps
    a candidate at its start unless training helps. ``recipe``: the paper's recipes (``solvers``, the configured
    schedules, random predictor init; the presets under configs/presets/ use it). ``both``: the panel starts and the
    recipe's AMED students (``solvers``) on one teacher; the champion is the best of all (a recipe can find a better
    optimum than the panel's grid: bench/factors.py)."""

    mode: Literal["panel", "recipe", "both"] = "panel"
    lr: float = Field(default=1e-3, gt=0, description="Adam lr of panel-started AMED predictors (amed_core.families.init."
                      "START_LR; train.lr is the recipe's, for a random start)")
    single_step_at: Literal["first", "last"] = Field(
        default="first", description="where AMED's single-evaluation step goes when the winner's grid has an odd "
                                     "number of intervals")


class FamiliesConfig(StrictModel):
    gits: GITSFamilyConfig = Field(default_factory=GITSFamilyConfig)
    epd: EPDFamilyConfig = Field(default_factory=EPDFamilyConfig)
    gs: GSFamilyConfig = Field(default_factory=GSFamilyConfig)

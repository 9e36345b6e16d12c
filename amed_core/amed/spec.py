"""SamplerSpec: everything needed to rebuild a learned sampler, as JSON; and the NFE <-> N mapping.

A spec is solver-family neutral at the top (``kind``), so other learned-solver families (optimised
time schedules, parallel directions) can live next to AMED in the same store and registry.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..schedules import ScheduleSpec
from .predictor import PredictorConfig
from .solvers import BASE_SOLVER, MULTISTEP, STEPS, _options
from .._fields import check_fields

__all__ = ["SamplerSpec", "evals_per_step", "num_steps_for", "nfe_for", "SPEC_VERSION"]

SPEC_VERSION = 1

# Denoiser evaluations per step of each solver (AFS saves one on the first step).
_EVALS_PER_STEP = {"euler": 1, "heun": 2, "dpm2": 2, "dpmpp": 1, "unipc": 1, "deis": 1, "ipndm": 1, "ipndm_v": 1,
                   **{name: 2 for name in STEPS}}


def evals_per_step(solver: str) -> int:
    """Denoiser evaluations per step: 2 for heun, dpm2 and the AMED solvers, 1 for the other training-free solvers."""
    try:
        return _EVALS_PER_STEP[solver]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(_EVALS_PER_STEP)}") from None


def nfe_for(solver: str, num_steps: int, afs: bool) -> int:
    """NFE of a run with N = num_steps grid points: k (N - 1) - afs, k evaluations per step."""
    return evals_per_step(solver) * (num_steps - 1) - int(bool(afs))


def num_steps_for(solver: str, nfe: int, afs: bool = False) -> int:
    """The grid size N that spends exactly ``nfe`` evaluations: nfe = k (N - 1) - afs, k = :func:`evals_per_step`
    (AMED, arXiv 2312.00094: NFE = 2 (N - 1) - afs). The single implementation for every solver name."""
    k = evals_per_step(solver)
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    steps, rem = divmod(int(nfe) + int(bool(afs)), k)
    if rem or steps < 1:
        hint = "use afs=True for an odd nfe (AFS saves one evaluation)" if not afs else "use afs=False for an even nfe"
        raise ValueError(f"nfe={nfe} is not reachable with {solver!r} (afs={bool(afs)}): it spends {k} evaluations "
                         f"per step{' minus 1 with AFS' if afs else ''}; {hint}")
    return steps + 1


@dataclass(frozen=True)
class SamplerSpec:
    """A learned sampler: solver, NFE and grid, options, predictor architecture, and the teacher it was fit to.

    solver: ``amed`` or ``amed+{euler,dpm,ipndm,dpmpp}``; num_steps N with nfe = 2 (N - 1) - afs.
    max_order / predict_x0 / lower_order_final / dynamic_thresholding: plugin options (None = not applicable).
    afs_in_history: multistep plugins: whether the AFS estimate joins the history (True = the reference).
    predictor: the AMEDPredictor's PredictorConfig (its scale_dir / scale_time are the scale ranges).
    feature_source: where the per-sample features come from (the denoiser's ``feature_source``).
    teacher: the denoiser's ``identity()`` (adapter, name, content hash) - sampling checks it.
    kind: the learned-solver family (``"amed"``).
    """

    solver: str
    nfe: int
    num_steps: int
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    afs: bool = True
    max_order: int | None = None
    predict_x0: bool | None = None
    lower_order_final: bool | None = None
    dynamic_thresholding: bool | None = None
    afs_in_history: bool | None = None
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    feature_source: str = "denoised-channel-mean"
    teacher: dict = field(default_factory=dict)
    kind: str = "amed"
    version: int = SPEC_VERSION

    def __post_init__(self):
        if self.kind != "amed":
            raise ValueError(f"SamplerSpec.kind {self.kind!r} is not supported here (this build knows 'amed')")
        if self.solver not in STEPS:
            raise ValueError(f"SamplerSpec.solver must be one of {sorted(STEPS)}, got {self.solver!r}")
        if not isinstance(self.afs, bool):
            raise ValueError(f"SamplerSpec.afs must be true or false, got {self.afs!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise ValueError(f"SamplerSpec.num_steps must be an integer >= 2, got {self.num_steps!r}")
        if nfe_for(self.solver, self.num_steps, self.afs) != self.nfe:
            raise ValueError(f"SamplerSpec.nfe={self.nfe} disagrees with num_steps={self.num_steps}, afs={self.afs} "
                             f"(that spends {nfe_for(self.solver, self.num_steps, self.afs)}); build it with SamplerSpec.create")
        if isinstance(self.schedule, dict):
            object.__setattr__(self, "schedule", ScheduleSpec.from_dict(self.schedule))
        if isinstance(self.predictor, dict):
            object.__setattr__(self, "predictor", PredictorConfig.from_dict(self.predictor))
        if self.solver != "amed+ipndm" and self.solver != "amed+dpmpp" and self.max_order is not None:
            raise ValueError(f"SamplerSpec.max_order applies to amed+ipndm / amed+dpmpp only, not {self.solver!r}")
        if self.solver != "amed+dpmpp" and any(v is not None for v in (self.predict_x0, self.lower_order_final, self.dynamic_thresholding)):
            raise ValueError("SamplerSpec.predict_x0 / lower_order_final / dynamic_thresholding apply to amed+dpmpp only")
        if self.solver not in MULTISTEP and self.afs_in_history is not None:
            raise ValueError("SamplerSpec.afs_in_history applies to amed+ipndm / amed+dpmpp only")
        # Let the solver validate its own options once (ranges, combinations).
        _options(self.solver, self.max_order, self.predict_x0, True if self.lower_order_final is None else self.lower_order_final,
                 self.dynamic_thresholding, True if self.afs_in_history is None else self.afs_in_history)

    @classmethod
    def create(cls, solver: str, nfe: int, *, afs: bool = True, schedule: ScheduleSpec | None = None,
               predictor: PredictorConfig | None = None, max_order: int | None = None, predict_x0: bool | None = None,
               lower_order_final: bool | None = None, dynamic_thresholding: bool | None = None,
               afs_in_history: bool | None = None, denoiser=None) -> "SamplerSpec":
        """Spec for ``solver`` at ``nfe`` (N derived); plugin defaults filled in; teacher/feature source from ``denoiser``."""
        if solver not in STEPS:
            raise ValueError(f"solver must be one of {sorted(STEPS)}, got {solver!r}")
        if schedule is None:
            schedule = ScheduleSpec()
            if denoiser is not None:
                schedule = replace(schedule, sigma_min=float(denoiser.sigma_min), sigma_max=float(denoiser.sigma_max))
        if solver in MULTISTEP:
            afs_in_history = True if afs_in_history is None else afs_in_history
        if solver == "amed+ipndm":
            max_order = 4 if max_order is None else max_order
        if solver == "amed+dpmpp":
            max_order = 3 if max_order is None else max_order
            predict_x0 = True if predict_x0 is None else predict_x0
            lower_order_final = True if lower_order_final is None else lower_order_final
            dynamic_thresholding = predict_x0 if dynamic_thresholding is None else dynamic_thresholding
        extra = {}
        if denoiser is not None:
            extra = dict(teacher=denoiser.identity(), feature_source=str(getattr(denoiser, "feature_source", "")))
        return cls(solver=solver, nfe=nfe, num_steps=num_steps_for(solver, nfe, afs), schedule=schedule, afs=afs,
                   max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                   dynamic_thresholding=dynamic_thresholding, afs_in_history=afs_in_history,
                   predictor=predictor or PredictorConfig(), **extra)

    @property
    def base_solver(self) -> str:
        """The training-free solver this one plugs into (heun for the AMED-Solver's teacher)."""
        return BASE_SOLVER[self.solver]

    def grid(self):
        """The student's N-point sigma grid (float64)."""
        return self.schedule.grid(self.num_steps)

    def solver_options(self) -> dict[str, Any]:
        """Keyword options for the registered solver (besides policy=)."""
        opts: dict[str, Any] = {"afs": self.afs}
        if self.solver == "amed+ipndm":
            opts["max_order"] = self.max_order
        if self.solver == "amed+dpmpp":
            opts.update(max_order=self.max_order, predict_x0=self.predict_x0, lower_order_final=self.lower_order_final,
                        dynamic_thresholding=self.dynamic_thresholding)
        if self.solver in MULTISTEP and self.afs_in_history is not None:
            opts["afs_in_history"] = self.afs_in_history
        return opts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["predictor"] = self.predictor.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerSpec":
        check_fields(cls, d)
        d = dict(d)
        if d.get("version", SPEC_VERSION) > SPEC_VERSION:
            raise ValueError(f"sampler spec version {d['version']} is newer than this build ({SPEC_VERSION}); upgrade amed-distill")
        if "schedule" in d:
            d["schedule"] = ScheduleSpec.from_dict(d["schedule"])
        if "predictor" in d:
            d["predictor"] = PredictorConfig.from_dict(d["predictor"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "SamplerSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"sampler.json is not valid JSON: {e}") from None

"""SamplerSpec: everything needed to rebuild a learned sampler, as JSON (the NFE <-> N mapping it uses is the
method table's, :mod:`amed_core.methods.table`, re-exported here).

A spec is solver-family neutral at the top (``kind``), so other learned-solver families (optimised
time schedules, parallel directions) can live next to AMED in the same store and registry.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..methods import evals_per_step, get_method, method_names, nfe_for, num_steps_for  # the one NFE <-> N mapping
from ..methods.amed import resolve_options
from ..schedules import ScheduleSpec
from .predictor import PredictorConfig
from .._fields import check_fields
from ..bounds import MAX_NFE, MAX_STEPS, check_int

__all__ = ["SamplerSpec", "evals_per_step", "num_steps_for", "nfe_for", "SPEC_VERSION", "OPTION_FIELDS"]

SPEC_VERSION = 1

# The spec's fields that are solver options (None = not applicable to the solver, or its default).
OPTION_FIELDS = ("max_order", "predict_x0", "lower_order_final", "dynamic_thresholding", "afs_in_history", "deis_mode",
                 "variant", "single_steps")
# Fields added after version 1 was written: left out of the JSON while unset, so older specs keep their bytes and ids.
_OPTIONAL_FIELDS = ("deis_mode", "variant", "single_steps", "sigmas")


def _takers(option: str) -> str:
    return " / ".join(n for n in method_names("amed") if option in get_method(n).options)


@dataclass(frozen=True)
class SamplerSpec:
    """A learned sampler: solver, NFE and grid, options, predictor architecture, and the teacher it was fit to.

    solver: ``amed`` or ``amed+{euler,dpm,ipndm,dpmpp}``; num_steps N with nfe = 2 (N - 1) - afs.
    max_order / predict_x0 / lower_order_final / dynamic_thresholding: plugin options (None = not applicable).
    afs_in_history: multistep plugins: whether the AFS estimate joins the history (True = the reference).
    deis_mode / variant: amed+deis's tab | rhoab, amed+unipc's bh1 | bh2 (None = the solver's default).
    single_steps: steps that spend one evaluation (no intermediate point; ours): NFE = 2 (N - 1) - afs - len.
    sigmas: an explicit grid of N points (e.g. a training-free winner's, :mod:`amed_core.families.init`); None =
      ``schedule.grid(num_steps)``.
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
    deis_mode: str | None = None
    variant: str | None = None
    single_steps: tuple[int, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    feature_source: str = "denoised-channel-mean"
    teacher: dict = field(default_factory=dict)
    kind: str = "amed"
    version: int = SPEC_VERSION

    def __post_init__(self):
        if self.kind != "amed":
            raise ValueError(f"SamplerSpec.kind {self.kind!r} is not supported here (this build knows 'amed')")
        if self.solver not in method_names("amed"):
            raise ValueError(f"SamplerSpec.solver must be one of {sorted(method_names('amed'))}, got {self.solver!r}")
        if not isinstance(self.afs, bool):
            raise ValueError(f"SamplerSpec.afs must be true or false, got {self.afs!r}")
        check_int(self.num_steps, "SamplerSpec.num_steps", 2, MAX_STEPS, "sampler spec")
        check_int(self.nfe, "SamplerSpec.nfe", 1, MAX_NFE, "sampler spec")
        if not isinstance(self.teacher, dict) or not isinstance(self.feature_source, str):
            raise ValueError("SamplerSpec.teacher must be an object (the teacher's identity) and feature_source a string")
        if self.single_steps is not None:
            object.__setattr__(self, "single_steps", tuple(self.single_steps))
        if self.sigmas is not None:
            sig = tuple(float(v) for v in self.sigmas)
            if len(sig) != self.num_steps or any(not v > 0 for v in sig) or any(b >= a for a, b in zip(sig, sig[1:])):
                raise ValueError(f"SamplerSpec.sigmas must be num_steps={self.num_steps} positive, strictly decreasing "
                                 f"values (got {len(sig)})")
            object.__setattr__(self, "sigmas", sig)
        spent = nfe_for(self.solver, self.num_steps, self.afs, {"single_steps": self.single_steps or ()})
        if spent != self.nfe:
            raise ValueError(f"SamplerSpec.nfe={self.nfe} disagrees with num_steps={self.num_steps}, afs={self.afs}"
                             f"{f', single_steps={list(self.single_steps)}' if self.single_steps else ''} "
                             f"(that spends {spent}); build it with SamplerSpec.create")
        if isinstance(self.schedule, dict):
            object.__setattr__(self, "schedule", ScheduleSpec.from_dict(self.schedule))
        if isinstance(self.predictor, dict):
            object.__setattr__(self, "predictor", PredictorConfig.from_dict(self.predictor))
        options = get_method(self.solver).options
        for k in OPTION_FIELDS:
            if getattr(self, k) is not None and k not in options:
                raise ValueError(f"SamplerSpec.{k} applies to {_takers(k)} only, not {self.solver!r}")
        # Let the solver validate its own options once (ranges, combinations).
        resolve_options(self.solver, **{k: getattr(self, k) for k in OPTION_FIELDS if k in options})

    @classmethod
    def create(cls, solver: str, nfe: int, *, afs: bool = True, schedule: ScheduleSpec | None = None,
               predictor: PredictorConfig | None = None, max_order: int | None = None, predict_x0: bool | None = None,
               lower_order_final: bool | None = None, dynamic_thresholding: bool | None = None,
               afs_in_history: bool | None = None, deis_mode: str | None = None, variant: str | None = None,
               single_steps=None, sigmas=None, denoiser=None, recipe: str = "reference") -> "SamplerSpec":
        """Spec for ``solver`` at ``nfe`` (N derived); teacher/feature source from ``denoiser``. What is not given
        comes from ``recipe`` (:mod:`amed_core.amed.recipes`, the same defaults ``amed train --preset`` uses): the
        method table's schedule over the denoiser's sigma range, the predictor's scales, ``afs_in_history``.
        ``dynamic_thresholding`` not given follows ``predict_x0`` as in the reference, except that with a ``denoiser``
        it is on only when the denoiser's data range lies inside [-1, 1] (:mod:`amed_core.data_range`).
        ``sigmas`` (an explicit grid) must have the N points the NFE gives."""
        from .recipes import default_schedule_for, sampler_defaults

        if solver not in method_names("amed"):
            raise ValueError(f"solver must be one of {sorted(method_names('amed'))}, got {solver!r}")
        rec = sampler_defaults(solver, recipe)
        if schedule is None:
            schedule = default_schedule_for(solver, denoiser)
        if predictor is None:
            predictor = PredictorConfig(scale_dir=rec["scale_dir"], scale_time=rec["scale_time"])
        if afs_in_history is None:
            afs_in_history = rec["afs_in_history"]
        given = dict(max_order=max_order, predict_x0=predict_x0, lower_order_final=lower_order_final,
                     dynamic_thresholding=dynamic_thresholding, afs_in_history=afs_in_history, deis_mode=deis_mode,
                     variant=variant)
        defaults = get_method(solver).default_options  # the plugin's defaults fill what is not given
        opts = {k: defaults[k] if v is None and k in defaults else v for k, v in given.items()}
        if "dynamic_thresholding" in defaults and opts["dynamic_thresholding"] is None:
            # None = follow predict_x0 (the reference), and with a denoiser only for data inside [-1, 1]
            # (amed_core.data_range: thresholding rescales wider data)
            opts["dynamic_thresholding"] = opts["predict_x0"]
            if denoiser is not None:
                from ..data_range import default_thresholding

                opts["dynamic_thresholding"] = bool(opts["predict_x0"]) and default_thresholding(
                    getattr(denoiser, "data_range", None), getattr(denoiser, "data_range_how", "declared"))
        extra = {}
        if denoiser is not None:
            extra = dict(teacher=denoiser.identity(), feature_source=str(getattr(denoiser, "feature_source", "")))
        single = tuple(single_steps) if single_steps else None
        steps = num_steps_for(solver, nfe, afs, {"single_steps": single or ()})
        return cls(solver=solver, nfe=nfe, num_steps=steps, schedule=schedule, afs=afs,
                   predictor=predictor or PredictorConfig(), single_steps=single,
                   sigmas=None if sigmas is None else tuple(float(v) for v in sigmas), **opts, **extra)

    @property
    def base_solver(self) -> str:
        """The training-free solver this one plugs into (heun for the AMED-Solver's teacher)."""
        return get_method(self.solver).base

    def grid(self):
        """The student's N-point sigma grid (float64): ``sigmas`` when given, else ``schedule.grid(num_steps)``."""
        if self.sigmas is not None:
            import torch

            return torch.tensor(self.sigmas, dtype=torch.float64)
        return self.schedule.grid(self.num_steps)

    def solver_options(self) -> dict[str, Any]:
        """Keyword options for the registered solver (besides policy=)."""
        opts: dict[str, Any] = {"afs": self.afs}
        options = get_method(self.solver).options
        opts.update({k: getattr(self, k) for k in OPTION_FIELDS[:4] if k in options})
        for k in OPTION_FIELDS[4:]:
            if k in options and getattr(self, k) is not None:
                opts[k] = getattr(self, k)
        return opts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        d["predictor"] = self.predictor.to_dict()
        for k in _OPTIONAL_FIELDS:
            if d[k] is None:
                del d[k]
            elif isinstance(d[k], tuple):
                d[k] = list(d[k])
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

"""Family ``gs``: GS, the Generalized Solver (Oganov et al., arXiv 2510.17699; :mod:`amed_core.methods.gs`): a learned
time grid, model times decoupled from it and corrections to DPM-Solver++(3M)'s coefficients, trained on the teacher's
final samples.

What GS needs from a teacher (``teacher_grid = "final"``): pairs of a noise draw and the teacher's end state from that
noise, nothing in between. Any stored teacher whose grid starts at the denoiser's sigma_max provides them (its
``noise`` and last state); one that stores only its two end points (a 2-point student grid refined by many sub-steps)
is the cheapest: a sweep plans one per dataset (``families.gs``), train_size + val_size trajectories.

Checkpoint: ``gs.safetensors`` (mu_logit, t_couple, c_diff, a_diff) and ``sampler.json`` {"kind": "gs",
"format_version": 1, "method": "gs", "solver": "gs", "nfe", "num_steps", "gs": the GSConfig, "sigmas", "timesteps",
"model_sigmas", "model_times" (the learned grid for readers; checked against the tensors on load), "teacher", "init"
(where the parameters started: the reference's grid or a panel entry's), "train"}. Loading validates every field and
tensor (types, ranges, finite values, shapes against steps / order, the stored grid against the tensors, model times
that give finite noise levels) and names the file and the field in its error. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .static import SPEC_FILE
from .static import check_teacher as _check_teacher

name = "gs"
needs_teacher = True
trains = True
teacher_grid = "final"
files = ("gs.safetensors", SPEC_FILE)

FORMAT_VERSION = 1
_DOC_FIELDS = {"kind", "format_version", "method", "solver", "nfe", "num_steps", "gs", "sigmas", "timesteps",
               "model_sigmas", "model_times", "teacher", "init", "train"}
# Bounds a trained checkpoint stays far inside (the reference's perturbation tests move t_couple by <= 0.2 t_k):
# beyond them the file is refused rather than sampled.
BOUNDS = {"mu_logit": 60.0, "t_couple": 1.0, "c_diff": 1e6, "a_diff": 1e6}


class GSSampler:
    """``sampler(denoiser, noise, class_labels=None) -> GSResult``: GS from ``params.start_state(noise)`` (the
    reference: the VP state ``noise`` itself), on the learned grid, with the learned model times and coefficients."""

    def __init__(self, params, doc: Mapping[str, Any]):
        self.params = params.eval().requires_grad_(False)
        self.spec = _Spec(doc)

    def __call__(self, denoiser, noise, class_labels=None, *, check_teacher: bool = True, return_trajectory=False,
                 callback=None):
        from ..methods.gs import gs_sample

        if check_teacher:
            _check_teacher(self.spec.teacher, denoiser, "GS")
        with torch.no_grad():
            return gs_sample(denoiser, self.params.start_state(noise), self.params, class_labels=class_labels,
                             return_trajectory=return_trajectory, callback=callback)

    def to(self, device):
        self.params.to(device)
        return self

    def files(self) -> dict[str, bytes]:
        from ..methods.gs import gs_tensor_bytes

        return {"gs.safetensors": gs_tensor_bytes(self.params.cpu()),
                SPEC_FILE: (json.dumps(self.spec.doc, indent=2, sort_keys=True) + "\n").encode()}


class _Spec:
    def __init__(self, doc: Mapping[str, Any]):
        from ..methods.gs import GSConfig

        self.doc = dict(doc)
        self.kind = "gs"
        self.method = self.solver = "gs"
        self.nfe = int(self.doc["nfe"])
        self.config = GSConfig.from_dict(self.doc["gs"])
        self.sigmas = tuple(float(v) for v in self.doc["sigmas"])
        self.afs = False
        self.options: dict = {}
        self.teacher = dict(self.doc.get("teacher") or {})
        self.init = dict(self.doc.get("init") or {})

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def to_dict(self) -> dict:
        return dict(self.doc)


def config_for(denoiser, nfe: int, *, order: Optional[int] = None, **options):
    """The GSConfig of a sampler for ``denoiser`` at ``nfe``: its sigma range, order = NFE (the reference's scripts)
    unless given; ``options``: theory, t_eps, end, s4s_rescale, clip_model_time, output, start."""
    from ..methods.gs import GSConfig

    return GSConfig(steps=int(nfe), order=int(order or nfe), net_sigma_min=float(denoiser.sigma_min),
                    net_sigma_max=float(denoiser.sigma_max), **options)


def check_start(config, teacher_sigma_max: float) -> None:
    """Refuse training pairs whose teacher started elsewhere than GS does: GS starts at sigma(1) = min(the paper VP's
    152.17, the net's sigma_max) (the reference's re-mapping); a teacher started at a larger sigma_max (a VE-style net)
    maps the same noise from another point, so its end states are not GS's targets."""
    hi = config.remap().sigma_hi
    if teacher_sigma_max > hi * (1 + 1e-9):
        raise ValueError(f"GS starts at sigma {hi:.6g} (the paper VP's sigma(1) caps the net's sigma_max "
                         f"{config.net_sigma_max:.6g}, as the reference does) but the teacher starts at "
                         f"{teacher_sigma_max:.6g}; use a teacher / sampler.sigma_max of at most {hi:.6g}")


def spec_doc(params, *, teacher: Mapping | None = None, init: Mapping | None = None,
             train: Mapping | None = None) -> dict:
    cfg = params.config
    return {"kind": "gs", "format_version": FORMAT_VERSION, "method": "gs", "solver": "gs", "nfe": cfg.steps,
            "num_steps": cfg.steps + 1, "gs": cfg.to_dict(), **params.describe(), "teacher": dict(teacher or {}),
            "init": dict(init or {}), "train": dict(train or {})}


def init_params(config, init: str | Sequence[float] = "reference", *, source: Mapping | None = None):
    """(GSParams, the init record for sampler.json): ``"reference"`` (the time-uniform grid) or the N + 1 sigmas of
    another sampler's grid (ValueError when GS cannot express it, see GSParams.from_grid)."""
    from ..methods.gs import GSParams

    if isinstance(init, str):
        if init != "reference":
            raise ValueError(f"init must be 'reference' or a list of N + 1 sigmas, got {init!r}")
        return GSParams.reference_init(config), {"kind": "reference", "grid": "time_uniform",
                                                 **({"source": dict(source)} if source else {})}
    sig = [float(v) for v in init]
    params = GSParams.from_grid(config, sig)  # the interior of ``sig``, GS's own end points
    return params, {"kind": "grid", "sigmas": [float(v) for v in params.sigmas()], "source_sigmas": sig,
                    **({"source": dict(source)} if source else {})}


def fit(denoiser, noise, target, cfg=None, *, nfe: int, config=None, init: str | Sequence[float] = "reference",
        init_source: Mapping | None = None, class_labels=None, val=None, distance: Callable | None = None,
        teacher: Mapping | None = None, callback=None):
    """Train GS at ``nfe`` on (noise, teacher final state) pairs (:func:`amed_core.methods.gs.train_gs`) and return
    (GSSampler, GSTrainResult). ``config``: a GSConfig (default :func:`config_for` the denoiser); ``init``: see
    :func:`init_params`; ``val``: held-out (noise, target[, labels]) pairs (the best EMA checkpoint on them is kept)."""
    from ..methods.gs import GSTrainConfig, train_gs

    config = config or config_for(denoiser, nfe)
    if config.steps != nfe:
        raise ValueError(f"the GS config has steps={config.steps} but nfe={nfe}")
    cfg = cfg or GSTrainConfig()
    params, init_rec = init_params(config, init, source=init_source)
    res = train_gs(denoiser, params, noise, target, cfg, class_labels=class_labels, val=val, distance=distance,
                   callback=callback)
    train = {**cfg.to_dict(), "updates": res.updates, "skipped": res.skipped, "trajectories": res.trajectories,
             "train_pairs": int(noise.shape[0]), "val_pairs": int(val[0].shape[0]) if val is not None else 0,
             "best_iteration": res.best_iteration, "best_val": res.best_val, "initial_val": res.initial_val}
    doc = spec_doc(res.params.cpu(), init=init_rec, train=train,
                   teacher=teacher or (denoiser.identity() if hasattr(denoiser, "identity") else {}))
    return GSSampler(res.params.cpu(), doc), res


def load_distance(spec: str) -> Optional[Callable]:
    """The training distance a sweep names: ``"l2"`` -> None (the default, :func:`amed_core.methods.gs.l2_distance`);
    ``"py:package.module:function"`` -> ``function()``, which must return a callable (x, y) -> (B,) per-sample
    distances (e.g. :class:`amed_core.methods.gs.FeatureDistance` around your network). Importing runs that code."""
    if spec == "l2":
        return None
    from ..adapters.custom import load_callable

    if not spec.startswith("py:"):
        raise ValueError(f"loss must be 'l2' or 'py:package.module:function', got {spec!r}")
    try:
        build = load_callable(spec[3:])
    except ValueError as e:
        raise ValueError(f"loss {spec}: {e}") from None
    distance = build() if callable(build) else None
    if not callable(distance):
        raise ValueError(f"loss {spec}: {spec[3:]}() must return a callable (x, y) -> per-sample distances")
    return distance


def schedule_plot_png(sampler: GSSampler, *, panel_sigmas: Sequence[float] | None = None, panel_label: str = "panel",
                      title: str = "") -> bytes:
    """PNG: the learned grid (sigma at t_0 .. t_N) and the model's evaluation sigmas next to the reference's initial
    grid, the grid training started from and the panel's best schedule at this NFE (if given), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluate.pictures import figure_png
    from ..methods.gs import GSParams

    s = sampler.spec
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps = list(range(len(s.sigmas)))
    ax.plot(steps, s.sigmas, "o-", color="C0", label="GS grid (learned)")
    ax.plot(list(range(len(s.doc["model_sigmas"]))), s.doc["model_sigmas"], "x", color="C3", ms=8,
            label="GS model evaluation of step k (t_k + t_couple_k)")
    ref = GSParams.reference_init(s.config).sigmas().tolist()
    ax.plot(steps, ref, ":", color="0.5", label="reference init (uniform in VP time)")
    if s.init.get("kind") == "grid":
        src = s.init.get("source") or {}
        ax.plot(steps, s.init["sigmas"], "s--", color="C2", mfc="none", label=f"initial grid: {src.get('solver', 'given')}")
    if panel_sigmas:
        ax.plot(list(range(len(panel_sigmas))), list(panel_sigmas), "d-.", color="C1", mfc="none", label=panel_label)
    ax.set_yscale("log")
    ax.set_xlabel("step k")
    ax.set_ylabel("sigma")
    ax.set_title(title or f"GS NFE {s.nfe}", fontsize=9)
    ax.legend(fontsize=7)
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint: every field checked, errors name the file and the field

def _fail(field: str, msg: str):
    raise ValueError(f"{SPEC_FILE}: {field} {msg}")


def _number_list(doc: Mapping, key: str, length: int) -> list[float]:
    v = doc.get(key)
    if not isinstance(v, list) or len(v) != length or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        _fail(key, f"must be a list of {length} finite numbers")
    return [float(x) for x in v]


def check_doc(doc: Any):
    """The GSConfig of a parsed ``sampler.json`` after checking every field (ValueError naming the field)."""
    from ..methods.gs import GSConfig

    if not isinstance(doc, dict):
        raise ValueError(f"{SPEC_FILE} must hold a JSON object")
    unknown = sorted(set(doc) - _DOC_FIELDS)
    if unknown:
        _fail(str(unknown), f"are not GS checkpoint fields; allowed: {sorted(_DOC_FIELDS)}")
    for key, want in (("kind", "gs"), ("format_version", FORMAT_VERSION), ("method", "gs")):
        if doc.get(key) != want:
            _fail(key, f"must be {want!r}, got {doc.get(key)!r}")
    if doc.get("solver", "gs") != "gs":
        _fail("solver", f"must be 'gs', got {doc.get('solver')!r}")
    if not isinstance(doc.get("gs"), dict):
        _fail("gs", "must be an object (the GS configuration: steps, order, net_sigma_min, ...)")
    try:
        cfg = GSConfig.from_dict(doc["gs"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{SPEC_FILE}: gs.{e}") from None
    nfe, steps = doc.get("nfe"), doc.get("num_steps")
    if isinstance(nfe, bool) or nfe != cfg.steps:
        _fail("nfe", f"must equal gs.steps ({cfg.steps}), got {nfe!r}")
    if isinstance(steps, bool) or steps != cfg.steps + 1:
        _fail("num_steps", f"must be gs.steps + 1 ({cfg.steps + 1}), got {steps!r}")
    for key, n in (("sigmas", cfg.steps + 1), ("timesteps", cfg.steps + 1), ("model_sigmas", cfg.steps),
                   ("model_times", cfg.steps)):
        _number_list(doc, key, n)
    for key in ("teacher", "init", "train"):
        if not isinstance(doc.get(key, {}), dict):
            _fail(key, "must be an object")
    return cfg


def from_files(files: Mapping[str, bytes]) -> GSSampler:
    from ..methods.gs import gs_tensors_from_bytes

    missing = sorted(set(globals()["files"]) - set(files))
    if missing:
        raise ValueError(f"GS checkpoint lacks {missing}")
    try:
        doc = json.loads(bytes(files[SPEC_FILE]).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{SPEC_FILE} is not JSON: {e}") from None
    cfg = check_doc(doc)
    params = gs_tensors_from_bytes(files["gs.safetensors"], cfg)
    for tname, bound in BOUNDS.items():
        worst = float(getattr(params, tname).detach().abs().max()) if getattr(params, tname).numel() else 0.0
        if worst > bound:
            raise ValueError(f"gs.safetensors: tensor {tname} reaches |{worst:.6g}| > {bound:g}; not a trained GS "
                             "checkpoint (refused rather than sampled)")
    have = params.describe()
    if min(have["model_times"]) <= 0 or not all(math.isfinite(v) for v in have["model_sigmas"]):
        raise ValueError(f"gs.safetensors: model times {[round(v, 6) for v in have['model_times']]} leave VP time (t' <= 0; "
                         "the reference samples NaN for -2 beta_min / beta_d < t' < 0); set gs.clip_model_time true in "
                         f"{SPEC_FILE} to clamp them to [t_eps, 1]")
    for key in ("sigmas", "timesteps", "model_sigmas", "model_times"):
        got, want = torch.tensor(doc[key], dtype=torch.float64), torch.tensor(have[key], dtype=torch.float64)
        if not torch.allclose(got, want, rtol=1e-9, atol=1e-15):
            _fail(key, "does not match the grid of gs.safetensors (the two files are not one checkpoint)")
    return GSSampler(params, doc)


def to_files(sampler: GSSampler) -> dict[str, bytes]:
    return sampler.files()


def describe(sampler: GSSampler) -> dict:
    s, cfg = sampler.spec, sampler.spec.config
    return {"family": "gs", "method": "gs", "solver": "gs", "nfe": s.nfe, "denoiser_calls": s.nfe,
            "num_steps": s.num_steps, "afs": False, "order": cfg.order, "theory": cfg.theory,
            "sigmas": list(s.sigmas), "model_sigmas": list(s.doc["model_sigmas"]),
            "init": s.init.get("kind", "reference"), "options": {k: v for k, v in cfg.to_dict().items()
                                                                if k not in ("steps", "net_sigma_min", "net_sigma_max")}}


def grid_schedule(sampler: GSSampler):
    """GS's learned time grid as a :class:`~amed_core.families.static.PureSchedule` run by its base solver,
    DPM-Solver++(3M) (no lower-order final step, no thresholding): an APPROXIMATION of the GS sampler, for tools that
    take only a sigma list (``amed export --grid-only``). It drops GS's learned model times and coefficient corrections,
    so it is deliberately not this module's ``schedule`` (which would claim an exact export); measure it before use."""
    from .static import PureSchedule

    s = sampler.spec
    return PureSchedule(sigmas=tuple(float(v) for v in s.sigmas), solver="dpmpp", afs=False,
                        options={"max_order": 3, "predict_x0": True, "lower_order_final": False,
                                 "dynamic_thresholding": False},
                        family="gs", method="gs-grid", nfe=s.nfe)


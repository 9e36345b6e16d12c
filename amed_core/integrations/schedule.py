"""Schedule export: a pure-schedule sampler (families free and gits; any family whose module has
``schedule(sampler)``, see :class:`amed_core.families.PureSchedule`) as the sigma list other tools take.

Three targets (:func:`export_schedule`; ``amed export URI --to ...``):

- ``sigmas.json``: the N time points (decreasing, no trailing 0) with the solver, AFS and options that run on them:
  what ComfyUI's SIGMAS input, a script or :func:`amed_core.integrations.to_k_diffusion` take.
- ``k-diffusion``: the same points and the k-diffusion sampler function that computes exactly what our solver
  computes on them: ``sample_euler`` (euler), ``sample_heun`` (heun), ``sample_dpm_2`` (dpm2, r = 0.5),
  ``sample_dpmpp_2m`` (dpmpp, order 2, no final order lowering, no thresholding); AFS has no counterpart. Call it with
  the list as given: a trailing 0 would spend one more evaluation (k-diffusion denoises to 0 on its last step).
- ``diffusers``: the scheduler class, its config overrides and the ``set_timesteps`` / pipeline keyword
  (``sigmas=``) that make the pipeline's own loop run the same solver on the same points (:data:`DIFFUSERS_SCHEDULERS`).

Every pairing above is checked in ``tests/test_integrations.py`` (the target's own implementation against our
solver on the same model and noise). Anything else is refused with the solver and the fix named: run the sampler
itself through ``sample_with`` / ``to_k_diffusion``, which take every family.

One difference a schedule cannot carry: the diffusers schedulers call the UNet at the timestep their own
log-sigma interpolation gives for a sigma; our DiffusersDenoiser (what the champion was scored with) uses DPM-Solver's
VP-time interpolation. Both agree exactly at the model's table sigmas and differ by a small fraction of one
timestep in between (:func:`timestep_gap` measures it; the export records it when the model's table is given).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..families import PureSchedule, pure_schedule

__all__ = ["EXPORT_TARGETS", "K_DIFFUSION_SAMPLERS", "DIFFUSERS_SCHEDULERS", "schedule_of", "export_schedule",
           "export_json", "timestep_gap", "from_export", "grid_schedule_of"]

EXPORT_TARGETS = ("sigmas.json", "k-diffusion", "diffusers")
FORMAT = "amed-schedule"
FORMAT_VERSION = 1

# solver -> (k-diffusion function, the options it implies; AFS never)
K_DIFFUSION_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("sample_euler", {}),
    "heun": ("sample_heun", {}),
    "dpm2": ("sample_dpm_2", {"r": 0.5}),
    "dpmpp": ("sample_dpmpp_2m", {"max_order": 2, "predict_x0": True, "lower_order_final": False,
                                  "dynamic_thresholding": False}),
}

# solver -> (diffusers scheduler class, config overrides, the options it implies; AFS never)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace", "use_karras_sigmas": False}, {}),
}


def schedule_of(sampler) -> PureSchedule:
    """The sampler as a pure schedule, or ValueError naming its family and what to use instead."""
    sched = pure_schedule(sampler)
    if sched is None:
        kind = str(getattr(sampler.spec, "kind", "amed"))
        method = getattr(sampler.spec, "method", None) or getattr(sampler.spec, "solver", "?")
        raise ValueError(f"a {kind} sampler ({method}) is not a pure schedule: its steps use learned parts that a "
                         "sigma list cannot carry; run it with amed_core.integrations.sample_with(pipe, sampler) or "
                         "to_k_diffusion(sampler)")
    return sched


def _defaults(solver: str) -> dict[str, Any]:
    import inspect

    from ..methods import get_method

    fn = get_method(solver).fn
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _implied(sched: PureSchedule, table: Mapping[str, tuple], target: str) -> tuple:
    """The table's entry for the schedule's solver when the target computes exactly that solver, else ValueError."""
    entry = table.get(sched.solver)
    why = None
    if entry is None:
        why = f"{target} has no sampler that computes {sched.solver}"
    elif sched.afs:
        why = f"{target} has no analytical first step (AFS), which this {sched.solver} schedule uses"
    else:
        implied = entry[-1]
        opts = {**_defaults(sched.solver), **dict(sched.options)}
        bad = {k: opts.get(k) for k, v in implied.items() if opts.get(k) != v}
        if bad:
            want = ", ".join(f"{k}={v}" for k, v in implied.items())
            have = ", ".join(f"{k}={v}" for k, v in bad.items())
            why = f"{target}'s {entry[0]} is {sched.solver} with {want}; this schedule uses {have}"
    if why:
        raise ValueError(f"--to {target}: {why}; export --to sigmas.json and run the sampler with "
                         "amed_core.integrations.to_k_diffusion / sample_with (our solver in their signature)")
    return entry


def timestep_gap(sigmas, alphas_cumprod) -> float:
    """Largest difference, in timesteps, between the UNet timestep a diffusers scheduler computes for each sigma
    (log-sigma interpolation on its table, ``_sigma_to_t``) and the one our DiffusersDenoiser uses (VP-time
    interpolation): 0 at the table's own sigmas."""
    import numpy as np

    from ..schedules import DiscreteVP

    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    s = np.asarray([float(v) for v in sigmas], dtype=np.float64)
    table = DiscreteVP(tuple(float(a) for a in ac))
    ours = len(ac) * table.sigma_inv(s) - 1
    log_sigmas = np.log(np.sqrt((1 - ac) / ac))
    theirs = np.interp(np.log(s), log_sigmas, np.arange(len(ac), dtype=np.float64))
    return float(np.max(np.abs(ours - theirs)))


def grid_schedule_of(sampler) -> PureSchedule:
    """A family's approximate grid-only schedule (its module's ``grid_schedule``: GS's learned grid with its base
    solver), or :func:`schedule_of` for a pure schedule; ValueError for families with neither (amed, epd)."""
    from ..families import get_family

    fn = getattr(get_family(str(getattr(sampler.spec, "kind", "amed"))), "grid_schedule", None)
    return fn(sampler) if fn is not None else schedule_of(sampler)


def export_schedule(sampler, to: str, *, source: str = "", alphas_cumprod=None, grid_only: bool = False) -> dict:
    """The export of a pure-schedule sampler for ``to`` (one of :data:`EXPORT_TARGETS`) as a JSON-able dict.

    ``grid_only``: for a sampler whose steps learn more than its grid (GS), export only its grid with its base solver
    (:func:`grid_schedule_of`); the document then says ``"approximation": true`` and what it leaves out. Without it
    such a sampler is refused (its samples would differ from the champion's).

    ``alphas_cumprod``: the model's VP table (a diffusers model), to record :func:`timestep_gap` with the diffusers
    export. ValueError (one line, naming the target and the fix) for samplers or solvers the target cannot run."""
    if to not in EXPORT_TARGETS:
        raise ValueError(f"--to must be one of {', '.join(EXPORT_TARGETS)}, got {to!r}")
    if grid_only:
        sched = grid_schedule_of(sampler)
    else:
        try:
            sched = schedule_of(sampler)
        except ValueError as e:
            from ..families import get_family

            if getattr(get_family(str(getattr(sampler.spec, "kind", "amed"))), "grid_schedule", None) is None:
                raise
            raise ValueError(f"{e}; or export its learned time grid alone with its base solver (an approximation: "
                             "amed export --grid-only, export_schedule(..., grid_only=True))") from None
    sigmas = [float(v) for v in sched.sigmas]
    teacher = getattr(sampler.spec, "teacher", None) or {}
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "target": to, "source": source,
                           "family": sched.family, "method": sched.method or sched.solver, "solver": sched.solver,
                           "nfe": sched.nfe, "afs": sched.afs, "options": dict(sched.options), "sigmas": sigmas,
                           "teacher": teacher.get("name") if isinstance(teacher, Mapping) else None}
    if sched.family != pure_schedule_family(sampler):
        doc["approximation"] = True
        doc["note"] = (f"the {sched.family} sampler's time grid run by {sched.solver} with the options above; the "
                       f"{sched.family} sampler's other learned parts (model times, coefficients) are not in it")
    if to == "k-diffusion":
        fn, _ = _implied(sched, K_DIFFUSION_SAMPLERS, to)
        doc["k_diffusion"] = {"sampler": f"k_diffusion.sampling.{fn}",
                              "call": f"{fn}(model, noise * sigmas[0], torch.tensor(sigmas))"}
    elif to == "diffusers":
        cls, config, _ = _implied(sched, DIFFUSERS_SCHEDULERS, to)
        doc["diffusers"] = {"scheduler": cls, "config": dict(config), "set_timesteps": {"sigmas": sigmas},
                            "call": f"pipe.scheduler = {cls}.from_config(pipe.scheduler.config, **config); "
                                    "pipe(..., sigmas=sigmas)"}
        if alphas_cumprod is not None:
            doc["diffusers"]["timestep_gap"] = timestep_gap(sigmas, alphas_cumprod)
    return doc


def pure_schedule_family(sampler) -> str | None:
    """The family of the sampler's exact pure schedule, None when it has none."""
    sched = pure_schedule(sampler)
    return sched.family if sched is not None else None


def export_json(doc: Mapping) -> str:
    """The export as the JSON text ``amed export`` writes (floats exact: repr round trip)."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def from_export(doc: Mapping):
    """The sampler an export describes (any target's JSON, as a dict): the solver with its AFS and options on the
    exported sigmas, as a ``free`` sampler (``gits`` when it came from one), so an export round-trips to the same
    samples. ValueError naming the field for a document that is not an export."""
    from ..families import StaticSampler, StaticSpec

    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise ValueError(f"format: not an {FORMAT} export (made by `amed export`)")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version: {doc.get('format_version')!r} is not {FORMAT_VERSION}")
    kind = "gits" if doc.get("family") == "gits" else "free"
    try:
        return StaticSampler(StaticSpec(kind, str(doc["solver"]), str(doc.get("method") or doc["solver"]), int(doc["nfe"]),
                                        tuple(float(v) for v in doc["sigmas"]), bool(doc.get("afs", False)),
                                        dict(doc.get("options") or {}), None, {}, {"exported_from": doc.get("source", "")}))
    except KeyError as e:
        raise ValueError(f"{e.args[0]}: missing from the export") from None

"""The stored near-exact reference of a sweep under metric rmse (``amed_core.evaluate.reference``): read by every
evaluate job (generating whatever shards are missing first: the teacher store's claims make concurrent jobs split
them, each shard computed once) and its convergence record for the register stage. No math here: the solution and
the comparison are amed_core's."""

from __future__ import annotations

import logging
from typing import Optional

from flows.plan import SweepPlan
from flows.storage.generate import generate
from flows.storage.teachers import TeacherStore

log = logging.getLogger("amed.reference")

__all__ = ["load_reference", "reference_records"]


def _shards(store: TeacherStore, spec):
    return [store.read_shard(spec.spec_hash, i) for i in range(spec.num_shards)]


def load_reference(spec_json: str, store_url: str, storage_options: Optional[dict], denoiser, num_samples: int):
    """(n, C, H, W) float64 reference solutions of the evaluation seeds, generated into the store where missing."""
    from amed_core.evaluate.reference import reference_final_states
    from amed_core.teacher import TeacherSpec

    spec = TeacherSpec.from_json(spec_json)
    store = TeacherStore(store_url, storage_options=storage_options)
    if store.missing_shards(spec):
        log.info("reference %s: generating its missing shards", spec.spec_hash[:12])
        generate(store, denoiser, spec, progress=False)
    return reference_final_states(spec, _shards(store, spec), num_samples)


def reference_records(plan: SweepPlan) -> list[dict]:
    """Per dataset with a stored reference: its spec hash, points, the check's hash and the convergence record
    (RMSE between the N- and (2N - 1)-point solutions; ``amed_core.evaluate.reference_convergence``). A reference
    whose check is not in the store (not generated yet) gets ``convergence: None``."""
    from amed_core.evaluate.reference import reference_convergence, reference_final_states, reference_points
    from amed_core.teacher import TeacherSpec

    out = []
    store = TeacherStore(plan.store_url, storage_options=plan.storage_options)
    for ref in (t for t in plan.teachers if t.role == "reference"):
        check = next((t for t in plan.teachers if t.role == "reference_check" and t.name == ref.name), None)
        spec = TeacherSpec.from_json(ref.spec_json)
        rec = {"dataset": ref.name, "reference": ref.spec_hash, "points": reference_points(spec),
               "num_samples": spec.num_trajectories, "solver": "dpmpp (3M, log-SNR, float64)",
               "check": check.spec_hash if check else None, "convergence": None}
        if check is not None and not store.missing_shards(TeacherSpec.from_json(check.spec_json)):
            cspec = TeacherSpec.from_json(check.spec_json)
            x_n = reference_final_states(spec, _shards(store, spec))
            x_2n = reference_final_states(cspec, _shards(store, cspec))
            rec["convergence"] = reference_convergence(x_n, x_2n, points=reference_points(spec))
        out.append(rec)
    return out

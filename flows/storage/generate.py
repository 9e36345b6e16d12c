"""Generating a teacher into the store on this machine (``amed teacher generate``; the sweep spreads the shards over Ray
actors instead, :mod:`flows.cluster.teacher`). Resumes: committed shards are skipped, a dead writer's object adopted."""

from __future__ import annotations

from dataclasses import dataclass

from amed_core.teacher import TeacherSpec, generate_shard
from flows.storage.teachers import TeacherStore

__all__ = ["GenerateSummary", "generate"]


@dataclass
class GenerateSummary:
    spec_hash: str
    trajectories: int
    shards: int
    shards_written: int
    shards_skipped: int
    bytes: int
    nfe_per_trajectory: int
    nfe_spent: int  # denoiser evaluations counted per sample, by this call

    def lines(self) -> list[str]:
        return [
            f"teacher {self.spec_hash}",
            f"trajectories: {self.trajectories}",
            f"shards: {self.shards} ({self.shards_written} written now, {self.shards_skipped} already there)",
            f"bytes: {self.bytes}",
            f"NFE per trajectory: {self.nfe_per_trajectory}; NFE spent now: {self.nfe_spent}",
        ]


def generate(store: TeacherStore, denoiser, spec: TeacherSpec, *, progress: bool = True, batch_size: int | None = None,
             shards: list[int] | None = None, device=None, manifest_every: int = 16) -> GenerateSummary:
    """Generate every missing shard of ``spec`` into ``store`` (resumes; skips committed shards).

    Each shard is committed by its own manifest entry; manifest.json (the merged view) is rewritten every
    ``manifest_every`` shards and at the end, even when interrupted.
    """
    from tqdm.auto import tqdm

    h = store.put_spec(spec)
    todo = store.missing_shards(spec)
    if shards is not None:
        todo = [i for i in todo if i in set(shards)]
    skipped = spec.num_shards - len(todo) if shards is None else len(set(shards) - set(todo))
    written, spent, nfe, pending = 0, 0, None, 0
    bar = tqdm(total=spec.num_trajectories, unit="traj", desc=f"teacher {h[:12]}", disable=not progress)
    if shards is None:
        bar.update(sum(spec.shard_range(i)[1] - spec.shard_range(i)[0] for i in range(spec.num_shards) if i not in todo))
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-commit")  # commit i while computing i+1
    in_flight = None

    def settle():
        nonlocal in_flight, pending
        if in_flight is not None:
            entry = in_flight.result()
            in_flight = None
            pending += 1
            bar.update(entry["num_samples"])
            if pending >= manifest_every:
                store.flush_manifest(spec)
                pending = 0

    try:
        for i in todo:
            entry = store.adopt_shard(spec, i, update_manifest=False)  # a killed writer may have left a complete object
            if entry is None:
                shard = generate_shard(denoiser, spec, i, batch_size=batch_size, device=device)
                settle()
                in_flight = pool.submit(store.commit_shard, spec, shard, update_manifest=False)
                spent += shard.total_nfe
                nfe = shard.nfe
                written += 1
            else:
                skipped += 1
                pending += 1
                bar.update(entry["num_samples"])
        settle()
    finally:
        try:
            if in_flight is not None:
                in_flight.result()
        finally:
            pool.shutdown(wait=True)
            bar.close()
            if pending or not todo or written:
                store.flush_manifest(spec)
    entries = store.manifest(h)
    if nfe is None and entries:
        nfe = next(iter(entries.values()))["nfe"]
    return GenerateSummary(spec_hash=h, trajectories=sum(e["num_samples"] for e in entries.values()),
                           shards=len(entries), shards_written=written, shards_skipped=skipped,
                           bytes=sum(e["bytes"] for e in entries.values()), nfe_per_trajectory=int(nfe or 0),
                           nfe_spent=spent)

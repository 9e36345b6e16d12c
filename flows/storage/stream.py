"""Teacher batches streamed from the store at a student's grid, shuffled across shards, with bounded memory."""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

import torch

from amed_core.shards import TeacherShard
from amed_core.teacher import TeacherBatch, batch_dtype, student_indices
from flows.storage.errors import ShardVerificationError

__all__ = ["BatchStream", "held_out"]


class BatchStream:
    """An iterable of TeacherBatches of one stored teacher at a student's grid (``student_sigmas``).

    Shards are visited in a seeded random order per epoch; ``window_shards`` of them at a time are
    pooled and their trajectories shuffled (leftovers carry into the next window). A background thread
    downloads, verifies and slices up to ``prefetch`` shards ahead, so memory holds at most
    ``window_shards + prefetch + 1`` shards (at the student's grid). ``shuffle=False`` yields
    trajectories in global order (0, 1, 2, ...), which reproduces an on-the-fly teacher drawing the
    same seeds. ``num_trajectories`` uses only the first that many; ``epochs=None`` cycles forever.
    Each ``iter()`` starts the stream afresh (nothing is read before it).
    """

    def __init__(self, store, spec_hash: str, student_sigmas: torch.Tensor, batch_size: int, seed: int = 0, *,
                 shuffle: bool = True, epochs: int | None = 1, num_trajectories: int | None = None,
                 window_shards: int = 2, prefetch: int = 2, dtype: torch.dtype | None = None,
                 drop_last: bool = False, require_complete: bool = True):
        self.store, self.spec_hash, self.student_sigmas = store, spec_hash, student_sigmas
        self.batch_size, self.seed, self.shuffle, self.epochs = batch_size, seed, shuffle, epochs
        self.num_trajectories, self.window_shards, self.prefetch = num_trajectories, window_shards, prefetch
        self.dtype, self.drop_last, self.require_complete = dtype, drop_last, require_complete

    def __iter__(self) -> Iterator[TeacherBatch]:
        store, spec_hash, student_sigmas, batch_size, seed = (self.store, self.spec_hash, self.student_sigmas,
                                                              self.batch_size, self.seed)
        shuffle, epochs, num_trajectories, window_shards = self.shuffle, self.epochs, self.num_trajectories, self.window_shards
        prefetch, dtype, drop_last, require_complete = self.prefetch, self.dtype, self.drop_last, self.require_complete
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if window_shards < 1 or prefetch < 1:
            raise ValueError("window_shards and prefetch must be >= 1")
        spec = store.get_spec(spec_hash)
        entries = store.manifest(spec_hash)
        total = spec.num_trajectories if num_trajectories is None else int(num_trajectories)
        if not (1 <= total <= spec.num_trajectories):
            raise ValueError(f"num_trajectories must be in [1, {spec.num_trajectories}], got {num_trajectories}")
        needed = [i for i in range(spec.num_shards) if spec.shard_range(i)[0] < total]
        missing = [i for i in needed if i not in entries]
        if missing and require_complete:
            raise ShardVerificationError(f"teacher {spec_hash} lacks shards {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                                         "run `amed teacher generate` again to finish it")
        needed = [i for i in needed if i in entries]
        idx = student_indices(spec.union_grid(), torch.as_tensor(student_sigmas, dtype=torch.float64))

        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        _END = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def producer():
            try:
                epoch = 0
                while epochs is None or epoch < epochs:
                    order = list(needed)
                    if shuffle:
                        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
                        order = [order[j] for j in torch.randperm(len(order), generator=g).tolist()]
                    for i in order:
                        shard = store.read_shard(spec_hash, i, entries[i])
                        lo, hi = spec.shard_range(i)
                        n = min(hi, total) - lo
                        batch = _slice_shard(shard, idx, n, dtype)
                        if not put(batch):
                            return
                    if not put(("epoch_end", epoch)):
                        return
                    epoch += 1
                put(_END)
            except BaseException as e:  # handed to the consumer, which re-raises
                put(e)

        thread = threading.Thread(target=producer, name=f"teacher-prefetch-{spec_hash[:8]}", daemon=True)
        thread.start()
        gen = torch.Generator().manual_seed(int(seed))
        pool: list[TeacherBatch] = []
        carry: Optional[TeacherBatch] = None

        def flush(final: bool) -> Iterator[TeacherBatch]:
            nonlocal pool, carry
            parts = ([carry] if carry is not None else []) + pool
            pool, carry = [], None
            if not parts:
                return
            noise = torch.cat([p.noise for p in parts])
            states = torch.cat([p.states for p in parts], dim=1)
            labels = None if parts[0].class_labels is None else torch.cat([p.class_labels for p in parts])
            n = noise.shape[0]
            perm = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            full = n - n % batch_size
            for lo in range(0, full, batch_size):
                j = perm[lo:lo + batch_size]
                yield TeacherBatch(noise=noise[j], class_labels=None if labels is None else labels[j], states=states[:, j])
            if full < n:
                j = perm[full:]
                rest = TeacherBatch(noise=noise[j], class_labels=None if labels is None else labels[j], states=states[:, j])
                if final:
                    if not drop_last:
                        yield rest
                else:
                    carry = rest

        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, tuple):  # end of an epoch: emit what is left
                    yield from flush(final=True)
                    continue
                pool.append(item)
                if len(pool) >= window_shards:
                    yield from flush(final=False)
        finally:
            stop.set()
            thread.join(timeout=5)


def _slice_shard(shard: TeacherShard, idx: torch.Tensor, n: int, dtype: torch.dtype | None) -> TeacherBatch:
    """One TeacherBatch holding the first n trajectories of a shard at the student's grid points idx."""
    out = batch_dtype(shard.noise.dtype, dtype)
    noise = shard.noise[:n].to(out)
    states = shard.states[idx][:, :n].to(out)
    states[0] = noise * shard.sigmas[0].to(out)
    labels = shard.one_hot_labels(out)
    return TeacherBatch(noise=noise, class_labels=None if labels is None else labels[:n], states=states)


def held_out(store, spec_hash: str, student_sigmas: torch.Tensor, count: int, *,
             dtype: torch.dtype | None = None) -> list[TeacherBatch]:
    """The teacher's last ``count`` trajectories at a student's grid (the validation split, issue 21: training reads
    the first ``num_trajectories - count`` through :class:`BatchStream`'s ``num_trajectories``), in stored order."""
    from amed_core.teacher import shard_to_batches

    spec = store.get_spec(spec_hash)
    total = spec.num_trajectories
    if not 0 < count < total:
        raise ValueError(f"validation split: {count} held-out trajectories of a teacher of {total} (must leave some)")
    out = []
    for i in range(spec.num_shards):
        lo, hi = spec.shard_range(i)
        if hi <= total - count:
            continue
        b = next(iter(shard_to_batches(store.read_shard(spec_hash, i), student_sigmas, dtype=dtype)))
        skip = max(0, total - count - lo)
        out.append(TeacherBatch(noise=b.noise[skip:], states=b.states[:, skip:],
                                class_labels=None if b.class_labels is None else b.class_labels[skip:]))
    return out

"""The pieces of issue 21's sweep defaults (the flow itself: tests/test_pipeline.py,
test_default_sweep_ranks_the_panel_and_starts_from_its_winner): priority slots (trainings take the next free slot
first), the finalists and winner chosen from the ranking round, a plan completed from the winners, the divergence
flag against peers."""

from __future__ import annotations

import threading
import time

import pytest

from flows.config import load_sweep
from flows.results import CandidateResult, EvalProtocol, flag_diverged
from test_pipeline import PANEL_START as SWEEP

def test_priority_slots_serve_trainings_first():
    from flows.cluster.schedule import PrioritySlots

    slots, order, hold = PrioritySlots(1), [], threading.Event()

    def job(name, prio):
        with slots.hold(prio):
            order.append(name)
            if name == "first":
                hold.wait(5)

    threads = [threading.Thread(target=job, args=("first", 0))]
    threads[0].start()
    while not order:
        time.sleep(0.01)
    for name, prio in (("eval-a", 0), ("eval-b", 0), ("train", 1)):  # queued in this order behind "first"
        threads.append(threading.Thread(target=job, args=(name, prio)))
        threads[-1].start()
        time.sleep(0.05)
    hold.set()
    for t in threads:
        t.join(5)
    assert order == ["first", "train", "eval-a", "eval-b"]


def _plan_with_ranking():
    from flows.plan import plan_sweep

    cfg = load_sweep({**SWEEP, "store_url": "/nonexistent", "nfes": [3]})
    return cfg, plan_sweep(cfg)


def test_choose_finalists_and_winner_from_the_ranking():
    from flows.plan.init import choose

    cfg, plan = _plan_with_ranking()
    assert plan.pending_init and not plan.candidates and len(plan.rank) == 1
    slot, rank = plan.panels[0], plan.rank[0]
    values = {i: float(k) for k, i in enumerate(reversed(slot.entries))}  # the last planned entry ranks first
    values[slot.entries[-1]] = float("nan")  # ... unless it failed: it ranks last
    c = choose(plan, 2, {rank.id: {"values": values, "metric": "rmse"}})
    assert set(c.full) == {slot.entries[-2], slot.entries[-3]}  # the 2 finalists
    assert c.winners[("digits", 3)].id == slot.entries[-2]
    from flows.plan import plan_sweep

    started = plan_sweep(cfg, winners=c.winners)
    assert not started.pending_init and {x.family for x in started.candidates} == {"amed", "gits", "epd"}
    assert [r.id for r in started.rank] == [rank.id]  # the same ranking: the completed plan keeps its finalists


def test_a_run_far_above_its_peers_is_flagged_and_never_champion():
    from flows.results import champion_rows

    proto = EvalProtocol(metric="rmse", num_samples=8, seed=0)

    def cand(seed, loss, value):
        return CandidateResult(dataset="d", solver="amed+ipndm", base_solver="ipndm", nfe=5, seed=seed,
                               checkpoint_url="x", protocol=proto, value=value, base_value=1.0,
                               loss_history=[1.0, loss], panel_value=1.0, teacher_id="t")

    rows = flag_diverged([cand(0, 0.1, 0.5), cand(1, 0.12, 0.6), cand(2, 5.0, 0.1)])
    assert [r.status for r in rows] == ["ok", "ok", "diverged"]
    assert champion_rows(rows)[0]["value"] == 0.5  # the diverged one is reported, not crowned


def test_ranking_leaves_the_full_count_jobs_unchanged_and_both_adds_the_recipe():
    """Successive halving only chooses which full-count jobs run: their ids (so seeds, samples and store keys) are
    those of a sweep without it. Mode both trains the recipe's students beside the panel start, on one teacher."""
    from flows.plan import plan_sweep
    from flows.plan.init import choose

    cfg, plan = _plan_with_ranking()
    unranked = plan_sweep(load_sweep({**SWEEP, "store_url": "/nonexistent", "nfes": [3],
                                      "panel": {"rank_samples": 0}}))
    assert not unranked.rank and [b.id for b in unranked.baselines] == [b.id for b in plan.baselines]
    slot, rank = plan.panels[0], plan.rank[0]
    winners = choose(plan, 2, {rank.id: {"values": {i: 1.0 for i in slot.entries}}}).winners
    both = plan_sweep(load_sweep({**SWEEP, "store_url": "/nonexistent", "nfes": [3], "init": {"mode": "both"},
                                  "solvers": ["amed", "amed+ipndm"]}), winners=winners)
    amed = [c for c in both.candidates if c.family == "amed"]
    assert sorted(c.train.solver for c in amed) == sorted(["amed", "amed+ipndm", amed[0].train.solver])
    assert len({c.train.teacher_hash for c in amed}) == 1 and [r.id for r in both.rank] == [rank.id]

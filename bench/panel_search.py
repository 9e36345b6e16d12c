"""What successive halving saves on the panel expanded over schedules (issue 21, item 6), measured in one run: every
entry scored on the full count (the old panel) vs every entry ranked on --rank samples in one pass (one noise draw,
one near-exact reference: amed_core.evaluate.rank_samplers) and only the best --finalists scored on the full count
(amed_core.evaluate.score_run, the evaluate stage's own scoring, same seeds: a finalist's number is the old panel's).

    .venv/bin/python bench/panel_search.py --teacher digits-gmm --nfes 5,7 --n 4096 --json bench/panel_search.json

Prints, per NFE: entries, seconds of each way, their ratio, the full-count winner and whether the halving kept it
(and with which full-count value).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amed_core.evaluate import rank_samplers, reference_solution, score_run  # noqa: E402
from amed_core.families import free  # noqa: E402
from amed_core.io import atomic_write_bytes  # noqa: E402

EXPAND = ("ipndm", "deis", "dpmpp", "unipc")
SEED = 1_000_000  # the sweep's evaluation.seed default


def entries(teacher, nfe: int) -> dict:
    out = {}
    for s in EXPAND:
        for o in free.option_sets(s, nfe):
            key = f"{s}|{o['schedule'].schedule_type}|afs={o['afs']}|dt={o['options'].get('dynamic_thresholding')}"
            out[key] = free.make(s, nfe, schedule=o["schedule"], afs=o["afs"], options=o["options"], denoiser=teacher)
    return out


def score(sampler, teacher, n: int, metric: str, ref_steps: int) -> float:
    reference = None
    if metric == "rmse":
        def reference(noise, labels):
            return reference_solution(teacher, noise, num_steps=ref_steps)
    run = lambda noise, labels: sampler(teacher, noise)  # noqa: E731
    return score_run(run, teacher, seeds=range(SEED, SEED + n), batch_size=1024, metric=metric,
                     reference=reference).value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="digits-gmm")
    ap.add_argument("--nfes", default="5,7")
    ap.add_argument("--n", type=int, default=4096, help="the full count")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--finalists", type=int, default=4)
    ap.add_argument("--reference-steps", type=int, default=257)
    ap.add_argument("--json", default="bench/panel_search.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from amed_core.adapters import load_teacher

    teacher = load_teacher(args.teacher)
    metric = "fd_exact" if hasattr(teacher, "log_weights") else "rmse"
    path = Path(args.json)
    db = json.loads(path.read_text()) if path.exists() else {}
    for nfe in [int(v) for v in args.nfes.split(",")]:
        key = f"{args.teacher}|{nfe}|{args.n}|{args.rank}|{args.finalists}"
        if key in db:
            continue
        es = entries(teacher, nfe)
        t0 = time.perf_counter()
        full = {k: score(s, teacher, args.n, metric, args.reference_steps) for k, s in es.items()}
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        ranked = rank_samplers(es, teacher, seeds=range(SEED, SEED + args.rank), metric=metric,
                               reference_steps=args.reference_steps)["values"]
        fin = sorted(es, key=lambda k: ranked[k])[:args.finalists]
        final = {k: score(es[k], teacher, args.n, metric, args.reference_steps) for k in fin}
        t_half = time.perf_counter() - t0
        best_full = min(full, key=full.get)
        best_half = min(final, key=final.get)
        db[key] = {"teacher": args.teacher, "nfe": nfe, "entries": len(es), "metric": metric, "n": args.n,
                   "rank": args.rank, "finalists": args.finalists, "seconds_full": t_full, "seconds_halving": t_half,
                   "best_full": best_full, "best_full_value": full[best_full], "best_halving": best_half,
                   "best_halving_value": final[best_half], "identical": all(final[k] == full[k] for k in fin),
                   "load": os.getloadavg()}
        atomic_write_bytes(path, json.dumps(db, indent=1).encode())
        print(json.dumps(db[key]), flush=True)
    print("| teacher | NFE | entries | full count | every entry in full (s) | rank + finalists (s) | ratio | "
          "best (full) | best (halving) | finalists' numbers unchanged |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in db.values():
        print(f"| {r['teacher']} | {r['nfe']} | {r['entries']} | {r['n']} | {r['seconds_full']:.0f} | "
              f"{r['seconds_halving']:.0f} | {r['seconds_full'] / r['seconds_halving']:.1f}x | {r['best_full']} "
              f"{r['best_full_value']:.4g} | {r['best_halving']} {r['best_halving_value']:.4g} | {r['identical']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

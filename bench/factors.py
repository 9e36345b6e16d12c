"""Why learned samplers lose to the training-free panel, one factor at a time, and whether starting them from the
panel's winner fixes it (issue 21, item 2 and the goal). Every teacher is an argument, so the same tables run on any
teacher ``load_teacher`` knows (and ``heldout-gmm``, a 20-component mixture fitted here that no recipe was tuned on).

    .venv/bin/python bench/factors.py --teacher digits-tiny-unet --json bench/factors_unet.json
    .venv/bin/python bench/factors.py --teacher digits-gmm --json bench/factors_gmm.json --n 1024
    .venv/bin/python bench/factors.py --teacher heldout-gmm --json bench/factors_heldout.json --n 1024
    .venv/bin/python bench/factors.py --table bench/factors_unet.json bench/factors_gmm.json     # print only
    .venv/bin/python bench/factors.py --table bench/factors_*.json --compact     # one table per factor, all teachers

The protocol, the same in every table (nothing below is tuned on these seeds):
- held-out noise: --n samples from seeds 2,000,000.. (the teacher trajectories use seeds 0..; validation uses the
  last --val of them, never scored here);
- the reference: DPM-Solver++(3M) on --reference-steps log-SNR points in float64 from the same noise; its own error is
  reported (RMSE against twice the points) so a ratio near it is not read as a difference;
- the best training-free sampler: the panel expanded over schedules (every option set of iPNDM, DEIS, DPM-Solver++,
  UniPC: AFS on/off, polynomial 7 / log-SNR / time-uniform, thresholding on/off; plus Heun, DPM-Solver-2, Euler,
  variable-step iPNDM), each scored on all --n samples;
- RMSE to the reference (what ``metric: rmse`` reports) and per-sample RMSE p50 / p90 / p99; ratio = RMSE / best free.

Factors (one table each; the default in brackets, the others moved one at a time): the start [panel: the plugin of
the winner's solver on the winner's grid, reproducing it before training] vs the recipe (AMED-Plugin on iPNDM, poly-7,
AFS, the improved recipe); the budget [1024 trajectories x 4 passes] 256 / 4096 / 16384; the loss [per step, mean]
vs the final state, vs a tail term (topk:0.1); the teacher [Heun, M=8 points per interval] M = 2 / 32; validation
[on: the best of the validations kept] vs off (the last state kept), at the default lr and at 10x; the capacity
[scale_dir 0.01, scale_time 0: the step scaled within 1%] vs scale_dir 0.1, and with scale_time 0.2. GITS and EPD: the
recipe (GITS on iPNDM over a poly-7 fine grid; EPD+iPNDM from random tables) vs the panel start. Each finished cell
is appended to --json at once and skipped on a rerun (resume freely on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amed_core.adapters import load_teacher  # noqa: E402
from amed_core.amed import AMEDPredictor, PredictorConfig, SamplerSpec, TrainConfig, train_amed  # noqa: E402
from amed_core.evaluate import reference_solution, seeded_noise  # noqa: E402
from amed_core.evaluate.score import per_sample_summary  # noqa: E402
from amed_core.families import epd as fam_epd  # noqa: E402
from amed_core.families import free  # noqa: E402
from amed_core.families import gits as fam_gits  # noqa: E402
from amed_core.families.init import START_LR, Winner, amed_init, amed_predictor, amed_spec, epd_init  # noqa: E402
from amed_core.io import atomic_write_bytes  # noqa: E402
from amed_core.methods import solve  # noqa: E402
from amed_core.methods.epd import EPDTrainConfig, params_from_values  # noqa: E402
from amed_core.schedules import ScheduleSpec, refine, union  # noqa: E402
from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard, shard_to_batches  # noqa: E402
from amed_core.validation import ValidationSet  # noqa: E402

EXPAND = ("ipndm", "deis", "dpmpp", "unipc")
SINGLES = ("heun", "dpm2", "euler", "ipndm_v")
EVAL_SEED = 2_000_000
DEFAULT = {"start": "panel", "trajectories": 1024, "epochs": 4, "loss_target": "steps", "objective": "mean", "M": 8,
           "val": True, "lr_scale": 1.0}
# Settings added after the first runs: in a cell's key only when moved (so earlier cells keep their keys).
EXTRA = {"tsolver": "heun", "scale_dir": 0.01, "scale_time": 0.0}
FACTORS = {  # table -> the settings it moves (each dict overrides DEFAULT)
    "start": [{"start": "recipe"}],
    "budget": [{"trajectories": 256}, {"trajectories": 4096}, {"trajectories": 16384, "epochs": 1}],
    "loss": [{"loss_target": "final"}, {"objective": "topk:0.1"}],
    "teacher": [{"M": 2}, {"M": 32}, {"tsolver": "dpmpp"}],   # tsolver: the teacher's solver (default heun)
    "capacity": [{"scale_dir": 0.1}, {"scale_dir": 0.1, "scale_time": 0.2}],  # the predictor's scale heads
    "validation": [{"val": False}, {"lr_scale": 10.0}, {"lr_scale": 10.0, "val": False}],
}


def heldout_gmm(path: Path):
    """A 20-component full-covariance mixture fitted to scikit-learn's 8x8 digits (pixels in [-1, 1]) with seed 7:
    a teacher no recipe here was tuned on (the issue's 'another 20-component mixture'); cached as .npz."""
    import numpy as np

    if not path.exists():
        from sklearn.datasets import load_digits
        from sklearn.mixture import GaussianMixture

        x = load_digits().data / 8.0 - 1.0
        g = GaussianMixture(20, covariance_type="full", reg_covar=1e-3, random_state=7).fit(x)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, weights=g.weights_, means=g.means_, covs=g.covariances_, shape=np.array([1, 8, 8]))
    return load_teacher(f"gmm:{path}")


def teacher_of(name: str):
    if name == "heldout-gmm":
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "amed-distill" / "heldout-gmm20.npz"
        return heldout_gmm(cache)
    return load_teacher(name)


def _save(path: Path, db) -> None:
    atomic_write_bytes(path, json.dumps(db, indent=1).encode())


def _scores(x: torch.Tensor, ref: torch.Tensor) -> dict:
    x = x.to(torch.float64)
    per = ((x - ref) ** 2).reshape(x.shape[0], -1).mean(dim=1).sqrt()
    return {"rmse": float(((x - ref) ** 2).mean().sqrt()), **{f"ps_{k}": v for k, v in per_sample_summary(per).items()}}


class Bench:
    def __init__(self, args):
        self.args = args
        torch.set_num_threads(args.threads)
        self.teacher = teacher_of(args.teacher)
        self.path = Path(args.json)
        self.db = json.loads(self.path.read_text()) if self.path.exists() else {"cells": {}, "meta": {}}
        self.noise = seeded_noise(range(EVAL_SEED, EVAL_SEED + args.n), self.teacher.shape)
        self.ref = self._reference()
        self.shards: dict = {}

    def _reference(self) -> torch.Tensor:
        t0 = time.perf_counter()
        ref = reference_solution(self.teacher, self.noise, num_steps=self.args.reference_steps).to(torch.float64)
        if "reference_error" not in self.db["meta"]:
            ref2 = reference_solution(self.teacher, self.noise, num_steps=2 * self.args.reference_steps)
            self.db["meta"].update(teacher=self.args.teacher, n=self.args.n, eval_seed=EVAL_SEED,
                                   reference_steps=self.args.reference_steps,
                                   reference_error=float(((ref - ref2) ** 2).mean().sqrt()),
                                   reference_seconds=time.perf_counter() - t0, machine=os.uname().nodename,
                                   load=os.getloadavg())
            _save(self.path, self.db)
        return ref

    def done(self, key: str, cell: dict) -> None:
        self.db["cells"][key] = cell
        _save(self.path, self.db)
        shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in cell.items()
                 if k in ("rmse", "ps_p99", "seconds", "diverged", "improved")}
        print(f"{key}: {shown}", flush=True)

    def run_sampler(self, fn) -> torch.Tensor:
        xs = []
        with torch.no_grad():
            for lo in range(0, self.noise.shape[0], 512):
                xs.append(fn(self.noise[lo:lo + 512]))
        return torch.cat(xs)

    # -- the panel ---------------------------------------------------------------------------------------------------
    def panel(self, nfe: int) -> dict:
        best = None
        entries = [(s, o) for s in EXPAND for o in free.option_sets(s, nfe)]
        entries += [(s, {"solver": s, "schedule": ScheduleSpec("polynomial", rho=7.0), "afs": None, "options": {}})
                    for s in SINGLES]
        for solver, o in entries:
            sched = o["schedule"]
            key = (f"panel|{nfe}|{solver}|{sched.schedule_type}{sched.rho:g}|afs={o['afs']}|"
                   + ",".join(f"{k}={v}" for k, v in sorted(o["options"].items())))
            if key not in self.db["cells"]:
                try:
                    s = free.make(solver, nfe, schedule=sched, afs=o["afs"], options=o["options"], denoiser=self.teacher)
                except ValueError:
                    continue
                t = time.perf_counter()
                x = self.run_sampler(lambda n: s(self.teacher, n).x)
                self.done(key, {"family": "free", "nfe": nfe, "solver": solver, "sigmas": list(s.spec.sigmas),
                                "afs": s.spec.afs, "options": dict(s.spec.options), "schedule": s.spec.schedule,
                                "seconds": time.perf_counter() - t, **_scores(x, self.ref)})
            c = self.db["cells"][key]
            if math.isfinite(c["rmse"]) and (best is None or c["rmse"] < best[1]["rmse"]):
                best = (key, c)
        return best[1]

    # -- teachers ----------------------------------------------------------------------------------------------------
    def shard(self, grids, n: int, M: int, solver: str = "heun"):
        """One stored teacher (``solver``, M points per interval of the union of ``grids``) of n trajectories."""
        spec = TeacherSpec.for_denoiser(self.teacher, grids, num_trajectories=n, shard_size=n, sub_steps=M,
                                        solver=solver, dtype="float32")
        if spec.spec_hash not in self.shards:
            t = time.perf_counter()
            self.shards[spec.spec_hash] = generate_shard(self.teacher, spec, 0, batch_size=1024)
            print(f"teacher {spec.spec_hash[:8]}: {n} trajectories, M={M}, {len(spec.union_grid())} stored points, "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        return self.shards[spec.spec_hash]

    def batches(self, shard, grid, trajectories: int, batch: int = 128):
        """The first ``trajectories`` at ``grid`` and the validation set: the shard's last --val trajectories."""
        all_b = next(iter(shard_to_batches(shard, grid)))
        val_n = self.args.val
        train = [type(all_b)(noise=all_b.noise[lo:min(lo + batch, trajectories)], class_labels=None,
                             states=all_b.states[:, lo:min(lo + batch, trajectories)])
                 for lo in range(0, trajectories, batch)]
        val = ValidationSet(all_b.noise[-val_n:], all_b.states[-1, -val_n:])
        return train, val

    # -- AMED cells ---------------------------------------------------------------------------------------------------
    def amed_cell(self, nfe: int, setting: dict, winner_cell: dict, seed: int, grids_extra=()) -> dict:
        s = {**DEFAULT, **setting}
        key = "amed|" + json.dumps({k: s[k] for k in sorted(s)}, sort_keys=True) + f"|{nfe}|{seed}"
        if key in self.db["cells"]:
            return self.db["cells"][key]
        w = Winner(winner_cell["solver"], tuple(winner_cell["sigmas"]), winner_cell["afs"], winner_cell["options"],
                   winner_cell["schedule"])
        pc = PredictorConfig(scale_dir=s.get("scale_dir", EXTRA["scale_dir"]), scale_time=s.get("scale_time", EXTRA["scale_time"]))
        if s["start"] == "panel":
            init = amed_init(w)
            spec = amed_spec(init, predictor=pc, denoiser=self.teacher)
            predictor = amed_predictor(spec, init, seed=seed)
            lr = START_LR
            grid_for_teacher = StudentGrid(ScheduleSpec.from_dict(winner_cell["schedule"]), len(w.sigmas))
        else:  # the recipe: AMED-Plugin on iPNDM, poly-7, AFS at odd NFE, the improved recipe
            spec = SamplerSpec.create("amed+ipndm", nfe, afs=nfe % 2 == 1, denoiser=self.teacher, recipe="improved",
                                      predictor=PredictorConfig(scale_dir=0.01, scale_time=0.2))
            predictor = AMEDPredictor(spec.predictor, seed=seed)
            lr = 2e-3
            grid_for_teacher = StudentGrid(spec.schedule, spec.num_steps)
        n_traj = max(s["trajectories"], 1024) + self.args.val
        shard = self.shard([grid_for_teacher, *grids_extra], n_traj, s["M"], s.get("tsolver", "heun"))
        train, val = self.batches(shard, spec.grid(), s["trajectories"])
        cfg = TrainConfig(num_trajectories=s["trajectories"] * s["epochs"], batch_size=128, lr=lr * s["lr_scale"],
                          seed=seed, loss_weighting="relative", epochs=s["epochs"], loss_target=s["loss_target"],
                          objective=s["objective"], select="best" if s["val"] else "last", val_every=4)
        t = time.perf_counter()
        res = train_amed(self.teacher, spec, cfg, train, predictor=predictor, validation=val)
        secs = time.perf_counter() - t
        x = self.run_sampler(lambda n: solve(spec.solver, self.teacher, n * spec.grid()[0].to(n.dtype), spec.grid(),
                                             policy=res.predictor, **spec.solver_options()).x)
        tkey = f"teacher_error_{s.get('tsolver', 'heun')}_M{s['M']}"
        if tkey not in self.db["meta"]:  # the teacher's own final-state RMSE to the near-exact solution
            self.db["meta"][tkey] = float(((shard.states[-1, -self.args.val:].to(torch.float64) - reference_solution(
                self.teacher, shard.noise[-self.args.val:], num_steps=self.args.reference_steps)) ** 2).mean().sqrt())
        cell = {"family": "amed", "solver": spec.solver, "nfe": nfe, "seed": seed, **s, "train_seconds": secs,
                "updates": res.updates, "validation": res.validation, "diverged": res.diverged,
                "stopped_early": res.stopped_early, **_scores(x, self.ref)}
        self.done(key, cell)
        return cell

    # -- GITS and EPD cells ------------------------------------------------------------------------------------------
    def gits_cell(self, nfe: int, start: str, winner_cell: dict) -> dict:
        key = f"gits|{start}|{nfe}"
        if key in self.db["cells"]:
            return self.db["cells"][key]
        poly = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(self.teacher.sigma_min),
                            sigma_max=float(self.teacher.sigma_max))
        grids = [StudentGrid(poly, 41)]
        keep, solver, afs, opts = None, "ipndm", False, {"max_order": 4}
        if start == "panel":
            grids.append(StudentGrid(ScheduleSpec.from_dict(winner_cell["schedule"]), len(winner_cell["sigmas"])))
            keep, solver, opts = winner_cell["sigmas"], winner_cell["solver"], winner_cell["options"]
        shard = self.shard(grids, 256, 1)
        val = None
        if keep:  # the accurate teacher's held-out trajectories (the GITS teacher has one sub-step on its grid)
            main = self.shard([StudentGrid(ScheduleSpec.from_dict(winner_cell["schedule"]), len(keep))],
                              1024 + self.args.val, DEFAULT["M"])
            val = ValidationSet(main.noise[-self.args.val:].to(torch.float64),
                                main.states[-1, -self.args.val:].to(torch.float64))
        t = time.perf_counter()
        s = fam_gits.fit(self.teacher, shard.states, shard.sigmas, method=f"gits+{solver}", nfe=nfe, afs=afs,
                         options=opts, warmup=256, keep=keep, keep_afs=winner_cell["afs"], validation=val)
        secs = time.perf_counter() - t
        x = self.run_sampler(lambda n: s(self.teacher, n).x)
        cell = {"family": "gits", "solver": f"gits+{solver}", "nfe": nfe, "start": start, "train_seconds": secs,
                "kept_winner": bool(s.spec.fit.get("kept")), "sigmas": list(s.spec.sigmas), **_scores(x, self.ref)}
        self.done(key, cell)
        return cell

    def epd_cell(self, nfe: int, start: str, winner_cell: dict, seed: int = 0) -> dict:
        key = f"epd|{start}|{nfe}|{seed}"
        if key in self.db["cells"]:
            return self.db["cells"][key]
        afs = nfe % 2 == 1
        params = None
        if start == "panel":
            w = Winner(winner_cell["solver"], tuple(winner_cell["sigmas"]), winner_cell["afs"], winner_cell["options"],
                       winner_cell["schedule"])
            e = epd_init(w, nfe, 2)
            sigmas, afs = torch.tensor(e.sigmas, dtype=torch.float64), e.afs
            params = params_from_values(e.r, scale_dir=0.01)
            grid = StudentGrid(ScheduleSpec.from_dict(winner_cell["schedule"]), len(winner_cell["sigmas"]))
            if tuple(e.sigmas) != tuple(winner_cell["sigmas"][::2]):
                grid = StudentGrid(ScheduleSpec.from_dict(winner_cell["schedule"]), len(e.sigmas))
        else:
            from amed_core.methods import num_steps_for

            sched = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(self.teacher.sigma_min),
                                 sigma_max=float(self.teacher.sigma_max))
            N = num_steps_for("epd+ipndm", nfe, afs)
            sigmas, grid = sched.grid(N), StudentGrid(sched, N)
        shard = self.shard([grid], 1024 + self.args.val, DEFAULT["M"])
        train, val = self.batches(shard, sigmas, 1024)
        cfg = EPDTrainConfig(solver="epd+ipndm", afs=afs, seed=seed, loss_weighting="relative",
                             lr=5e-3 if start == "panel" else 5e-2, select="best")
        t = time.perf_counter()
        s, res = fam_epd.fit(self.teacher, sigmas, train * 4, cfg, nfe=nfe, params=params, validation=val)
        secs = time.perf_counter() - t
        x = self.run_sampler(lambda n: s(self.teacher, n).x)
        cell = {"family": "epd", "solver": "epd+ipndm", "nfe": nfe, "start": start, "seed": seed, "train_seconds": secs,
                "validation": res.validation, "diverged": res.diverged, **_scores(x, self.ref)}
        if start == "panel":  # the sweep's rule: no better than the winner on validation -> the winner itself
            wv = val.score(lambda n, lab: w.sampler()(self.teacher, n).x)
            cell.update(trained_rmse=cell["rmse"], winner_validation=wv, fallback=not res.validation["best"] < wv)
            if cell["fallback"]:
                cell.update({k: winner_cell[k] for k in winner_cell if k == "rmse" or k.startswith("ps_")})
        self.done(key, cell)
        return cell


def run(args) -> None:
    b = Bench(args)
    nfes = [int(v) for v in args.nfes.split(",")]
    factor_nfes = [int(v) for v in args.factor_nfes.split(",")]
    only = set(args.only.split(",")) if args.only else None
    for nfe in nfes:
        w = b.panel(nfe)
        print(f"NFE {nfe}: best free {w['solver']} {w['schedule']['schedule_type']} afs={w['afs']} "
              f"RMSE {w['rmse']:.4g}", flush=True)
        b.db["meta"].setdefault("best_free", {})[str(nfe)] = {k: w[k] for k in ("solver", "afs", "options", "rmse")}
        _save(b.path, b.db)
        for seed in range(args.seeds):
            b.amed_cell(nfe, {}, w, seed)                       # the default: the goal table's AMED row
        b.amed_cell(nfe, {"start": "recipe"}, w, 0)             # init mode "both" also trains the recipe
        if only is None or "gits" in only:
            b.gits_cell(nfe, "panel", w)
        if nfe in factor_nfes:
            for name, settings in FACTORS.items():
                if only is not None and name not in only:
                    continue
                for setting in settings:
                    b.amed_cell(nfe, setting, w, 0)
            if only is None or "gits" in only:
                b.gits_cell(nfe, "recipe", w)
            if only is None or "epd" in only:
                b.epd_cell(nfe, "panel", w)
                b.epd_cell(nfe, "recipe", w)
    print(table(b.db))


# -- tables ---------------------------------------------------------------------------------------------------------

def _fmt(v, p=4):
    return "-" if v is None else (f"{v:.{p}g}" if isinstance(v, float) else str(v))


def table(db) -> str:
    m, cells = db["meta"], db["cells"]
    best = {int(k): v for k, v in m.get("best_free", {}).items()}
    out = [f"teacher {m['teacher']}: RMSE of {m['n']} held-out samples (seeds {m['eval_seed']}..) to DPM-Solver++(3M) on "
           f"{m['reference_steps']} log-SNR points (its own error vs 2x points: {m['reference_error']:.2g}); teacher "
           "errors (Heun, M points per interval, vs that reference): "
           + ", ".join(f"{k[len('teacher_error_'):]} {v:.3g}" for k, v in sorted(m.items()) if k.startswith("teacher_error"))]
    out += ["", "Best training-free sampler (panel expanded over schedules):", "| NFE | solver | afs | options | RMSE |",
            "|---|---|---|---|---|"]
    out += [f"| {n} | {v['solver']} | {v['afs']} | {v['options']} | {v['rmse']:.4g} |" for n, v in sorted(best.items())]
    amed = [c for c in cells.values() if c["family"] == "amed"]

    def row(label, cs, nfe):
        if not cs:
            return None
        r = sum(c["rmse"] for c in cs) / len(cs)
        v = cs[0].get("validation") or {}
        flags = ("diverged " if any(c.get("diverged") for c in cs) else "") + \
                ("at start " if v and not v.get("improved") else "")
        return (f"| {nfe} | {label} | {r:.4g} | {r / best[nfe]['rmse']:.3f} | {_fmt(cs[0]['ps_median'])} | "
                f"{_fmt(cs[0]['ps_p90'])} | {_fmt(cs[0]['ps_p99'])} | {_fmt(v.get('first'))} -> "
                f"{_fmt(v.get('best') if cs[0].get('val', True) else v.get('last'))} | "
                f"{cs[0].get('train_seconds', 0):.0f} | {flags.strip() or 'ok'} |")

    head = ["| NFE | setting | RMSE | / best free | p50 | p90 | p99 | validation start -> kept (val=False: last) | train s | status |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, settings in [("default (panel start)", [{}])] + list(FACTORS.items()):
        out += ["", f"Factor: {name}", *head]
        for nfe in sorted(best):
            for st in ([{}] if name.startswith("default") else [{}] + settings):
                s = {**DEFAULT, **st}
                cs = [c for c in amed if c["nfe"] == nfe and all(c.get(k) == s[k] for k in DEFAULT)
                      and all(c.get(k, v) == s.get(k, v) for k, v in EXTRA.items())]
                if name.startswith("default"):
                    line = row("panel start, default", cs, nfe)
                else:
                    line = row(", ".join(f"{k}={v}" for k, v in st.items()) or "default", [c for c in cs if c["seed"] == 0], nfe)
                if line:
                    out.append(line)
    for fam in ("gits", "epd"):
        cs = [c for c in cells.values() if c["family"] == fam]
        if cs:
            out += ["", f"Factor: {fam.upper()} start", "| NFE | start | RMSE | / best free | p99 | note |", "|---|---|---|---|---|---|"]
            for c in sorted(cs, key=lambda c: (c["nfe"], c["start"])):
                note = ("kept the winner's grid" if c.get("kept_winner") else "") + (" diverged" if c.get("diverged") else "") \
                    + (f"no better than the winner on validation: the winner kept (trained: {c['trained_rmse']:.4g})"
                       if c.get("fallback") else "")
                out.append(f"| {c['nfe']} | {c['start']} | {c['rmse']:.4g} | {c['rmse'] / best[c['nfe']]['rmse']:.3f} | "
                           f"{c['ps_p99']:.4g} | {note.strip() or '-'} |")
    out += ["", "Goal (champion across families incl. the panel / best free; init 'panel': the panel start only, "
            "init 'both': the recipe's AMED-Plugin on iPNDM too):"]
    for nfe in sorted(best):
        for mode, starts in (("panel", ("panel",)), ("both", ("panel", "recipe"))):
            fam = [c for c in cells.values() if c["family"] != "free" and c["nfe"] == nfe and not c.get("diverged")
                   and c.get("start", "panel") in starts
                   and (c["family"] != "amed" or (all(c.get(k) == DEFAULT[k] for k in DEFAULT if k != "start")
                                                  and all(c.get(k, v) == v for k, v in EXTRA.items())))]
            champ = min(fam + [dict(best[nfe], family="free")], key=lambda c: c["rmse"])
            secs = sum(c.get("train_seconds", 0) for c in fam)
            out.append(f"NFE {nfe} (init {mode}): {champ['family']}{'/' + champ['start'] if 'start' in champ else ''} "
                       f"{champ['rmse']:.4g} / {best[nfe]['rmse']:.4g} = {champ['rmse'] / best[nfe]['rmse']:.3f} "
                       f"(training {secs:.0f} s over {len(fam)} candidates)")
    return "\n".join(out)


def compact(dbs: list) -> str:
    """One table per factor across teachers: RMSE / best free (p99 / best free's p99) per (teacher, NFE)."""
    cols = [(db["meta"]["teacher"], int(n)) for db in dbs for n in sorted(db["meta"].get("best_free", {}), key=int)]
    by = {db["meta"]["teacher"]: db for db in dbs}

    def cell(db, nfe, s):
        cs = [c for c in db["cells"].values() if c["family"] == "amed" and c["nfe"] == nfe and c.get("seed", 0) == 0
              and all(c.get(k) == s[k] for k in DEFAULT) and all(c.get(k, v) == s.get(k, v) for k, v in EXTRA.items())]
        if not cs:
            return "-"
        free = [c for c in db["cells"].values() if c["family"] == "free" and c["nfe"] == nfe
                and abs(c["rmse"] - db["meta"]["best_free"][str(nfe)]["rmse"]) < 1e-12]
        ratio = cs[0]["rmse"] / db["meta"]["best_free"][str(nfe)]["rmse"]
        p99 = cs[0]["ps_p99"] / free[0]["ps_p99"] if free else float("nan")
        return f"{ratio:.3f} ({p99:.2f})" + (" div" if cs[0].get("diverged") else "")

    out = ["RMSE / best free sampler's RMSE (in brackets: p99 / its p99), AMED, training seed 0; columns teacher NFE", ""]
    head = "| factor | setting | " + " | ".join(f"{t} {n}" for t, n in cols) + " |"
    out += [head, "|" + "---|" * (len(cols) + 2)]
    out.append("| - | default: panel start, 1024 x 4, steps, mean, Heun M=8, validation | "
               + " | ".join(cell(by[t], n, DEFAULT) for t, n in cols) + " |")
    for name, settings in FACTORS.items():
        for st in settings:
            out.append(f"| {name} | {', '.join(f'{k}={v}' for k, v in st.items())} | "
                       + " | ".join(cell(by[t], n, {**DEFAULT, **st}) for t, n in cols) + " |")
    for fam in ("gits", "epd"):
        for start in ("panel", "recipe"):
            row = []
            for t, n in cols:
                cs = [c for c in by[t]["cells"].values() if c["family"] == fam and c["nfe"] == n and c["start"] == start]
                row.append(f"{cs[0]['rmse'] / by[t]['meta']['best_free'][str(n)]['rmse']:.3f}"
                           + (" =w" if cs[0].get("kept_winner") or cs[0].get("fallback") else "") if cs else "-")
            out.append(f"| {fam.upper()} | start={start} | " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="digits-tiny-unet", help="any load_teacher name, or heldout-gmm")
    ap.add_argument("--json", default="bench/factors_unet.json")
    ap.add_argument("--nfes", default="3,5,7,9", help="NFEs of the goal table (the default setting)")
    ap.add_argument("--factor-nfes", default="3,5", help="NFEs of the factor tables")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds of the default setting")
    ap.add_argument("--n", type=int, default=256, help="held-out evaluation samples")
    ap.add_argument("--val", type=int, default=256, help="held-out validation trajectories")
    ap.add_argument("--reference-steps", type=int, default=200)
    ap.add_argument("--only", default="", help="comma list of tables to run (start,budget,loss,teacher,capacity,validation,gits,epd)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the tables of these result files")
    ap.add_argument("--compact", action="store_true", help="with --table: one table per factor across the files")
    args = ap.parse_args(argv)
    if args.table and args.compact:
        print(compact([json.loads(Path(f).read_text()) for f in args.table]))
        return 0
    if not args.table:
        run(args)
    print("\n\n".join(table(json.loads(Path(f).read_text())) for f in args.table or []))
    return 0


if __name__ == "__main__":
    sys.exit(main())

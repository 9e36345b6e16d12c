"""CUDA path check (issue 13, item 6): the device path a Ray GPU task takes, CUDA against CPU, in one process.

What a GPU job of the sweep does (flows/cluster/teacher.py, flows/cluster/jobs.py), with amed_core alone (no Ray,
Prefect or MLflow, so it runs on a bare CUDA machine): a teacher shard generated on the device
(``generate_shard(device=)``), an AMED predictor trained there on that shard's batches moved to the device
(``train_amed``; what ``flows.cluster.worker.to_device`` does), and the candidate scored there (``score_run(device=)``,
exact Frechet distance on the digits mixture). The same steps on the CPU give the reference: the teacher states must
agree to float64 round-off, and the trained predictor's score to a few per cent (training follows a different
floating-point path on the GPU, so its weights differ in the last bits and drift apart over the updates).

    .venv/bin/python bench/cuda_paths.py [--trajectories 1024] [--json out.json]    # skips (exit 0) without CUDA
    .venv/bin/python bench/cuda_paths.py --devices cpu                              # the CPU half alone

Exit status 1 if a CUDA result disagrees with the CPU's beyond the tolerances printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from amed_core.adapters import load_teacher  # noqa: E402
from amed_core.amed import AMEDPredictor, PredictorConfig, Sampler, SamplerSpec, TrainConfig, train_amed  # noqa: E402
from amed_core.evaluate import score_run  # noqa: E402
from amed_core.families import StaticSampler, StaticSpec  # noqa: E402
from amed_core.families import epd as fam_epd  # noqa: E402
from amed_core.methods import nfe_for  # noqa: E402
from amed_core.methods.epd import EPDTrainConfig  # noqa: E402
from amed_core.schedules import ScheduleSpec  # noqa: E402
from amed_core.teacher import TeacherBatch, TeacherSpec, generate_shard, shard_to_batches, student_grids_for  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from gpu import _sync  # noqa: E402  (bench/gpu.py: torch.cuda.synchronize, a no-op on the CPU)

SOLVER, NFE = "amed", 5
SCHEDULE = ScheduleSpec("polynomial", rho=7.0)


def run_on(dev: torch.device, trajectories: int, samples: int, epochs: int) -> dict:
    sync = _sync(str(dev))
    teacher = load_teacher("digits-gmm").to(dev)
    spec = SamplerSpec.create(SOLVER, NFE, afs=True, schedule=SCHEDULE, predictor=PredictorConfig(scale_dir=0.01),
                              denoiser=teacher)
    tspec = TeacherSpec.for_denoiser(teacher, student_grids_for(f"{SOLVER}:{NFE}", SCHEDULE),
                                     num_trajectories=trajectories, shard_size=trajectories, sub_steps=4)
    sync()
    t0 = time.perf_counter()
    shard = generate_shard(teacher, tspec, 0, device=dev)
    sync()
    t_teacher = time.perf_counter() - t0

    cfg = TrainConfig.improved(SOLVER, seed=0, num_trajectories=trajectories, epochs=epochs)
    batches = [TeacherBatch(noise=b.noise.to(dev), states=b.states.to(dev), class_labels=None)
               for b in shard_to_batches(shard, spec.grid(), batch_size=cfg.batch_size)]
    predictor = AMEDPredictor(spec.predictor, seed=cfg.seed).to(dev)
    t0 = time.perf_counter()
    res = train_amed(teacher, spec, cfg, batches, predictor=predictor)
    sync()
    t_train = time.perf_counter() - t0
    if next(res.predictor.parameters()).device.type != dev.type:
        raise AssertionError(f"the predictor left {dev}")

    seeds = list(range(10_000, 10_000 + samples))

    def score(sampler) -> tuple[float, dict]:
        t = time.perf_counter()
        r = score_run(lambda noise, labels: sampler(teacher, noise, class_labels=labels), teacher, seeds=seeds,
                      batch_size=1024, metric="fd_exact", device=dev)
        sync()
        return time.perf_counter() - t, {"fd": float(r.value), "nfe": int(r.nfe), "finite": bool(r.finite)}

    # AMED: the predictor trained above.
    t_score, amed = score(Sampler(spec, res.predictor))
    # EPD on the same grid and batches (flows.cluster.jobs._fit_epd: tables fitted on the device, returned on the
    # CPU, moved back with .to(device) by the evaluation task).
    sigmas = spec.grid()
    t0 = time.perf_counter()
    epd, epd_res = fam_epd.fit(teacher, sigmas, batches, EPDTrainConfig(num_trajectories=trajectories),
                               nfe=nfe_for("epd", len(sigmas), False, {}))
    sync()
    t_epd = time.perf_counter() - t0
    _, epd_score = score(epd.to(dev))
    # A training-free solver of the panel (also what a GITS candidate is: a StaticSampler on its learned sigmas).
    static = StaticSampler(StaticSpec("free", "ipndm", "ipndm", nfe_for("ipndm", len(sigmas), False, {}),
                                      tuple(float(v) for v in sigmas), teacher=teacher.identity()))
    _, static_score = score(static.to(dev))
    return {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "states": shard.states, "teacher_s": t_teacher, "train_s": t_train, "score_s": t_score,
            "epd_train_s": t_epd, "updates": int(res.updates), "final_loss": float(sum(res.losses[-1])),
            "epd_updates": int(epd_res.updates), **amed,
            **{f"epd_{k}": v for k, v in epd_score.items()}, **{f"ipndm_{k}": v for k, v in static_score.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trajectories", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--fd-rtol", type=float, default=0.05, help="allowed relative FD difference, CUDA vs CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if "cuda" in args.devices and not torch.cuda.is_available():
        print("bench/cuda_paths.py: no CUDA device here (torch.cuda.is_available() is False): skipped")
        return 0
    rows = {}
    for name in args.devices:
        rows[name] = run_on(torch.device(name), args.trajectories, args.samples, args.epochs)
        r = {k: v for k, v in rows[name].items() if k != "states"}
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    ok, out = True, {"torch": torch.__version__, "rows": {k: {kk: vv for kk, vv in v.items() if kk != "states"}
                                                         for k, v in rows.items()}}
    if "cpu" in rows and "cuda" in rows:
        cpu, gpu = rows["cpu"], rows["cuda"]
        d_states = float((cpu["states"].double() - gpu["states"].double()).abs().max())
        scale = float(cpu["states"].double().abs().max())
        fd_rel = {k: abs(gpu[k] - cpu[k]) / abs(cpu[k]) for k in ("fd", "epd_fd", "ipndm_fd")}
        checks = {"teacher states max |cuda - cpu| / max |cpu| <= 1e-6": d_states / scale <= 1e-6,
                  **{f"{k} relative difference <= {args.fd_rtol}": v <= args.fd_rtol for k, v in fd_rel.items()},
                  "same updates and NFE": all(cpu[k] == gpu[k] for k in ("updates", "nfe", "epd_updates", "epd_nfe",
                                                                           "ipndm_nfe")),
                  "finite": all(r[k] for r in (cpu, gpu) for k in ("finite", "epd_finite", "ipndm_finite"))}
        out.update(states_max_abs_diff=d_states, states_scale=scale, fd_rel_diff=fd_rel, checks=checks)
        print(f"teacher states: max |cuda - cpu| = {d_states:.3e} (scale {scale:.3g}); FD cpu / cuda: "
              + ", ".join(f"{k} {cpu[k]:.5f} / {gpu[k]:.5f} ({fd_rel[k]:.2%})" for k in fd_rel)
              + f"; speed-up cuda/cpu: teacher {cpu['teacher_s'] / gpu['teacher_s']:.1f}x, train "
              f"{cpu['train_s'] / gpu['train_s']:.1f}x, EPD train {cpu['epd_train_s'] / gpu['epd_train_s']:.1f}x, "
              f"score {cpu['score_s'] / gpu['score_s']:.1f}x")
        for what, good in checks.items():
            print(("ok    " if good else "FAIL  ") + what)
        ok = all(checks.values())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

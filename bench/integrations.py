"""Integrations benchmark: what running a champion through amed_core.integrations costs next to the libraries' own
loops on the same model, noise and NFE (the same work: outputs are compared before timing).

    OMP_NUM_THREADS=1 .venv/bin/python bench/integrations.py [--repeats 7] [--json out.json]

Rows (median CPU time of this process over interleaved repeats, one torch thread; ratio = ours / theirs, goal <= ~1.05):

- ``sample_with`` vs the pipeline's own loop: a Stable Diffusion-style pipeline built from configs (tests/
  test_adapters.py's tiny random one: CLIP text encoder, UNet2DConditionModel, AutoencoderKL; nothing downloaded),
  classifier-free guidance, Euler at NFE 5 and 10: ``sample_with(pipe, free euler sampler)`` against
  ``pipe(..., sigmas=exported)`` with EulerDiscreteScheduler, ``output_type="latent"`` and ``"np"``. The UNet is tiny,
  so the loops' own bookkeeping is what is measured (a real SD UNet makes both ratios ~1).
- ``to_k_diffusion`` vs k-diffusion's ``sample_euler`` / ``sample_dpmpp_2m`` on the shipped ``digits-tiny-unet``
  (k-diffusion installed with --no-deps: tests/k_diffusion_peer.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _median_times(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved: a load change hits both sides alike
        for k, fn in fns.items():
            t0 = time.process_time()  # this process's CPU time: one torch thread, so time spent preempted by
            fn()                      # other processes on a shared machine does not count
            times[k].append(time.process_time() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def pipeline_rows(repeats: int) -> list[dict]:
    import diffusers
    import transformers

    from amed_core.families import free
    from amed_core.integrations import export_schedule, pipeline_denoiser, sample_with
    from amed_core.schedules import ScheduleSpec
    from test_adapters import _tiny_sd_pipeline

    pipe, _, _ = _tiny_sd_pipeline(transformers, Path(tempfile.mkdtemp(prefix="amed-bench-")))
    base = dict(pipe.scheduler.config)
    cond, uncond = pipe.encode_prompt(["a cat"], "cpu", 1, True, None)
    den = pipeline_denoiser(pipe, guidance_scale=5.0, prompt_embeds=cond, negative_prompt_embeds=uncond)
    rows = []
    for nfe in (5, 10):
        sampler = free.make("euler", nfe, afs=False, schedule=ScheduleSpec("polynomial", den.sigma_min, den.sigma_max, 7.0),
                            denoiser=den)
        doc = export_schedule(sampler, "diffusers")
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(base, **doc["diffusers"]["config"])
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        for out in ("latent", "np"):
            def ours():
                return sample_with(pipe, sampler, prompt="a cat", guidance_scale=5.0, latents=noise, output_type=out).images

            def theirs():
                return pipe(prompt="a cat", sigmas=doc["sigmas"], guidance_scale=5.0, latents=noise.clone(),
                            output_type=out).images

            a, b = ours(), theirs()
            diff = float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max())
            if diff > 1e-3:
                raise RuntimeError(f"sample_with and the pipeline disagree by {diff:.2e}: not the same work")
            t = _median_times({"ours": ours, "theirs": theirs}, repeats)
            rows.append({"what": f"SD-style pipeline, CFG, euler NFE {nfe}, output {out}", "ours_s": t["ours"],
                         "theirs_s": t["theirs"], "ratio": t["ours"] / t["theirs"], "max_diff": diff})
    return rows


def k_diffusion_rows(repeats: int) -> list[dict]:
    from amed_core.adapters import load_teacher
    from amed_core.families import free
    from amed_core.integrations import export_schedule, to_k_diffusion
    from k_diffusion_peer import load_k_diffusion

    sampling, version = load_k_diffusion("sampling")
    teacher = load_teacher("digits-tiny-unet")
    noise = torch.randn(64, *teacher.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for solver, opts in (("euler", {}), ("dpmpp", {"max_order": 2, "lower_order_final": False,
                                                   "dynamic_thresholding": False})):
        sampler = free.make(solver, 10, afs=False, options=opts, denoiser=teacher)
        doc = export_schedule(sampler, "k-diffusion")
        fn = getattr(sampling, doc["k_diffusion"]["sampler"].rsplit(".", 1)[1])
        sig = torch.tensor(doc["sigmas"], dtype=torch.float64)
        ours_fn = to_k_diffusion(sampler)

        @torch.no_grad()
        def ours():
            return ours_fn(teacher, noise * sig[0], sig)

        @torch.no_grad()
        def theirs():
            return fn(teacher, noise * sig[0], sig, disable=True)

        diff = float((ours() - theirs()).abs().max())
        if diff > 1e-10:
            raise RuntimeError(f"to_k_diffusion and k-diffusion disagree by {diff:.2e}")
        t = _median_times({"ours": ours, "theirs": theirs}, repeats)
        rows.append({"what": f"digits-tiny-unet, {doc['k_diffusion']['sampler'].rsplit('.', 1)[1]} NFE 10, batch 64 "
                             f"(k-diffusion {version})", "ours_s": t["ours"], "theirs_s": t["theirs"],
                     "ratio": t["ours"] / t["theirs"], "max_diff": diff})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = pipeline_rows(args.repeats) + k_diffusion_rows(args.repeats)
    load = os.getloadavg()
    print(f"\n## Integrations: ours vs the library's own loop ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {load[0]:.1f}, torch {torch.__version__}, median of {args.repeats})\n")
    print("| what | ours (ms) | theirs (ms) | ours / theirs | max diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {1e3 * r['ours_s']:.1f} | {1e3 * r['theirs_s']:.1f} | {r['ratio']:.3f} | {r['max_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

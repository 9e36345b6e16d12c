"""GPU benchmark (issue 13, item 6): what a CUDA machine gives a sweep. Skips cleanly (exit 0) without CUDA.

On a CIFAR-10-size UNet (diffusers UNet2DModel with the DDPM CIFAR-10 layout: 35.7M parameters, 3x32x32, EDM
preconditioning from amed_core.adapters.edm_network; random weights: speed does not depend on them):

1. teacher throughput: denoiser evaluations per second at batch 128, fp32 and bf16 (torch.autocast);
2. predictor overhead per step: one AMED step's extra work (the feature hook + the ~9k-parameter predictor) relative
   to one plain denoiser evaluation, batch 128;
3. 1 vs N tasks per GPU (what ``compute.gpus_per_task = 1/N`` does): N processes on the same GPU each run the
   throughput loop at the same time (a small batch, 32, the case packing is for); aggregate evaluations per second.

    .venv/bin/python bench/gpu.py [--seconds 5] [--tasks 1 2 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# diffusers.UNet2DModel with the DDPM CIFAR-10 layout (35.7M parameters); bench/teacher_cache.py builds the same
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
                  layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])


def cifar_denoiser(device):
    import diffusers
    import torch

    from amed_core.adapters.edm_network import NetworkConfig, PreconditionedDenoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**CIFAR_UNET)
    cfg = NetworkConfig(arch="diffusers-unet2d", kwargs=dict(unet.config), shape=(3, 32, 32))
    return PreconditionedDenoiser(unet, cfg).to(device).eval()


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _timeit(fn, seconds: float, sync) -> float:
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


def throughput(batch: int, seconds: float, bf16: bool, device: str = "cuda") -> dict:
    import torch

    den = cifar_denoiser(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    sigma = torch.full((batch,), 2.0, device=device)

    def step():
        with torch.no_grad(), torch.autocast(str(device).split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            den(x, sigma)

    per = _timeit(step, seconds, _sync(device))
    return {"batch": batch, "bf16": bf16, "seconds_per_eval": per, "samples_per_s": batch / per}


def predictor_overhead(batch: int, seconds: float, device: str = "cuda") -> dict:
    import torch

    from amed_core.amed import AMEDPredictor, PredictorConfig

    den = cifar_denoiser(device)
    pred = AMEDPredictor(PredictorConfig(), seed=0).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    sigma = torch.full((batch,), 2.0, device=device)

    def plain():
        with torch.no_grad():
            den(x, sigma)

    def amed_step():
        with torch.no_grad(), den.capture_features() as tap:
            den(x, sigma)
        with torch.no_grad():
            pred(tap.value.float(), 2.0, 1.0, 0)

    t_plain = _timeit(plain, seconds, _sync(device))
    t_amed = _timeit(amed_step, seconds, _sync(device))
    return {"batch": batch, "plain_s": t_plain, "amed_step_s": t_amed, "overhead_pct": 100 * (t_amed - t_plain) / t_plain}


_BARRIER = None


def _init(barrier):
    global _BARRIER
    _BARRIER = barrier


def _worker(args):
    batch, seconds, device = args
    import torch

    den = cifar_denoiser(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    sigma = torch.full((batch,), 2.0, device=device)
    sync = _sync(device)
    with torch.no_grad():
        den(x, sigma)
    sync()
    _BARRIER.wait()  # every process has built and warmed its model: the timed loops overlap
    n, t0 = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - t0 < seconds:
            den(x, sigma)
            n += 1
    sync()
    return n * batch / (time.perf_counter() - t0)


def packing(tasks: int, batch: int, seconds: float, device: str = "cuda") -> dict:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(tasks)
    with ctx.Pool(tasks, initializer=_init, initargs=(barrier,)) as pool:
        rates = pool.map(_worker, [(batch, seconds, device)] * tasks, chunksize=1)
    return {"tasks_per_gpu": tasks, "batch": batch, "samples_per_s_total": sum(rates),
            "samples_per_s_each": sum(rates) / tasks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="run every part on the CPU, tiny (checks the code, measures nothing)")
    args = ap.parse_args()
    import torch

    if args.smoke:
        for r in (throughput(2, 0.2, False, "cpu"), throughput(2, 0.2, True, "cpu"), predictor_overhead(2, 0.2, "cpu"),
                  packing(2, 2, 0.2, "cpu")):
            print("smoke (CPU, not a measurement):", json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                                for k, v in r.items()}))
        return 0

    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here (torch.cuda.is_available() is False): skipped")
        return 0
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": []}
    print(f"device: {out['device']}, torch {torch.__version__}")
    rows = [throughput(128, args.seconds, False), throughput(128, args.seconds, True),
            predictor_overhead(128, args.seconds)] + [packing(n, 32, args.seconds) for n in args.tasks]
    for r in rows:
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    out["results"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

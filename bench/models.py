"""Real-model timing: AMED sampling against its base solver at the same NFE on a CIFAR-size UNet.

    .venv/bin/python bench/models.py                              # CPU, CIFAR-size EDM-wrapped diffusers UNet
    .venv/bin/python bench/models.py --device cuda --batch 128    # a GPU (add --autocast for bf16/fp16)
    .venv/bin/python bench/models.py --json out.json
    .venv/bin/python bench/models.py --threads 1 --clock cpu   # a shared CPU machine: process CPU time

The network is a randomly initialised diffusers ``UNet2DModel`` with DDPM's CIFAR-10 architecture
(32x32x3, channels 128-256-256-256, two res blocks per level, attention at 16x16; ~36M parameters) inside
our EDM preconditioning (``PreconditionedDenoiser``, AMED features from ``mid_block``). Timing does not depend
on the weights, so nothing is downloaded. Measured, median of ``--repeats`` runs, interleaved:

* ``heun`` (AFS) and AMED-Solver (``amed``, AFS) at NFE 5 (N = 4), and DPM-Solver++(2M) vs ``amed+dpmpp`` at NFE 5:
  seconds per batch, per sample, and the AMED overhead relative to its base;
* one denoiser evaluation with and without the AMED feature hook (``capture_features``);
* the predictor's own forward pass per step (features (B, 8, 8) -> r, scales), the cost AMED adds per step.

``--autocast`` runs the UNet under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA); the solver
arithmetic stays float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amed_core.adapters.edm import NetworkConfig, PreconditionedDenoiser  # noqa: E402
from amed_core.amed import AMEDPredictor, SamplerSpec  # noqa: E402
from amed_core.amed.checkpoint import Sampler  # noqa: E402
from amed_core.evaluate import num_steps_for as base_num_steps, pick_afs  # noqa: E402
from amed_core.schedules import ScheduleSpec  # noqa: E402
from amed_core.methods import solve  # noqa: E402

CIFAR_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[128, 256, 256, 256],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)
SMALL_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    norm_num_groups=8,
)


def build(size: str, device: torch.device) -> PreconditionedDenoiser:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**(CIFAR_UNET if size == "cifar" else SMALL_UNET)).eval().requires_grad_(False)
    cfg = NetworkConfig(arch="diffusers-unet2d", kwargs=dict(unet.config), shape=(3, 32, 32), name=f"bench-{size}")
    return PreconditionedDenoiser(unet, cfg).to(device)


class Autocast(torch.nn.Module):
    """Runs the wrapped denoiser's network under torch.autocast; everything else stays in float32."""

    def __init__(self, den, device_type: str):
        super().__init__()
        self.den = den
        self.device_type = device_type
        self.dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
        for attr in ("sigma_min", "sigma_max", "shape", "label_dim", "feature_source"):
            setattr(self, attr, getattr(den, attr))

    def forward(self, x, sigma, class_labels=None):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.den(x, sigma, class_labels)
        return out.float()

    def capture_features(self):
        return self.den.capture_features()

    def identity(self):
        return {**self.den.identity(), "autocast": str(self.dtype)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def timed(fn, device) -> float:
    sync(device)
    t = CLOCK()
    fn()
    sync(device)
    return CLOCK() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["cifar", "small"], default="cifar")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--autocast", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (steadier on a shared CPU machine; use wall on GPUs)")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    den = build(args.size, device)
    params = sum(p.numel() for p in den.parameters())
    model = Autocast(den, device.type) if args.autocast else den
    sched = ScheduleSpec("polynomial", sigma_min=den.sigma_min, sigma_max=den.sigma_max, rho=7.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, *den.shape, generator=g).to(device)

    pairs = [("heun", "amed", {}), ("dpmpp", "amed+dpmpp", {"max_order": 2})]
    runs = {}
    for base, student, opts in pairs:
        spec = SamplerSpec.create(student, args.nfe, afs=True, schedule=sched, denoiser=model,
                                  **({"max_order": 2} if student == "amed+dpmpp" else {}))
        sampler = Sampler(spec, AMEDPredictor(spec.predictor, seed=0).to(device))
        base_afs = pick_afs(base, args.nfe, True)
        base_grid = sched.grid(base_num_steps(base, args.nfe, base_afs)).to(device=device, dtype=torch.float32)
        base_opts = dict(opts)
        if base == "dpmpp":
            base_opts.update(predict_x0=True, lower_order_final=True)

        def run_base():
            with torch.no_grad():
                r = solve(base, model, noise * base_grid[0], base_grid, afs=base_afs, **base_opts)
            assert r.nfe == args.nfe, (base, r.nfe)

        def run_amed():
            r = sampler(model, noise)
            assert r.nfe == args.nfe, (student, r.nfe)

        run_base(), run_amed()  # warm-up (and the teacher hash, cached afterwards)
        tb, ta = [], []
        for _ in range(args.repeats):
            tb.append(timed(run_base, device))
            ta.append(timed(run_amed, device))
        runs[f"{base} vs {student}"] = dict(base=base, base_afs=base_afs, amed=student, nfe=args.nfe, base_s=statistics.median(tb),
                                            amed_s=statistics.median(ta), base_runs=tb, amed_runs=ta)

    # one evaluation with / without the feature hook; the predictor's own forward per step
    sigma = torch.full((args.batch,), 2.0, device=device)
    x = noise * 2.0

    def plain():
        with torch.no_grad():
            model(x, sigma)

    def hooked():
        with torch.no_grad(), den.capture_features() as tap:
            model(x, sigma)
        assert tap.value.shape == (args.batch, 8, 8)

    predictor = AMEDPredictor(SamplerSpec.create("amed", args.nfe, afs=True, schedule=sched, denoiser=den).predictor).to(device)
    feats = torch.randn(args.batch, 8, 8, device=device)
    t_cur, t_next = torch.tensor(2.0, device=device), torch.tensor(1.0, device=device)

    def pred():
        with torch.no_grad():
            for _ in range(100):
                predictor(feats, t_cur, t_next, 0)

    plain(), hooked(), pred()
    tp, th, tq = [], [], []
    for _ in range(max(3, args.repeats)):
        tp.append(timed(plain, device))
        th.append(timed(hooked, device))
        tq.append(timed(pred, device) / 100)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_name()}, "
                  f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__, "unet": args.size, "params": params, "batch": args.batch, "autocast": args.autocast,
        "repeats": args.repeats, "clock": args.clock, "runs": runs,
        "eval_s": statistics.median(tp), "eval_hooked_s": statistics.median(th), "predictor_step_s": statistics.median(tq),
    }
    print(f"# {result['device']} | torch {torch.__version__} | UNet {args.size} ({params / 1e6:.1f}M params) | batch {args.batch}"
          f" | {args.clock} clock"
          f"{' | autocast ' + str(model.dtype) if args.autocast else ''}")
    print("| pair | NFE | base s/batch | AMED s/batch | AMED / base |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['nfe']} | {r['base_s']:.3f} | {r['amed_s']:.3f} | {r['amed_s'] / r['base_s']:.3f} |")
    print(f"one evaluation: {result['eval_s'] * 1e3:.1f} ms plain, {result['eval_hooked_s'] * 1e3:.1f} ms with the feature hook; "
          f"predictor forward per step: {result['predictor_step_s'] * 1e6:.0f} us "
          f"({100 * result['predictor_step_s'] / result['eval_s']:.2f}% of one evaluation)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

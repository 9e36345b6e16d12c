"""Solver benchmark: per-step overhead against k-diffusion's samplers, and the quality table.

    .venv/bin/python bench/solvers.py                       # overhead (CPU) + quality table, n=4096
    .venv/bin/python bench/solvers.py --skip-quality        # overhead only
    .venv/bin/python bench/solvers.py --device cuda         # overhead on a GPU

Part 1 (overhead): the same cheap denoiser (the exact denoiser of N(0, I) data, D = x / (1 + sigma^2):
two elementwise kernels, so the solvers' own bookkeeping dominates), the same sigmas and the same
noise go through our solvers and through k-diffusion's ``sample_euler``, ``sample_heun``,
``sample_dpm_2`` and ``sample_dpmpp_2m`` (the solvers both have; ours: euler, heun, dpm2 r=0.5,
dpmpp max_order=2 without order lowering or thresholding). Both run under ``torch.no_grad``,
interleaved, median of repeats. We report time per step, the overhead per step (time per step
minus the denoiser's own time times its evaluations per step) and the ratio ours / k-diffusion
(goal: <= 1.0). Outputs are compared to make sure both did the same work.

k-diffusion (pip ``k-diffusion``, installed with ``--no-deps`` plus ``torchdiffeq``, ``torchsde``,
``trampoline``) imports torchvision in its package ``__init__`` and ``utils``; torchvision does not
install next to torch 2.13.0 here, so this script loads the real ``k_diffusion/sampling.py`` and
``utils.py`` without the package ``__init__``, with an empty stand-in for ``torchvision`` (only
``utils``'s image helpers use it; the samplers never do).

Part 2 (quality): :func:`amed_core.evaluate.quality_table` of all solvers at NFE 3, 5, 7, 9 on
digits-gmm: FD to exact mixture samples, RMSE to the near-exact ODE solution.
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

from amed_core import evaluate, solvers  # noqa: E402
from amed_core.adapters import load_teacher  # noqa: E402
from amed_core.schedules import get_schedule  # noqa: E402


def load_k_diffusion_sampling():
    """The real ``k_diffusion.sampling`` module, imported without the package __init__ (tests/k_diffusion_peer.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from k_diffusion_peer import load_k_diffusion

    try:
        sampling, version = load_k_diffusion("sampling")
    except ImportError as e:
        raise SystemExit(str(e)) from None
    return sampling, version


class StandardGaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(0, I) data, D(x; sigma) = x / (1 + sigma^2); sigma scalar or (B,)."""

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim:
            sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + sigma * sigma)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device):
    """CPU: this process's CPU time (with one torch thread, time spent preempted by other processes on a shared
    machine does not count); GPU: wall time after a synchronize."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def _time(fn, device, repeats: int) -> list[float]:
    clock = _clock(device)
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = clock()
        fn()
        _sync(device)
        out.append(clock() - t0)
    return out


def overhead_bench(device: torch.device, batch: int, shape: tuple, steps: int, repeats: int, dtype=torch.float32) -> list[dict]:
    kd, kd_version = load_k_diffusion_sampling()
    den = StandardGaussianDenoiser()
    sigmas = get_schedule(steps + 1, 0.002, 80.0).to(dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn((batch, *shape), generator=g) * 80.0).to(dtype=dtype, device=device)
    cases = [
        ("euler", 1, lambda: solvers.euler(den, x, sigmas).x, lambda: kd.sample_euler(den, x, sigmas, disable=True)),
        ("heun", 2, lambda: solvers.heun(den, x, sigmas).x, lambda: kd.sample_heun(den, x, sigmas, disable=True)),
        ("dpm2", 2, lambda: solvers.dpm2(den, x, sigmas, r=0.5).x, lambda: kd.sample_dpm_2(den, x, sigmas, disable=True)),
        ("dpmpp-2M", 1, lambda: solvers.dpmpp(den, x, sigmas, max_order=2, lower_order_final=False,
                                               dynamic_thresholding=False).x,
         lambda: kd.sample_dpmpp_2m(den, x, sigmas, disable=True)),
    ]
    s0 = sigmas[0]
    rows = []
    with torch.no_grad():
        def hundred_calls():
            for _ in range(100):
                den(x, s0)

        t_den = statistics.median(_time(hundred_calls, device, repeats)) / 100
        for name, evals, ours, peer in cases:
            a, b = ours(), peer()
            diff = float((a - b).abs().max() / (1 + b.abs().max()))
            if diff > 1e-4:
                raise RuntimeError(f"{name}: ours and k-diffusion disagree ({diff:.2e}); not the same work")
            for _ in range(3):
                ours(), peer()
            t_ours, t_peer = [], []
            for _ in range(repeats):                      # interleaved, so both see the same machine load
                t_ours += _time(ours, device, 1)
                t_peer += _time(peer, device, 1)
            mo, mp = statistics.median(t_ours) / steps, statistics.median(t_peer) / steps
            oo, op = mo - evals * t_den, mp - evals * t_den
            rows.append({"solver": name, "ours_us_per_step": mo * 1e6, "kdiff_us_per_step": mp * 1e6,
                         "denoiser_us": t_den * 1e6, "ours_overhead_us": oo * 1e6, "kdiff_overhead_us": op * 1e6,
                         "time_ratio": mo / mp, "overhead_ratio": oo / op if op > 0 else float("nan"),
                         "max_rel_diff": diff})
    for r in rows:
        r["k_diffusion"] = kd_version
    return rows


def print_overhead(rows, device, batch, shape, steps):
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"\n## Per-step overhead vs k-diffusion {rows[0]['k_diffusion']} ({device}, batch {batch}x{'x'.join(map(str, shape))}, "
          f"{steps} steps, float32, {clock}, denoiser {rows[0]['denoiser_us']:.1f} us/call)")
    print(f"| solver | ours us/step | k-diffusion us/step | ours overhead us/step | k-diffusion overhead us/step "
          f"| time ratio | overhead ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['solver']} | {r['ours_us_per_step']:.1f} | {r['kdiff_us_per_step']:.1f} | {r['ours_overhead_us']:.1f} "
              f"| {r['kdiff_overhead_us']:.1f} | {r['time_ratio']:.2f} | {r['overhead_ratio']:.2f} |")


def quality_bench(n: int, seed: int, nfes, thresholding: bool) -> evaluate.QualityTable:
    den = load_teacher("digits-gmm")
    options = {} if thresholding else {"dpmpp": {"dynamic_thresholding": False}, "unipc": {"dynamic_thresholding": False}}
    names = list(evaluate.BASE_SOLVERS) if thresholding else ["dpmpp", "unipc"]
    return evaluate.quality_table(den, names, nfes, n, seed, options=options)


def quality_markdown(table: evaluate.QualityTable) -> str:
    nfes = sorted({r.nfe for r in table.rows})
    solvers_ = list(dict.fromkeys(r.solver for r in table.rows))
    by = {(r.solver, r.nfe): r for r in table.rows}
    head = "| solver | schedule | " + " | ".join(f"NFE {v} FD / RMSE" for v in nfes) + " |"
    lines = [head, "|---|---|" + "---:|" * len(nfes)]
    for s in solvers_:
        cells = [f"{by[s, v].fd:.3f} / {by[s, v].rmse:.4f}" + (" (AFS)" if by[s, v].afs else "") for v in nfes]
        lines.append(f"| {s} | {by[s, nfes[0]].schedule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--shape", default="3,32,32")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--n", type=int, default=4096, help="samples per quality-table cell")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: stable timings on a shared machine; 0: leave torch's default)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    cpu = platform.processor() or platform.machine()
    print(f"machine: {platform.node()} {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}"
          + (f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    result = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": str(device)}}
    if not args.skip_overhead:
        result["overhead"] = []
        for batch in (int(b) for b in args.batch.split(",")):
            rows = overhead_bench(device, batch, shape, args.steps, args.repeats)
            print_overhead(rows, device, batch, shape, args.steps)
            result["overhead"] += [{"batch": batch, **r} for r in rows]
    if not args.skip_quality:
        for thresholding in (True, False):
            t0 = time.perf_counter()
            table = quality_bench(args.n, args.seed, [3, 5, 7, 9], thresholding)
            label = "reference defaults (dpmpp/unipc with dynamic thresholding)" if thresholding else \
                "dpmpp/unipc without dynamic thresholding"
            print(f"\n## Quality on digits-gmm, {label}: FD to exact samples / RMSE to near-exact solution "
                  f"(n={args.n}, seed={args.seed}, {time.perf_counter() - t0:.0f} s)")
            print(quality_markdown(table))
            print(f"\nFD floor (two exact sample sets of n={args.n}): {table.fd_floor:.4f}; RMSE on {table.rmse_samples} "
                  f"samples vs {table.reference}")
            result[f"quality_thresholding_{thresholding}"] = table.to_dict()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

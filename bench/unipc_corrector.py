"""What UniPC's warm-up final corrector changes (reference default vs ``warmup_final_corrector=False``).

On grids with N <= max_order points the diff-solvers reference corrects the final step too (one more
NFE whose model output is never reused). This prints, on the exact ``digits-gmm`` mixture (FD of n samples
to the mixture's exact moments, RMSE to a near-exact solution from the same noise), UniPC-3 (bh2, logSNR,
data prediction, thresholding off and on) on N = 2, 3, 4 with the corrector on and off, so the two can be
compared at equal grid and at equal NFE.

    .venv/bin/python bench/unipc_corrector.py [--n 4096] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from amed_core import methods, metrics, schedules
from amed_core.adapters import load_teacher


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    gmm = load_teacher("digits-gmm")
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((args.n, *gmm.shape), generator=g, dtype=torch.float64)
    ref_grid = schedules.get_schedule(500, gmm.sigma_min, gmm.sigma_max, schedule_type="logsnr")
    with torch.no_grad():
        ref = methods.solve("dpmpp", gmm, noise * ref_grid[0], ref_grid, max_order=3, dynamic_thresholding=False).x
    print(f"digits-gmm, {args.n} samples, seed {args.seed}; FD to the exact moments, RMSE to a 500-point DPM-Solver++ solution")
    print(f"{'N':>2} {'thresholding':>12} {'corrector':>9} {'NFE':>3} {'FD':>10} {'RMSE':>8}")
    for thr in (False, True):
        for n in (2, 3, 4):
            t = schedules.get_schedule(n, gmm.sigma_min, gmm.sigma_max, schedule_type="logsnr")
            for corr in (True, False):
                with torch.no_grad():
                    res = methods.solve("unipc", gmm, noise * t[0], t, dynamic_thresholding=thr, warmup_final_corrector=corr)
                fd = metrics.fd_exact_gmm(res.x, gmm)
                print(f"{n:>2} {str(thr):>12} {'on' if corr else 'off':>9} {res.nfe:>3} {fd:>10.4g} {metrics.rmse(res.x, ref):>8.4g}")


if __name__ == "__main__":
    main()

"""`amed fid-ref`: FID reference statistics (mu, sigma .npz) of an image folder or zip."""

from __future__ import annotations

import argparse
import logging

from flows.commands.fid import add_inception_args, image_stats

log = logging.getLogger("amed.registry")

__all__ = ["register", "run"]


def register(subparsers) -> None:
    q = subparsers.add_parser(
        "fid-ref", help="FID reference statistics (mu, sigma .npz) of an image folder or zip",
        description="Inception-v3 pool-feature statistics as EDM's `fid.py ref` computes them. The Inception "
                    "weights are never downloaded: pass a local path or fsspec URL of "
                    "pt_inception-2015-12-05-6726825d.pth (or a .safetensors copy).")
    add_inception_args(q)
    q.add_argument("--out", required=True, help="output .npz (mu, sigma in float64)")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from amed_core.fid import save_stats

    t0 = time.perf_counter()
    stats = image_stats(args)
    save_stats(args.out, stats.mu, stats.sigma)
    log.info("fid-ref: %d images, %.1f images/s -> %s", stats.n, stats.n / (time.perf_counter() - t0), args.out)
    print(args.out)
    return 0

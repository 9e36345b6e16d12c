"""`amed fid`: FID of an image folder/zip against reference statistics; :func:`add_inception_args` and
:func:`image_stats`, the options and the work it shares with `amed fid-ref` (:mod:`flows.commands.fid_ref`)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("amed.registry")

__all__ = ["register", "run", "add_inception_args", "image_stats"]


def add_inception_args(p) -> None:
    """The options `amed fid-ref` and `amed fid` share: the images and how their Inception features are computed."""
    p.add_argument("--images", required=True, help="folder (recursive) or .zip of PNG/JPEG images")
    p.add_argument("--weights", required=True, help="Inception weights: path or fsspec URL (.pth state dict or .safetensors)")
    p.add_argument("--batch", type=int, default=64, help="images per Inception batch (does not change the result)")
    p.add_argument("--resize", choices=["tf1", "pytorch-fid"], default="tf1",
                   help="tf1 = EDM/StyleGAN3/torch-fidelity/TTUR (standard); pytorch-fid = its own interpolation")
    p.add_argument("--device", default="cpu")


def image_stats(args: argparse.Namespace):
    """Inception statistics (``amed_core.fid.FIDStats``) of ``args.images`` as :func:`add_inception_args` describes."""
    from amed_core.fid import iter_images, load_inception, stats_from_images
    from flows.storage.urls import read_url

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    net = load_inception(read_url(args.weights, "--weights"), resize=args.resize, device=args.device)
    return stats_from_images(net, iter_images(args.images), batch_size=args.batch, progress=True)


def register(subparsers) -> None:
    r = subparsers.add_parser(
        "fid", help="FID of an image folder/zip against reference statistics (.npz path or URL)",
        description="FID of the images against reference statistics (e.g. EDM's fid-refs .npz, or `amed fid-ref` "
                    "output), with the same Inception features as `amed fid-ref`. Nothing is downloaded unless "
                    "--ref / --weights are URLs you give.")
    add_inception_args(r)
    r.add_argument("--ref", required=True, help="reference statistics: .npz with mu, sigma (path or fsspec URL)")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from amed_core.fid import load_reference_stats
    from flows.storage.urls import read_url

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    mu_ref, sigma_ref = load_reference_stats(read_url(args.ref, "--ref"))
    stats = image_stats(args)
    value = stats.fid(mu_ref, sigma_ref)
    log.info("fid: %d images against %s", stats.n, args.ref)
    print(f"{value:.6g}")
    return 0

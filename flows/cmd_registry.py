"""`amed fetch` (a registered sampler -> a local checkpoint folder), `amed promote` (move an alias by hand),
`amed fid-ref` (FID reference statistics from an image folder or zip) and `amed fid`."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("amed.registry")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch", help="download a registered sampler (models:/NAME@champion) into a checkpoint folder",
        description="Download predictor.safetensors + sampler.json of a registered AMED sampler. "
                    "The tracking server comes from --tracking-uri, else $MLFLOW_TRACKING_URI, else the "
                    "quickstart's sqlite:///amed-runs/quickstart/mlflow.db when it exists in this folder.")
    p.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id>, or a folder / fsspec URL")
    p.add_argument("--out", required=True, help="destination folder (created; files written atomically)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: see above)")
    p.set_defaults(func=_fetch)

    s = subparsers.add_parser(
        "promote", help="point an alias (default: champion) at models:/NAME/VERSION",
        description="Move an alias of a registered model to a version, whatever it held. Sweeps move 'champion' "
                    "and 'best-<solver>' only to a strictly better version measured under the same evaluation "
                    "protocol; after changing the protocol (metric, samples, seed, reference), promote a version "
                    "measured under the new one and later sweeps compare against it.")
    s.add_argument("uri", help="models:/NAME/VERSION")
    s.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    s.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as for fetch)")
    s.set_defaults(func=_promote)

    q = subparsers.add_parser(
        "fid-ref", help="FID reference statistics (mu, sigma .npz) of an image folder or zip",
        description="Inception-v3 pool-feature statistics as EDM's `fid.py ref` computes them. The Inception "
                    "weights are never downloaded: pass a local path or fsspec URL of "
                    "pt_inception-2015-12-05-6726825d.pth (or a .safetensors copy).")
    _inception_args(q)
    q.add_argument("--out", required=True, help="output .npz (mu, sigma in float64)")
    q.set_defaults(func=_fid_ref)

    r = subparsers.add_parser(
        "fid", help="FID of an image folder/zip against reference statistics (.npz path or URL)",
        description="FID of the images against reference statistics (e.g. EDM's fid-refs .npz, or `amed fid-ref` "
                    "output), with the same Inception features as `amed fid-ref`. Nothing is downloaded unless "
                    "--ref / --weights are URLs you give.")
    _inception_args(r)
    r.add_argument("--ref", required=True, help="reference statistics: .npz with mu, sigma (path or fsspec URL)")
    r.set_defaults(func=_fid)


def _inception_args(p) -> None:
    """The options `amed fid-ref` and `amed fid` share: the images and how their Inception features are computed."""
    p.add_argument("--images", required=True, help="folder (recursive) or .zip of PNG/JPEG images")
    p.add_argument("--weights", required=True, help="Inception weights: path or fsspec URL (.pth state dict or .safetensors)")
    p.add_argument("--batch", type=int, default=64, help="images per Inception batch (does not change the result)")
    p.add_argument("--resize", choices=["tf1", "pytorch-fid"], default="tf1",
                   help="tf1 = EDM/StyleGAN3/torch-fidelity/TTUR (standard); pytorch-fid = its own interpolation")
    p.add_argument("--device", default="cpu")


def _fetch(args: argparse.Namespace) -> int:
    from flows.registry import fetch

    out = fetch(args.uri, args.out, tracking_uri=args.tracking_uri)
    print(out)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from flows.registry import promote

    r = promote(args.uri, args.alias, tracking_uri=args.tracking_uri)
    was = f"v{r['previous']}" if r["previous"] else "unset"
    print(f"models:/{r['name']}@{r['alias']} -> version {r['version']} (was {was})")
    return 0


def _read_bytes(url: str, what: str = "--weights") -> bytes:
    """Bytes of a local path or fsspec URL (weights and statistics are the user's own copies)."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what}: nothing at {url!r}; give the path or URL of your copy") from None


def _fid_ref(args: argparse.Namespace) -> int:
    import time

    from amed_core.fid import iter_images, load_inception, save_stats, stats_from_images

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    net = load_inception(_read_bytes(args.weights), resize=args.resize, device=args.device)
    t0 = time.perf_counter()
    stats = stats_from_images(net, iter_images(args.images), batch_size=args.batch, progress=True)
    save_stats(args.out, stats.mu, stats.sigma)
    log.info("fid-ref: %d images, %.1f images/s -> %s", stats.n, stats.n / (time.perf_counter() - t0), args.out)
    print(args.out)
    return 0


def _fid(args: argparse.Namespace) -> int:
    from amed_core.fid import iter_images, load_inception, load_reference_stats, stats_from_images

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    mu_ref, sigma_ref = load_reference_stats(_read_bytes(args.ref, "--ref"))
    net = load_inception(_read_bytes(args.weights), resize=args.resize, device=args.device)
    stats = stats_from_images(net, iter_images(args.images), batch_size=args.batch, progress=True)
    value = stats.fid(mu_ref, sigma_ref)
    log.info("fid: %d images against %s", stats.n, args.ref)
    print(f"{value:.6g}")
    return 0

"""`amed fetch`: a registered sampler (or a folder / fsspec URL) -> a local checkpoint folder."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch", help="download a registered sampler (models:/NAME@champion) into a checkpoint folder",
        description="Download predictor.safetensors + sampler.json of a registered AMED sampler. "
                    "The tracking server comes from --tracking-uri, else $MLFLOW_TRACKING_URI, else the "
                    "quickstart's sqlite:///amed-runs/quickstart/mlflow.db when it exists in this folder.")
    p.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, models:/m-<id>, or a folder / fsspec URL")
    p.add_argument("--out", required=True, help="destination folder: new or empty (the checkpoint is verified in a temporary folder, then moved there)")
    p.add_argument("--force", action="store_true",
                   help="replace the checkpoint files in a non-empty --out (default: refuse a non-empty folder)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: see above)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flows.registry.loading import describe, fetch, summary_lines

    out = Path(fetch(args.uri, args.out, tracking_uri=args.tracking_uri, force=args.force))
    # what was fetched: model, version, alias, method, NFE, metric value, teacher identity
    files = {"sampler.json": (out / "sampler.json").read_bytes()}
    for line in summary_lines(describe(args.uri, files, tracking_uri=args.tracking_uri), out):
        print(line)
    return 0

"""`amed export`: a pure-schedule sampler (free, GITS) as the sigma list diffusers, k-diffusion or ComfyUI take."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a schedule-only sampler (free, GITS) for diffusers / k-diffusion / a sigmas.json",
        description="Write a pure-schedule sampler's time points with what runs on them: --to sigmas.json (the points, "
                    "solver, AFS, options), --to k-diffusion (+ the k-diffusion sampler that computes the same), --to "
                    "diffusers (+ the scheduler class and its sigmas= keyword). Samplers with learned per-step parts "
                    "(AMED, EPD; GS unless --grid-only) are refused: run them with amed_core.integrations.sample_with / to_k_diffusion.")
    p.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a checkpoint folder / fsspec URL")
    p.add_argument("--to", required=True, choices=("diffusers", "k-diffusion", "sigmas.json"), help="the target")
    p.add_argument("--grid-only", action="store_true",
                   help="GS: export only its learned time grid, run by its base solver DPM-Solver++(3M): an "
                        "approximation (GS's learned model times and coefficients are left out; the JSON says so)")
    p.add_argument("--out", default=None, help="write the JSON here (atomically; default: print it)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as `amed fetch`)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from amed_core.integrations import export_json, export_schedule
    from amed_core.io import atomic_write_bytes
    from flows.registry.loading import load_sampler

    sampler = load_sampler(args.uri, tracking_uri=args.tracking_uri)
    doc = export_schedule(sampler, args.to, source=str(args.uri), grid_only=args.grid_only)
    text = export_json(doc)
    if args.out is None:
        print(text, end="")
    else:
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'schedule.json'}")
        atomic_write_bytes(out, text.encode())
        print(f"wrote {out} ({args.to}: {doc['method']} NFE {doc['nfe']}, {len(doc['sigmas'])} time points)")
    return 0

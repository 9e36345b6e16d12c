"""`amed convert`: an NVlabs EDM pickle -> safetensors + JSON, once.

Thin CLI glue: the work is ``amed_core.adapters.edm.convert_edm_pickle``.
"""

from __future__ import annotations

import json


def run(args) -> int:
    from amed_core.adapters.edm import convert_edm_pickle, load_network

    out = convert_edm_pickle(
        args.path, args.out, trust_pickle=args.trust_pickle, edm_code_dir=args.edm_code_dir, key=args.key,
        nvlabs_module=args.nvlabs_module, sigma_min=args.sigma_min, sigma_max=args.sigma_max, check=not args.no_check,
    )
    ident = load_network(out, edm_code_dir=args.edm_code_dir).identity()
    print(json.dumps({"out": str(out), "teacher": f"edm-safetensors:{out}", **ident}, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an NVlabs EDM pickle once into config.json + model.safetensors (no pickle afterwards)",
        description="Unpickles an NVlabs EDM checkpoint (only with --trust-pickle; it needs your EDM checkout via "
                    "--edm-code-dir or PYTHONPATH), writes the raw network as safetensors plus a JSON config, reloads "
                    "it and checks both agree. Load the result with teacher 'edm-safetensors:DIR'.")
    p.add_argument("--from", dest="source", choices=["edm-pickle"], required=True, help="input format")
    p.add_argument("path", help="the .pkl file (e.g. edm-cifar10-32x32-uncond-vp.pkl)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling (runs code from the file)")
    p.add_argument("--edm-code-dir", default=None, help="your clone of NVlabs/edm (torch_utils, dnnlib, training)")
    p.add_argument("--key", default="ema", help="entry of the pickled dict holding the network (default: ema)")
    p.add_argument("--nvlabs-module", default="training.networks", help="module defining SongUNet/DhariwalUNet")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--no-check", action="store_true", help="skip comparing the converted network with the pickle")
    p.set_defaults(func=run)


__all__ = ["register", "run"]

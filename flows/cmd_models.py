"""`amed convert` (EDM pickle -> safetensors + JSON, once) and `amed teacher train-tiny` (the tiny digits UNet).

Thin CLI glue: the work is ``amed_core.adapters.edm.convert_edm_pickle`` and ``amed_core.tiny_unet.train_tiny``.
"""

from __future__ import annotations

import argparse
import json


def cmd_convert(args) -> int:
    from amed_core.adapters.edm import convert_edm_pickle, load_network

    out = convert_edm_pickle(
        args.path, args.out, trust_pickle=args.trust_pickle, edm_code_dir=args.edm_code_dir, key=args.key,
        nvlabs_module=args.nvlabs_module, sigma_min=args.sigma_min, sigma_max=args.sigma_max, check=not args.no_check,
    )
    ident = load_network(out, edm_code_dir=args.edm_code_dir).identity()
    print(json.dumps({"out": str(out), "teacher": f"edm-safetensors:{out}", **ident}, indent=2))
    return 0


def cmd_train_tiny(args) -> int:
    import torch

    from amed_core.tiny_unet import TinyUNetConfig, TrainTinyConfig, train_tiny

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    unet = TinyUNetConfig(img_resolution=args.resolution, model_channels=args.channels, channel_mult=(1, 2),
                          label_dim=10 if args.conditional else 0)
    cfg = TrainTinyConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          conditional=args.conditional, unet=unet)
    den = train_tiny(config=cfg, out=args.out, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "teacher": f"tiny-unet:{args.out}", **den.identity()}, indent=2))
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
    p.set_defaults(func=cmd_convert)


def add_teacher_commands(teacher_subparsers) -> None:
    """`amed teacher train-tiny --out DIR`: train the tiny EDM-preconditioned digits UNet on CPU."""
    p = teacher_subparsers.add_parser(
        "train-tiny", help="train the tiny EDM-preconditioned UNet on scikit-learn's digits (minutes on CPU)",
        description="Writes config.json + model.safetensors to --out; use it as teacher 'tiny-unet:DIR'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--resolution", type=int, choices=[8, 16], default=8, help="8 = the digits' own size; 16 upsamples")
    p.add_argument("--channels", type=int, default=16, help="channels of the first level")
    p.add_argument("--conditional", action="store_true", help="class-conditional on the digit (label_dim 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_tiny)


__all__ = ["register", "add_teacher_commands"]

"""`amed promote models:/NAME/VERSION [--alias]`: move an alias of a registered model by hand."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "promote", help="point an alias (default: champion) at models:/NAME/VERSION",
        description="Move an alias of a registered model to a version, whatever it held. Sweeps move 'champion' "
                    "and 'best-<solver>' only to a strictly better version measured under the same evaluation "
                    "protocol; after changing the protocol (metric, samples, seed, reference), promote a version "
                    "measured under the new one and later sweeps compare against it.")
    s.add_argument("uri", help="models:/NAME/VERSION")
    s.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    s.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as for fetch)")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flows.registry.registration import promote

    r = promote(args.uri, args.alias, tracking_uri=args.tracking_uri)
    was = f"v{r['previous']}" if r["previous"] else "unset"
    print(f"models:/{r['name']}@{r['alias']} -> version {r['version']} (was {was})")
    return 0

"""The `amed` sub-commands, one module per command, each with ``register(subparsers)`` (its parser) and
``run(args)`` (its handler). Heavy libraries (prefect, ray, mlflow) are imported inside the handlers, so
`amed --help` stays fast. :mod:`flows.cli` lists them explicitly."""

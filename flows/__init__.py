"""Orchestration for amed-distill: Prefect flows, Ray glue, fsspec storage, MLflow registry and the `amed` CLI.

No math lives here: every task calls one `amed_core` function.
"""

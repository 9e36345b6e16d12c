"""amed_core: the math of amed-distill in torch (denoisers, schedules, solvers, AMED, metrics, shards).

Pure: imports none of prefect, ray, mlflow, s3fs or fsspec.
"""

__version__ = "0.1.0"

"""Reading a sampler checkpoint wherever it lives: a local folder, an fsspec URL (``s3://...``) or the registry
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/m-<id>``). Nothing is unpickled: a checkpoint is
safetensors + JSON."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from amed_core.io import atomic_write_bytes
from flows.registry.tracking import resolve_tracking_uri, tracking

__all__ = ["CHECKPOINT_FILES", "read_checkpoint", "write_files", "is_models_uri", "model_files", "checkpoint_bytes",
           "load_sampler", "fetch"]

CHECKPOINT_FILES = ("predictor.safetensors", "sampler.json")


def read_checkpoint(url: str, storage_options: Optional[dict] = None) -> dict[str, bytes]:
    """{"predictor.safetensors": ..., "sampler.json": ...} from a folder path or fsspec URL."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    files = {}
    for name in CHECKPOINT_FILES:
        path = f"{root.rstrip('/')}/{name}"
        try:
            files[name] = fs.cat_file(path)
        except FileNotFoundError:
            raise ValueError(f"{url!r} is not an AMED checkpoint: {name} is missing (it needs {', '.join(CHECKPOINT_FILES)})") from None
    return files


def write_files(out: Path, files: dict[str, bytes]) -> Path:
    """Write each file atomically (weights first, spec last: a folder with sampler.json is complete)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == "sampler.json"):
        atomic_write_bytes(out / name, files[name])
    return out


def is_models_uri(uri: str) -> bool:
    return str(uri).startswith("models:/")


def model_files(uri: str, tracking_uri: Optional[str]) -> dict[str, bytes]:
    """Checkpoint bytes of a registered / logged model (``models:/...``)."""
    import mlflow

    from mlflow.exceptions import MlflowException

    tracking_uri = resolve_tracking_uri(tracking_uri)
    with tracking(tracking_uri), tempfile.TemporaryDirectory(prefix="amed-fetch-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        except MlflowException as e:
            raise ValueError(f"cannot resolve {uri!r} on {tracking_uri}: {e.message}") from None
        found = {p.name: p for p in local.rglob("*") if p.name in CHECKPOINT_FILES}
        missing = set(CHECKPOINT_FILES) - set(found)
        if missing:
            raise ValueError(f"{uri!r} holds no AMED checkpoint ({sorted(missing)} missing)")
        return {name: p.read_bytes() for name, p in found.items()}


def checkpoint_bytes(uri: str, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None) -> dict[str, bytes]:
    """Checkpoint bytes from a folder, an fsspec URL or ``models:/...``."""
    if is_models_uri(uri):
        return model_files(uri, tracking_uri)
    return read_checkpoint(uri, storage_options)


def load_sampler(uri, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None):
    """An ``amed_core`` Sampler from a local folder, an fsspec URL or a registry URI (``models:/NAME@champion``).

    Nothing is unpickled: the checkpoint is safetensors + JSON wherever it lives."""
    from amed_core.amed import load_sampler as load_local
    from amed_core.amed import sampler_from_files

    uri = str(uri)
    if not is_models_uri(uri) and "://" not in uri:
        return load_local(uri)
    return sampler_from_files(checkpoint_bytes(uri, tracking_uri=tracking_uri, storage_options=storage_options))


def fetch(uri: str, out, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None) -> Path:
    """Copy a sampler (``models:/...``, folder or URL) into the checkpoint folder ``out``; verify it loads."""
    from amed_core.amed import load_sampler as load_local

    files = checkpoint_bytes(str(uri), tracking_uri=tracking_uri, storage_options=storage_options)
    out = write_files(Path(out), files)
    load_local(out)  # the copy is a valid checkpoint
    return out


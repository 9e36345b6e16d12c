"""Reading a sampler checkpoint wherever it lives: a local folder, an fsspec URL (``s3://...``) or the registry
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``models:/m-<id>``). Nothing is unpickled: a checkpoint is
safetensors + JSON."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from amed_core.io import atomic_write_bytes
from flows.registry.tracking import check_registry, resolve_tracking_uri, tracking

__all__ = ["CHECKPOINT_FILES", "read_checkpoint", "write_files", "is_models_uri", "model_files", "checkpoint_bytes",
           "load_sampler", "fetch", "describe", "summary_lines", "local_artifacts", "relocated_artifacts"]

CHECKPOINT_FILES = ("predictor.safetensors", "sampler.json")


def read_checkpoint(url: str, storage_options: Optional[dict] = None) -> dict[str, bytes]:
    """{"predictor.safetensors": ..., "sampler.json": ...} from a folder path or fsspec URL; the files of the family
    ``sampler.json`` names (``amed_core.families``: free / gits have sampler.json only, epd its tables). Each is read
    with :func:`flows.storage.reads.read_object` (regular files only, the size limit of its name checked first)."""
    import fsspec

    from amed_core.bounds import checkpoint_limit
    from amed_core.families import checkpoint_kind, checkpoint_names
    from flows.storage.reads import read_object

    fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    files = {}
    try:
        spec = read_object(fs, f"{root.rstrip('/')}/sampler.json", checkpoint_limit("sampler.json"), what="sampler.json")
    except FileNotFoundError:
        raise ValueError(f"{url!r} is not a sampler checkpoint: sampler.json is missing") from None
    names = checkpoint_names(checkpoint_kind(spec))
    for name in names:
        path = f"{root.rstrip('/')}/{name}"
        try:
            files[name] = spec if name == "sampler.json" else read_object(fs, path, checkpoint_limit(name), what=name)
        except FileNotFoundError:
            raise ValueError(f"{url!r} is not an AMED checkpoint: {name} is missing (it needs {', '.join(names)})") from None
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
    check_registry(tracking_uri)  # an unknown scheme or a dead server: one line now, not minutes of retries
    with tracking(tracking_uri), tempfile.TemporaryDirectory(prefix="amed-fetch-") as tmp:
        # Local artifacts (a SQLite run folder, moved or not) are read where they are, with limits: MLflow's copy
        # would follow a symlink to /dev/zero without end. Other stores are downloaded, then read with limits.
        local = local_artifacts(uri, tracking_uri)
        try:
            if local is None:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        except MlflowException as e:
            raise ValueError(f"cannot resolve {uri!r} on {tracking_uri}: {e.message}") from None
        return _checkpoint_in(local, uri)


def _checkpoint_in(folder: Path, uri: str) -> dict[str, bytes]:
    """The checkpoint files under an artifact folder (found without following symlinked folders), read with limits."""
    import os

    from amed_core.bounds import checkpoint_limit
    from amed_core.families import checkpoint_kind, checkpoint_names
    from amed_core.io import read_limited

    paths: dict[str, Path] = {}
    for top, dirs, names in os.walk(folder):  # followlinks=False: a link to / is not walked
        dirs.sort()
        for n in sorted(names):
            paths.setdefault(n, Path(top, n))
    if "sampler.json" in paths:
        spec = read_limited(paths["sampler.json"], checkpoint_limit("sampler.json"), what="sampler.json")
        names = checkpoint_names(checkpoint_kind(spec))
    else:
        names = CHECKPOINT_FILES
    missing = set(names) - set(paths)
    if missing:
        raise ValueError(f"{uri!r} holds no AMED checkpoint ({sorted(missing)} missing)")
    return {name: read_limited(paths[name], checkpoint_limit(name), what=name) for name in names}


def checkpoint_bytes(uri: str, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None) -> dict[str, bytes]:
    """Checkpoint bytes from a folder, an fsspec URL or ``models:/...``."""
    if is_models_uri(uri):
        return model_files(uri, tracking_uri)
    try:
        return read_checkpoint(uri, storage_options)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - a store that cannot be reached: one line, not a botocore traceback
        from flows.storage.credentials import redact

        text = redact(" ".join(str(e).split())[:200])
        raise ValueError(f"cannot read the checkpoint at {redact(uri)!r} ({type(e).__name__}: {text}); check the URL, "
                         "AWS_ENDPOINT_URL and that the store is up") from None


def load_sampler(uri, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None):
    """An ``amed_core`` Sampler from a local folder, an fsspec URL or a registry URI (``models:/NAME@champion``).

    Nothing is unpickled: the checkpoint is safetensors + JSON wherever it lives. Any family (sampler.json's kind:
    free, gits, amed, epd; ``amed_core.families``)."""
    from amed_core.families import load_sampler as load_local
    from amed_core.families import sampler_from_files

    uri = str(uri)
    if not is_models_uri(uri) and "://" not in uri:
        return load_local(uri)
    return sampler_from_files(checkpoint_bytes(uri, tracking_uri=tracking_uri, storage_options=storage_options))


def fetch(uri: str, out, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None,
          force: bool = False) -> Path:
    """Copy a sampler (``models:/...``, folder or URL) into the checkpoint folder ``out``; verify it loads.

    The files are written into a temporary folder next to ``out`` and loaded there first; only a checkpoint that
    loads is moved into place (a broken source never replaces a good copy). ``out`` must be new or empty unless
    ``force`` (then its checkpoint files are replaced, sampler.json last)."""
    import os
    import shutil

    from amed_core.families import load_sampler as load_local

    out = Path(out)
    if out.is_symlink() and out.is_dir():  # a link to a folder: fill the folder, keep the link
        out = Path(os.path.realpath(out))
    _check_out(out, force)
    from flows.storage.preflight import check_folder

    check_folder(out.absolute().parent, 1 << 20, "--out's folder")  # writable, before the download
    files = checkpoint_bytes(str(uri), tracking_uri=tracking_uri, storage_options=storage_options)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.absolute().name}.fetch-", dir=out.absolute().parent))
    try:
        write_files(tmp, files)
        try:
            load_local(tmp)  # the copy is a valid checkpoint, before anything at ``out`` changes
        except ValueError as e:
            raise ValueError(f"{uri!r} is not a loadable AMED checkpoint ({e}); nothing was written to {out}") from None
        _check_out(out, force)  # again: another fetch may have filled it meanwhile
        if out.is_dir() and force:
            for name in sorted(files, key=lambda n: n == "sampler.json"):
                os.replace(tmp / name, out / name)
        else:
            try:
                os.rename(tmp, out)  # atomic; replaces an empty folder
            except OSError as e:
                raise ValueError(f"--out {out}: {e.strerror} (did another fetch write there?); choose a new folder "
                                 "or pass --force") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; give a new or empty folder")
    if out.is_dir() and not force:
        present = sorted(p.name for p in out.iterdir())
        if present:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise ValueError(f"--out {out} is not empty ({shown}); give a new or empty folder, or pass --force to "
                             "replace the checkpoint files there")



def describe(uri: str, files: dict[str, bytes], *, tracking_uri: Optional[str] = None) -> dict:
    """What a checkpoint is: method, NFE, teacher identity (from sampler.json) and, for ``models:/...``, the
    registered model, version, aliases, metric and value (version tags). Registry lookups that fail leave fields out."""
    import json
    import re

    spec = json.loads(files["sampler.json"])
    spec = spec.get("spec", spec) if isinstance(spec, dict) else {}
    out: dict = {"source": str(uri), "method": spec.get("method") or spec.get("solver"), "nfe": spec.get("nfe"),
                 "num_steps": spec.get("num_steps"), "teacher": spec.get("teacher") or spec.get("teacher_identity")}
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", str(uri).strip())
    if not m:
        return out
    name, alias, version = m.groups()
    try:
        with tracking(resolve_tracking_uri(tracking_uri)) as client:
            mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
            aliases = list(getattr(mv, "aliases", None) or [])
            tags = dict(mv.tags or {})
    except Exception:  # noqa: BLE001 - the files are what matters; the summary shows what it could read
        return {**out, "model": name, "alias": alias, "version": version}
    value = tags.get("value")
    out.update(model=name, version=str(mv.version), alias=alias or None, aliases=aliases, metric=tags.get("metric"),
               value=float(value) if value not in (None, "") else None,
               base_value=float(tags["base_value"]) if tags.get("base_value") else None,
               base_solver=tags.get("base_solver"), seed=tags.get("seed"), family=tags.get("family"))
    # the baselines by their one name with options (amed_core.evaluate.baseline_name): the base solver at the same
    # NFE and the panel's best training-free sampler (what the champion had to beat: the margin is value / panel)
    from flows.registry.story import baseline_label

    if tags.get("base_solver"):
        out["base_name"] = baseline_label(tags["base_solver"], tags.get("base_options"))
    if tags.get("baseline_solver"):
        out.update(panel_name=baseline_label(tags["baseline_solver"], tags.get("baseline_options")),
                   panel_value=float(tags["baseline_value"]) if tags.get("baseline_value") else None,
                   margin=float(tags["margin"]) if tags.get("margin") else None)
    if alias == "champion" or "champion" in aliases:  # why it won (flows/registry/story.py), as on the model page
        from flows.registry.story import champion_sentence

        out["story"] = champion_sentence(tags, str(mv.version))
    return out


def summary_lines(info: dict, out_dir) -> list[str]:
    """``amed fetch``'s printed summary of :func:`describe`."""
    lines = []
    if info.get("model"):
        al = ", ".join(info.get("aliases") or []) or "none"
        lines.append(f"model    {info['model']} version {info.get('version')} (fetched as "
                     f"{'@' + info['alias'] if info.get('alias') else 'v' + str(info.get('version'))}; aliases: {al})")
    else:
        lines.append(f"source   {info['source']}")
    lines.append(f"method   {info.get('method')}  NFE {info.get('nfe')}  ({info.get('num_steps')} time points)")
    if info.get("value") is not None:
        lines.append(f"metric   {info.get('metric')} {info['value']:.4g} (lower is better)")
        if info.get("panel_value") is not None:  # why it won: the best training-free sampler it was compared with
            margin = f"; margin {info['margin']:.3g} = value / panel" if info.get("margin") is not None else ""
            lines.append(f"panel    best training-free {info.get('panel_name')} {info['panel_value']:.4g}{margin}")
        if info.get("base_value") is not None:
            lines.append(f"base     {info.get('base_name') or info.get('base_solver')} {info['base_value']:.4g} "
                         "(the base solver at the same NFE)")
    if info.get("story"):
        lines.append(f"why      {info['story']}")
    teacher = info.get("teacher")
    if isinstance(teacher, dict):
        digest = teacher.get("content_sha256") or teacher.get("sha256") or ""
        teacher = (f"{teacher.get('name', '?')} (adapter {teacher.get('adapter', '?')}"
                   + (f", sha256 {digest[:16]}" if digest else "") + ")") if "name" in teacher else json_short(teacher)
    lines.append(f"teacher  {teacher or 'unknown'}")
    lines.append(f"written  {out_dir}")
    return lines


def json_short(d, n: int = 160) -> str:
    import json

    text = json.dumps(d, sort_keys=True)
    return text if len(text) <= n else text[: n - 3] + "..."


def local_artifacts(uri: str, tracking_uri: str) -> Optional[Path]:
    """The local folder a ``models:/`` URI's artifacts are in, for a SQLite registry whose artifacts are files (where
    MLflow recorded them, else :func:`relocated_artifacts`); None for servers and remote artifact stores."""
    path = _recorded_local_path(uri, tracking_uri)
    if path is None:
        return None
    return path if path.is_dir() else relocated_artifacts(uri, tracking_uri)


def _recorded_local_path(uri: str, tracking_uri: str) -> Optional[Path]:
    """The local path a SQLite registry recorded for a ``models:/`` URI's artifacts (None: not SQLite, not a file
    URI, or the registry cannot say)."""
    from urllib.parse import unquote, urlparse

    if not str(tracking_uri).startswith("sqlite:///"):
        return None
    src = _artifact_source(uri, tracking_uri)
    if src is None:
        return None
    parsed = urlparse(src)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def _artifact_source(uri: str, tracking_uri: str) -> Optional[str]:
    """Where the registry recorded a ``models:/`` URI's artifacts (None when it cannot say)."""
    import re

    from mlflow.exceptions import MlflowException

    with tracking(tracking_uri) as client:
        try:
            m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", str(uri).strip())
            if m and not m.group(1).startswith("m-"):
                name, alias, version = m.groups()
                version = client.get_model_version_by_alias(name, alias).version if alias else version
                return client.get_model_version_download_uri(name, version)
            if str(uri).startswith("models:/m-"):
                return client.get_logged_model(str(uri)[len("models:/"):].strip("/")).artifact_location
        except MlflowException:
            return None  # the normal download reports it
    return None


def relocated_artifacts(uri: str, tracking_uri: str) -> Optional[Path]:
    """For a local (SQLite) registry whose run folder was moved or copied: the model's artifact folder found under
    the database's folder (``<db folder>/mlartifacts/...``), when the absolute location MLflow recorded is gone.
    None when nothing moved, the registry is a server, or the folder is not there either."""
    recorded = _recorded_local_path(uri, tracking_uri)
    if recorded is None:
        return None
    db_dir = Path(tracking_uri[len("sqlite:///"):]).parent
    path = str(recorded)
    if Path(path).exists() or "/mlartifacts/" not in path:
        return None
    moved = db_dir / path[path.rindex("/mlartifacts/") + 1:]
    return moved if moved.is_dir() else None

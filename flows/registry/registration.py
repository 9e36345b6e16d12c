"""The model registry: a candidate logged as a pyfunc from code (``flows/mlflow_model.py``; checked to reproduce its
checkpoint's samples before it is registered), a version per candidate, and the aliases ``champion`` /
``best-<solver>``, which move only to a strictly lower value under the same protocol hash (or by hand: :func:`promote`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
import time
import warnings
from pathlib import Path
from typing import Optional

from flows.registry.tracking import resolve_tracking_uri, tracking
from flows.results import CandidateResult

log = logging.getLogger("flows.registry")

__all__ = ["CHAMPION", "MODEL_CODE", "solver_alias", "champion_uri", "log_model", "move_alias", "mark_champion", "promote",
           "register_version", "register_candidate", "ensure_model", "find_version", "model_lock", "LOCK_SUFFIX"]

MODEL_CODE = Path(__file__).resolve().parent.parent / "mlflow_model.py"
CHAMPION = "champion"


def solver_alias(solver: str) -> str:
    """Per-solver alias: ``amed+ipndm`` -> ``best-amed-ipndm``."""
    return "best-" + re.sub(r"[^A-Za-z0-9_-]", "-", solver)


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def log_model(mlflow, ckpt_dir: Path, ds, expected, seeds: list[int]):
    """Log the candidate as a pyfunc from code (``flows/mlflow_model.py``) in the active run; its signature from the
    reference samples ``expected`` (one row per seed). The caller then checks that the logged model reproduces them
    (:func:`flows.registry.checks.reproduces`) before registering it."""
    import pandas as pd

    from mlflow.models import infer_signature

    example = pd.DataFrame({"seed": seeds})
    with warnings.catch_warnings():  # advisory hints (integer schema, type hints, input_example) only
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, expected, params={"dtype": "float64"})
        return _log_pyfunc(mlflow, ckpt_dir, ds, signature)


def _log_pyfunc(mlflow, ckpt_dir: Path, ds, signature):
    return mlflow.pyfunc.log_model(
        name="sampler",
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(ckpt_dir)},
        model_config={"teacher": ds.teacher, "teacher_options": ds.load_kwargs()},
        signature=signature,
        pip_requirements=_pip_requirements(),
    )


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("amed-distill", "torch", "numpy", "safetensors", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def move_alias(client, name: str, alias: str, version: str, value: float, protocol_hash: str) -> bool:
    """Move ``alias`` to ``version`` iff there is none yet, or the current holder was measured under the
    same protocol and ``value`` is strictly lower. Returns whether it moved."""
    from mlflow.exceptions import MlflowException

    if not math.isfinite(value):
        return False
    try:
        cur = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        cur = None
    if cur is not None:
        if str(cur.version) == str(version):
            return False
        if cur.tags.get("protocol_hash") != protocol_hash:
            log.warning("%s@%s (v%s) was measured under protocol %s, v%s under %s: not comparable, alias stays "
                        "(move it with `amed promote models:/%s/%s --alias %s`)", name, alias, cur.version,
                        cur.tags.get("protocol_hash"), version, protocol_hash, name, version, alias)
            return False
        try:
            cur_value = float(cur.tags.get("value", "nan"))
        except ValueError:
            cur_value = float("nan")
        if math.isfinite(cur_value) and not value < cur_value:
            return False
    client.set_registered_model_alias(name, alias, str(version))
    try:  # re-read after set: a move outside the lock (`amed promote`) may have raced this one
        now = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        now = None
    if now != str(version):
        log.warning("%s@%s was set to v%s but now names v%s (moved concurrently outside the registration lock)",
                    name, alias, version, now)
        return False
    if alias == CHAMPION:
        mark_champion(client, name, str(version))
    return True


def mark_champion(client, name: str, version: str) -> str:
    """Name the champion on the model itself (tag ``champion`` + the description's first line), since MLflow's Models
    list truncates the alias column. Returns the line, e.g. ``champion: v3 (amed+ipndm, fd_exact 0.01234)``."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
        tags = mv.tags or {}
        try:
            value = f"{float(tags['value']):.4g}"
        except (KeyError, ValueError):
            value = "?"
        line = f"champion: v{version} ({tags.get('solver', '?')}, {tags.get('metric', 'value')} {value})"
        client.set_registered_model_tag(name, CHAMPION, line.removeprefix("champion: "))
        story = _story_lines(client, mv, version)
        model = client.get_registered_model(name)
        rest = [ln for ln in (model.description or "").splitlines()
                if ln.strip() and not ln.startswith(("champion: ", *STORY_PREFIXES))]
        client.update_registered_model(name, description="\n\n".join([line, *story, *rest]))
    except MlflowException as e:  # cosmetic: the alias is what loading reads
        log.warning("could not tag %s with its champion v%s: %s", name, version, e)
        return ""
    return line


STORY_PREFIXES = ("why: ", "![samples: champion")  # description lines mark_champion rewrites


def _story_lines(client, mv, version: str) -> list[str]:
    """The model page's story (flows/registry/story.py): ``why: <sentence>`` (also the version's description) and,
    when the version's run holds it, the side-by-side picture of its samples and the panel best's on the same noise."""
    from mlflow.exceptions import MlflowException

    from flows.registry.story import SIDE_BY_SIDE, champion_sentence, side_by_side_markdown

    sentence = champion_sentence(mv.tags or {}, str(version))
    lines = [f"why: {sentence}"]
    try:
        client.update_model_version(mv.name, str(version), description=sentence)
        folder = SIDE_BY_SIDE.rsplit("/", 1)[0]
        if mv.run_id and any(a.path == SIDE_BY_SIDE for a in client.list_artifacts(mv.run_id, folder)):
            lines.append(side_by_side_markdown(mv.run_id))
    except (MlflowException, OSError) as e:  # cosmetic, like the tag
        log.warning("champion story of %s v%s incomplete: %s", mv.name, version, e)
    return lines


def promote(uri: str, alias: str = CHAMPION, *, tracking_uri: Optional[str] = None) -> dict:
    """Point ``alias`` of a registered model at ``models:/NAME/VERSION``, whatever it held: the explicit step after an
    evaluation protocol changes (sweeps move aliases only between versions measured under one protocol).

    Returns {"name", "alias", "version", "previous"} (previous: the version it held, or None)."""
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", uri.strip())
    if m is None:
        raise ValueError(f"promote needs models:/NAME/VERSION (a version, not an alias), got {uri!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", alias):
        raise ValueError(f"alias must be letters, digits, '.', '_' or '-', got {alias!r}")
    name, version = m.group(1), m.group(2)
    with tracking(resolve_tracking_uri(tracking_uri)) as client:
        try:
            client.get_model_version(name, version)
        except MlflowException as e:
            raise ValueError(f"{uri}: no such registered version ({e.message.splitlines()[0]})") from None
        try:
            previous = str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            previous = None
        client.set_registered_model_alias(name, alias, version)
        if alias == CHAMPION:
            mark_champion(client, name, version)
    log.info("%s@%s -> v%s (was %s)", name, alias, version, f"v{previous}" if previous else "unset")
    return {"name": name, "alias": alias, "version": version, "previous": previous}

def register_version(mlflow, client, cand: CandidateResult, info, digest: str, run_id: str,
                     storage_options: Optional[dict] = None) -> str:
    """A new version of the (dataset, NFE) model, or the existing one with the same checkpoint and protocol
    (a retried register stage must not add duplicates). The existing version is found through the
    :class:`VersionIndex` next to the checkpoint (one GET, whatever the size of the registry), else by a tag search on
    the checkpoint's sha256 and protocol (never a listing of the versions); call it under :func:`model_lock` so that two
    registrants of the same checkpoint cannot both create a version."""
    name = cand.registered_name
    ensure_model(client, name, tags={"amed.dataset": cand.dataset, "amed.nfe": str(cand.nfe)},
                 description=f"AMED samplers for {cand.dataset} at NFE {cand.nfe}; "
                             f"alias '{CHAMPION}' = best under one evaluation protocol")
    index = VersionIndex(client, cand, digest, storage_options)
    rec = index.read()
    if rec is not None and rec.get("version"):
        if _version_matches(client, name, str(rec["version"]), digest, cand.protocol.hash):
            return str(rec["version"])
    if rec is not None or not index.usable:  # an interrupted registration, or no index: the tag search decides
        existing = find_version(client, name, checkpoint_sha256=digest, protocol_hash=cand.protocol.hash)
        if existing is not None:
            index.write({"version": existing})
            return existing
    index.write({"pending": True})   # intent first: a crash before the version is recorded sends the next one to search
    tags = {"solver": cand.solver, "base_solver": cand.base_solver, "seed": str(cand.seed), "nfe": str(cand.nfe),
            "dataset": cand.dataset, "metric": cand.protocol.metric, "protocol_hash": cand.protocol.hash,
            "protocol": json.dumps(cand.protocol.model_dump(mode="json"), sort_keys=True),
            "value": repr(float(cand.value)), "checkpoint_sha256": digest, "checkpoint_url": cand.checkpoint_url,
            **family_tags(cand)}
    if cand.base_value is not None:  # the base solver with its options (not evaluated: panel.include_base_solvers)
        tags.update(base_value=repr(float(cand.base_value)), base_options=json.dumps(cand.base_options, sort_keys=True))
    mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)
    index.write({"version": str(mv.version)})
    return str(mv.version)


class VersionIndex:
    """Which version of which registry holds a checkpoint, kept next to the checkpoint in the store
    (``<checkpoint_url>/registry/<hash of registry URI, model, protocol, sha256>.json``): one GET finds it, whatever the
    size of the registry. MLflow's own tag search is O(versions of the model) on PostgreSQL (about 1 s at 1,000
    versions, BENCHMARKS "Registration at scale"), so it is only the fallback: for a record left ``pending`` by an
    interrupted registration, or where the store cannot be read or written. A recorded version is checked against
    the registry (one get_model_version) before it is trusted."""

    def __init__(self, client, cand: CandidateResult, digest: str, storage_options: Optional[dict] = None):
        import hashlib

        registry = str(getattr(client, "_registry_uri", None) or getattr(client, "tracking_uri", ""))
        key = hashlib.sha256(json.dumps([registry, cand.registered_name, cand.protocol.hash, digest]).encode()).hexdigest()
        self.url = f"{cand.checkpoint_url.rstrip('/')}/registry/{key[:24]}.json"
        self.storage_options = dict(storage_options or {})
        self.usable = True

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.url, **self.storage_options)

    def read(self) -> Optional[dict]:
        try:
            fs, path = self._fs()
            if not fs.exists(path):
                return None
            from amed_core.io import parse_json
            from flows.storage.reads import read_object

            return parse_json(read_object(fs, path, 64 << 10, what=path), path)  # bounded, regular, shallow
        except Exception as e:  # noqa: BLE001 - no index: fall back to the registry's search
            log.debug("version index %s unreadable: %s", self.url, e)
            self.usable = False
            return None

    def write(self, rec: dict) -> None:
        try:
            fs, path = self._fs()
            fs.makedirs(fs._parent(path), exist_ok=True)
            with fs.open(path, "wb") as f:
                f.write(json.dumps(rec).encode())
        except Exception as e:  # noqa: BLE001 - the index only saves a search
            log.debug("version index %s not written: %s", self.url, e)
            self.usable = False


def _version_matches(client, name: str, version: str, digest: str, protocol_hash: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        return False
    return mv.tags.get("checkpoint_sha256") == digest and mv.tags.get("protocol_hash") == protocol_hash


def family_tags(cand: CandidateResult) -> dict[str, str]:
    """Version tags of the families issue: family, method, NFE, denoiser calls, teacher id, the best training-free
    sampler (the baseline) with its value and the margin, and the per-sample error percentiles (where measured)."""
    best = cand.panel_best or {}
    tags = {"family": cand.family, "method": cand.solver, "teacher_id": cand.teacher_id or cand.dataset,
            "denoiser_calls": str(cand.denoiser_calls if cand.denoiser_calls is not None else cand.nfe)}
    if cand.panel_value is not None:
        tags.update(baseline_value=repr(float(cand.panel_value)), baseline_solver=str(best.get("solver", "")),
                    baseline_options=json.dumps({"schedule": best.get("schedule"), "rho": best.get("rho"),
                                                 **(best.get("options") or {})}, sort_keys=True))
        if cand.margin is not None:
            tags["margin"] = repr(float(cand.margin))
        if cand.margin_ci:
            tags.update(margin_ci95_low=repr(float(cand.margin_ci[0])), margin_ci95_high=repr(float(cand.margin_ci[1])),
                        verdict=str(cand.verdict))
    for k, v in (cand.per_sample or {}).items():
        tags[f"per_sample_{k}"] = repr(float(v))
    return tags


def ensure_model(client, name: str, *, tags: Optional[dict] = None, description: str = "") -> None:
    """Create the registered model unless it exists (a concurrent creator winning the race is fine)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(name, tags=tags, description=description)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"a quote in a registry search value: {value!r}")
    return f"'{value}'"


def find_version(client, name: str, **tags: str) -> Optional[str]:
    """The lowest version of ``name`` whose tags hold all of ``tags`` (e.g. checkpoint_sha256, protocol_hash), or
    None. One tag-filtered search (``tags.k = 'v'``: a join on the tag table in the SQL store), not a listing of the
    model's versions, so its cost does not grow with the registry."""
    flt = " AND ".join([f"name = {_quote(name)}", *(f"tags.{k} = {_quote(str(v))}" for k, v in sorted(tags.items()))])
    hits = client.search_model_versions(flt, max_results=50)
    hits = [mv for mv in hits if all(mv.tags.get(k) == str(v) for k, v in tags.items())]
    return str(min(int(mv.version) for mv in hits)) if hits else None


LOCK_SUFFIX = ".amed-lock"


@contextlib.contextmanager
def model_lock(client, name: str, *, lease_s: float = 300.0, timeout_s: float = 900.0, poll_s: float = 0.1):
    """Mutual exclusion per registered model, kept by the registry itself: creating a registered model is atomic on
    every MLflow backend (unique name; PostgreSQL, MySQL, SQLite), so the model ``<name>.amed-lock`` exists iff a
    registrant holds the lock. Every sweep that registers into ``name`` (any process, any machine, with or without a
    Prefect API) takes it around find-or-create-version and the alias moves; the expensive model logging stays
    outside. The lock carries its owner and a lease (tags); a lock older than its lease (a registrant that died
    holding it) is removed by the next one that waits for it. Released by deleting the lock model (only by its owner).
    TimeoutError after ``timeout_s``."""
    import os
    import socket
    import uuid

    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    while True:
        try:
            client.create_registered_model(lock, tags={"amed.lock_owner": owner,
                                                       "amed.lock_expires": repr(time.time() + lease_s)},
                                           description=f"registration lock of {name} (held while a sweep registers)")
            break
        except MlflowException as e:
            # taken; or released between the server's failed insert and its look-up of the holder (DOES_NOT_EXIST)
            if not any(c in str(e.error_code) for c in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")) \
                    and "already exists" not in str(e):
                raise
        _break_stale_lock(client, lock)
        if time.monotonic() > deadline:
            raise TimeoutError(f"registration lock {lock!r} not acquired within {timeout_s:.0f}s")
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 1.5, 2.0)
    try:
        yield owner
    finally:
        try:
            held = client.get_registered_model(lock).tags.get("amed.lock_owner")
            if held == owner:
                client.delete_registered_model(lock)
            else:
                log.warning("registration lock %s was taken over (lease expired) while %s held it", lock, owner)
        except MlflowException as e:
            log.warning("could not release registration lock %s: %s", lock, e)


def _break_stale_lock(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
        expires = float(tags.get("amed.lock_expires", "inf"))
    except (MlflowException, ValueError):
        return
    if time.time() > expires:
        log.warning("removing stale registration lock %s (owner %s, lease expired %.0fs ago)", lock,
                    tags.get("amed.lock_owner"), time.time() - expires)
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            pass


def register_candidate(mlflow, client, cand: CandidateResult, info, digest: str, run_id: str,
                       aliases: Optional[list[str]] = None, storage_options: Optional[dict] = None) -> tuple[str, dict[str, bool]]:
    """Under :func:`model_lock`: find or create the candidate's version, then move each alias (``champion`` and
    ``best-<solver>`` by default) compare-and-set style. Returns (version, {alias: moved}). Whatever the interleaving
    of concurrent registrants, the alias ends on the lowest value under the holder's protocol."""
    aliases = aliases if aliases is not None else [CHAMPION, solver_alias(cand.solver)]
    name = cand.registered_name
    with model_lock(client, name):
        version = register_version(mlflow, client, cand, info, digest, run_id, storage_options)
        moved = {a: move_alias(client, name, a, version, cand.value, cand.protocol.hash) for a in aliases}
    return version, moved

"""MLflow tracking and model registry for distilled samplers; ``load_sampler`` for any checkpoint address.

- Tracking: one parent run per sweep (experiment = the sweep's name), one nested child run per candidate.
  Child params = the full sweep config flattened (``train.lr``, ...) + the candidate (``candidate.solver``,
  ``spec.num_steps``, ...); metrics = the protocol's metric and the base solver's at the same NFE
  (``fd_exact``, ``base_fd_exact``, ``improvement``), ``rmse``, ``train_seconds``, ``teacher_nfe``, the
  training loss curve (``train_loss`` by step); artifacts = ``checkpoint/`` (predictor.safetensors,
  sampler.json), the sample grids and a learned-schedule plot (PNGs).
- Model: the checkpoint logged as a pyfunc from code (``flows/mlflow_model.py``; safetensors + JSON, no
  pickle) with explicit pip requirements; it is loaded back and run once (it must reproduce the local
  checkpoint's samples bit for bit) before it is registered.
- Registry: one registered model per (dataset, NFE) (``CandidateResult.registered_name``); every candidate
  is a version (tags: solver, seed, metric, protocol_hash, value, ...). The alias ``champion`` moves to a
  version only when it is strictly better (lower) than the current champion *under the same protocol
  hash*; otherwise it stays. ``best-<solver>`` aliases (``best-amed-ipndm``) follow the same rule per solver.
- ``load_sampler(uri)``: a local folder, any fsspec URL (``s3://...``), or ``models:/NAME@ALIAS``,
  ``models:/NAME/VERSION``, ``models:/m-<id>``.

The tracking URI: an explicit argument, else the sweep's ``mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///<cwd>/amed-runs/<sweep>/mlflow.db`` (artifacts in ``amed-runs/<sweep>/mlartifacts``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from flows.results import CandidateResult

log = logging.getLogger(__name__)

__all__ = ["register_sweep", "log_sweep", "load_sampler", "fetch", "resolve_tracking_uri", "default_tracking_uri",
           "champion_uri", "solver_alias", "QUICKSTART_TRACKING_URI", "SweepLog"]

CHECKPOINT_FILES = ("predictor.safetensors", "sampler.json")
QUICKSTART_DB = Path("amed-runs", "quickstart", "mlflow.db")
QUICKSTART_TRACKING_URI = f"sqlite:///{QUICKSTART_DB.as_posix()}"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
CHAMPION = "champion"
_PARAM_MAX = 6000  # MLflow's param value limit


# ----------------------------------------------------------------------------------------------
# Tracking URI


def default_tracking_uri(sweep_name: str) -> str:
    """``sqlite:///<cwd>/amed-runs/<sweep>/mlflow.db`` (the quickstart's: ``amed-runs/quickstart/mlflow.db``)."""
    return f"sqlite:///{Path('amed-runs', sweep_name, 'mlflow.db').absolute().as_posix()}"


def resolve_tracking_uri(explicit: Optional[str] = None, *, config=None) -> str:
    """Explicit > sweep config > $MLFLOW_TRACKING_URI > the sweep's (or, without one, the quickstart's) SQLite file.

    Without a config, the quickstart's database is used only when it exists in the current folder;
    otherwise ValueError says how to point at a tracking server.
    """
    if explicit:
        return explicit
    if config is not None and getattr(config, "mlflow_tracking_uri", None):
        return config.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if config is not None:
        return default_tracking_uri(config.name)
    if QUICKSTART_DB.is_file():
        return f"sqlite:///{QUICKSTART_DB.absolute().as_posix()}"
    raise ValueError("no MLflow tracking URI: pass --tracking-uri, set MLFLOW_TRACKING_URI, or run in the folder where "
                     f"`amed distill` wrote {QUICKSTART_DB}")


@contextlib.contextmanager
def _tracking(uri: str):
    """Point mlflow's fluent API (tracking + registry) at ``uri`` for the block, then restore."""
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    prev_t, prev_r = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(prev_t)
        mlflow.set_registry_uri(prev_r)


# ----------------------------------------------------------------------------------------------
# Reading checkpoints (local folder, fsspec URL)


def _read_checkpoint(url: str, storage_options: Optional[dict] = None) -> dict[str, bytes]:
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


def _read_url(url: str, storage_options: Optional[dict] = None) -> bytes:
    import fsspec

    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def _write_files(out: Path, files: dict[str, bytes]) -> Path:
    """Write each file atomically (weights first, spec last: a folder with sampler.json is complete)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == "sampler.json"):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(files[name])
            os.replace(tmp, out / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return out


def _is_models_uri(uri: str) -> bool:
    return str(uri).startswith("models:/")


def _model_files(uri: str, tracking_uri: Optional[str]) -> dict[str, bytes]:
    """Checkpoint bytes of a registered / logged model (``models:/...``)."""
    import mlflow

    from mlflow.exceptions import MlflowException

    tracking_uri = resolve_tracking_uri(tracking_uri)
    with _tracking(tracking_uri), tempfile.TemporaryDirectory(prefix="amed-fetch-") as tmp:
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
    if _is_models_uri(uri):
        return _model_files(uri, tracking_uri)
    return _read_checkpoint(uri, storage_options)


def load_sampler(uri, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None):
    """An ``amed_core`` Sampler from a local folder, an fsspec URL or a registry URI (``models:/NAME@champion``).

    Nothing is unpickled: the checkpoint is safetensors + JSON wherever it lives."""
    from amed_core.amed import load_sampler as load_local
    from amed_core.amed import sampler_from_files

    uri = str(uri)
    if not _is_models_uri(uri) and "://" not in uri:
        return load_local(uri)
    return sampler_from_files(checkpoint_bytes(uri, tracking_uri=tracking_uri, storage_options=storage_options))


def fetch(uri: str, out, *, tracking_uri: Optional[str] = None, storage_options: Optional[dict] = None) -> Path:
    """Copy a sampler (``models:/...``, folder or URL) into the checkpoint folder ``out``; verify it loads."""
    from amed_core.amed import load_sampler as load_local

    files = checkpoint_bytes(str(uri), tracking_uri=tracking_uri, storage_options=storage_options)
    out = _write_files(Path(out), files)
    load_local(out)  # the copy is a valid checkpoint
    return out


# ----------------------------------------------------------------------------------------------
# Tracking


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> dotted keys; lists/None as JSON; values cut to MLflow's length limit."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = "{}"
        return out
    text = json.dumps(d) if isinstance(d, (list, tuple)) or d is None else str(d)
    out[prefix[:-1]] = text[:_PARAM_MAX]
    return out


def _param_key(k: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", k)[:250]


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(_param_key(k), v) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _log_metrics(client, run_id: str, values: dict[str, float], curves: Optional[dict[str, list[float]]] = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None and math.isfinite(float(v))]
    for name, ys in (curves or {}).items():
        ms += [Metric(name, float(y), now, i) for i, y in enumerate(ys) if math.isfinite(float(y))]
    for i in range(0, len(ms), 1000):
        client.log_batch(run_id, metrics=ms[i:i + 1000])


def solver_alias(solver: str) -> str:
    """Per-solver alias: ``amed+ipndm`` -> ``best-amed-ipndm``."""
    return "best-" + re.sub(r"[^A-Za-z0-9_-]", "-", solver)


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def _sha256(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _schedule_png(sampler, denoiser, seeds: list[int], title: str) -> bytes:
    """Learned schedule: each step's sigma_cur -> sigma_next and the predictor's intermediate time
    (mean and spread over ``seeds``), on a log axis. Matplotlib (Agg)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from amed_core.teacher import trajectory_inputs

    recorded: dict[int, list] = {}

    def policy(features, t_cur, t_next, step_idx):
        r, sd, st = sampler.predictor(features, t_cur, t_next, step_idx)
        recorded.setdefault(int(step_idx), []).append(r.detach().double().reshape(-1))
        return r, sd, st

    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    noise, labels = trajectory_inputs(seeds, denoiser.shape, label_policy="uniform" if label_dim else "none", label_dim=label_dim)
    onehot = torch.nn.functional.one_hot(labels, label_dim).double() if labels is not None else None
    sampler(denoiser, noise.double(), class_labels=onehot, policy=policy)
    grid = sampler.spec.grid().double().numpy()

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = range(len(grid))
    ax.plot(steps, grid, "o-", color="0.4", label="student grid sigma_n")
    for i, rs in sorted(recorded.items()):
        r = torch.cat(rs)
        # t_mid = t_cur^(1-r) t_next^r (AMED's geometric intermediate time), shown as mean +- std
        tc, tn = float(grid[i]), float(grid[i + 1])
        mids = (tc ** (1 - r) * tn ** r).numpy()
        ax.errorbar(i + float(r.mean()), mids.mean(), yerr=mids.std(), fmt="s", color="C1",
                    label="learned intermediate time" if i == min(recorded) else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class SweepLog:
    """What log_sweep recorded: parent run, child run and model version per candidate, champions."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    child_run_ids: list[str] = field(default_factory=list)
    versions: list[tuple[str, str]] = field(default_factory=list)          # (registered name, version)
    champions: dict[str, str] = field(default_factory=dict)               # name -> models:/name@champion
    moved: dict[str, bool] = field(default_factory=dict)                  # name -> champion moved in this sweep
    seconds_per_candidate: list[float] = field(default_factory=list)


def _experiment(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):  # no server: keep artifacts next to the database
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").absolute().as_uri()
    return client.create_experiment(name, artifact_location=location)


_TEACHERS: dict[str, Any] = {}  # (teacher, options) -> denoiser, reused across sweeps in one process


def _teacher_for(config, dataset: str):
    from amed_core.denoisers import load_teacher

    ds = next((d for d in config.datasets if d.name == dataset), None)
    if ds is None:
        raise ValueError(f"candidate dataset {dataset!r} is not in the sweep's datasets {[d.name for d in config.datasets]}")
    key = json.dumps([ds.teacher, ds.load_kwargs()], sort_keys=True, default=str)
    if key not in _TEACHERS:
        if len(_TEACHERS) >= 2:
            _TEACHERS.pop(next(iter(_TEACHERS)))
        _TEACHERS[key] = load_teacher(ds.teacher, **ds.load_kwargs())
    return ds, _TEACHERS[key]


def _log_model_checked(mlflow, ckpt_dir: Path, ds, denoiser, sampler, seeds: list[int]):
    """Log the pyfunc from code, load it back, run it once; it must reproduce the local sampler exactly."""
    import numpy as np
    import pandas as pd
    import torch

    from amed_core.teacher import trajectory_inputs
    from mlflow.models import infer_signature

    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    noise, labels = trajectory_inputs(seeds, denoiser.shape, label_policy="uniform" if label_dim else "none", label_dim=label_dim)
    onehot = torch.nn.functional.one_hot(labels, label_dim).double() if labels is not None else None
    expected = sampler(denoiser, noise.double(), class_labels=onehot).x.reshape(len(seeds), -1).numpy()
    example = pd.DataFrame({"seed": seeds})
    with warnings.catch_warnings():  # advisory hints (integer schema, type hints, input_example) only
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, expected, params={"dtype": "float64"})
        info = _log_pyfunc(mlflow, ckpt_dir, ds, signature)
        loaded = mlflow.pyfunc.load_model(info.model_uri)
        got = np.asarray(loaded.predict(example))
    if got.shape != expected.shape or not np.array_equal(got, expected):
        raise RuntimeError(f"logged model {info.model_uri} does not reproduce its checkpoint's samples; not registering it")
    return info


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


def _promote(client, name: str, alias: str, version: str, value: float, protocol_hash: str) -> bool:
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
    return True


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
    with _tracking(resolve_tracking_uri(tracking_uri)) as client:
        try:
            client.get_model_version(name, version)
        except MlflowException as e:
            raise ValueError(f"{uri}: no such registered version ({e.message.splitlines()[0]})") from None
        try:
            previous = str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            previous = None
        client.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> v%s (was %s)", name, alias, version, f"v{previous}" if previous else "unset")
    return {"name": name, "alias": alias, "version": version, "previous": previous}


def log_sweep(config, candidates: Iterable[CandidateResult], *, tracking_uri: Optional[str] = None,
              register: bool = True) -> SweepLog:
    """Track a sweep (parent + child runs) and, with ``register``, register each candidate and move aliases."""
    import mlflow

    candidates = list(candidates)
    uri = resolve_tracking_uri(tracking_uri, config=config)
    cfg_dict = config.model_dump(mode="json")
    teachers: dict[str, tuple] = {}
    with _tracking(uri) as client:
        exp_id = _experiment(client, config.name, uri)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"sweep-{config.name}-{config.hash[:8]}",
                              tags={"amed.sweep": config.name, "amed.config_hash": config.hash}) as parent:
            res = SweepLog(uri, exp_id, parent.info.run_id)
            _log_params(client, parent.info.run_id, _flatten(cfg_dict))
            mlflow.log_text(config.to_json(), "sweep.json")
            for cand in candidates:
                t0 = time.perf_counter()
                version = _log_candidate(mlflow, client, config, cfg_dict, cand, teachers, res, register)
                res.seconds_per_candidate.append(time.perf_counter() - t0)
                log.info("candidate %s %s nfe=%d seed=%d: %s=%.5g (base %s %.5g)%s in %.1fs", cand.dataset, cand.solver,
                         cand.nfe, cand.seed, cand.protocol.metric, cand.value, cand.base_solver, cand.base_value,
                         f" -> {cand.registered_name} v{version}" if version else "", res.seconds_per_candidate[-1])
            if register:
                for name in sorted({c.registered_name for c in candidates}):
                    try:
                        champ = client.get_model_version_by_alias(name, CHAMPION)
                    except mlflow.exceptions.MlflowException:
                        continue
                    res.champions[name] = champion_uri(name)
                    _log_metrics(client, parent.info.run_id, {f"champion_version.{name}": float(champ.version),
                                                              f"champion_value.{name}": float(champ.tags.get("value", "nan"))})
                    mlflow.set_tag(f"champion.{name}", f"v{champ.version}")
    return res


def _log_candidate(mlflow, client, config, cfg_dict, cand: CandidateResult, teachers: dict, res: SweepLog,
                   register: bool) -> Optional[str]:
    from amed_core.amed import sampler_from_files

    metric = cand.protocol.metric
    files = _read_checkpoint(cand.checkpoint_url, config.storage_options)
    sampler = sampler_from_files(files)
    digest = _sha256(files)
    run_name = f"{cand.dataset}-{cand.solver}-nfe{cand.nfe}-seed{cand.seed}"
    with mlflow.start_run(experiment_id=res.experiment_id, run_name=run_name, nested=True, tags={
            "amed.dataset": cand.dataset, "amed.solver": cand.solver, "amed.nfe": str(cand.nfe),
            "amed.seed": str(cand.seed), "amed.metric": metric, "amed.protocol_hash": cand.protocol.hash,
            "amed.checkpoint_sha256": digest}) as run:
        rid = run.info.run_id
        res.child_run_ids.append(rid)
        params = _flatten(cfg_dict)
        params.update(_flatten({"candidate": {k: v for k, v in cand.model_dump(mode="json").items()
                                              if k not in ("loss_history", "sampler_spec", "artifacts", "value",
                                                           "base_value", "rmse", "train_seconds")}}))
        params.update(_flatten({"spec": sampler.spec.to_dict()}))
        _log_params(client, rid, params)
        improvement = cand.base_value - cand.value
        _log_metrics(client, rid, {
            metric: cand.value, f"base_{metric}": cand.base_value, "improvement": improvement,
            "improvement_pct": 100 * improvement / cand.base_value if cand.base_value else None,
            "rmse": cand.rmse, "train_seconds": cand.train_seconds, "teacher_nfe": cand.teacher_nfe,
            "nfe": cand.nfe}, curves={"train_loss": cand.loss_history})
        with tempfile.TemporaryDirectory(prefix="amed-log-") as tmp:
            ckpt = _write_files(Path(tmp, "checkpoint"), files)
            mlflow.log_artifacts(str(ckpt), "checkpoint")
            for name, url in cand.artifacts.items():
                try:
                    p = Path(tmp, "plots", Path(name).name)
                    p.parent.mkdir(exist_ok=True)
                    p.write_bytes(_read_url(url, config.storage_options))
                    mlflow.log_artifact(str(p), "plots")
                except (OSError, ValueError) as e:
                    log.warning("artifact %s (%s) not logged: %s", name, url, e)
            if cand.dataset not in teachers:
                teachers[cand.dataset] = _teacher_for(config, cand.dataset)
            ds, denoiser = teachers[cand.dataset]
            seeds = [cand.protocol.seed, cand.protocol.seed + 1]
            try:
                png = _schedule_png(sampler, denoiser, list(range(cand.protocol.seed, cand.protocol.seed + 8)),
                                    f"{cand.dataset} {cand.solver} NFE {cand.nfe} (seed {cand.seed})")
                Path(tmp, "plots").mkdir(exist_ok=True)
                Path(tmp, "plots", "schedule.png").write_bytes(png)
                mlflow.log_artifact(str(Path(tmp, "plots", "schedule.png")), "plots")
            except Exception as e:  # a plot must never lose a candidate
                log.warning("schedule plot for %s not made: %s", run_name, e)
            if not register:
                return None
            t0 = time.perf_counter()
            info = _log_model_checked(mlflow, ckpt, ds, denoiser, sampler, seeds)
        version = _register_version(mlflow, client, cand, info, digest, rid)
        for alias in (CHAMPION, solver_alias(cand.solver)):
            moved = _promote(client, cand.registered_name, alias, version, cand.value, cand.protocol.hash)
            if alias == CHAMPION:
                res.moved[cand.registered_name] = res.moved.get(cand.registered_name, False) or moved
        _log_metrics(client, rid, {"log_register_seconds": time.perf_counter() - t0})
        mlflow.set_tag("amed.model_version", f"{cand.registered_name}/{version}")
        res.versions.append((cand.registered_name, version))
        return version


def _register_version(mlflow, client, cand: CandidateResult, info, digest: str, run_id: str) -> str:
    """A new version of the (dataset, NFE) model, or the existing one with the same checkpoint and protocol
    (a retried register stage must not add duplicates)."""
    name = cand.registered_name
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, tags={"amed.dataset": cand.dataset, "amed.nfe": str(cand.nfe)},
                                       description=f"AMED samplers for {cand.dataset} at NFE {cand.nfe}; "
                                                   f"alias '{CHAMPION}' = best under one evaluation protocol")
    for mv in client.search_model_versions(f"name='{name}'"):
        if mv.tags.get("checkpoint_sha256") == digest and mv.tags.get("protocol_hash") == cand.protocol.hash:
            return str(mv.version)
    tags = {"solver": cand.solver, "base_solver": cand.base_solver, "seed": str(cand.seed), "nfe": str(cand.nfe),
            "dataset": cand.dataset, "metric": cand.protocol.metric, "protocol_hash": cand.protocol.hash,
            "protocol": json.dumps(cand.protocol.model_dump(mode="json"), sort_keys=True),
            "value": repr(float(cand.value)), "base_value": repr(float(cand.base_value)),
            "checkpoint_sha256": digest, "checkpoint_url": cand.checkpoint_url}
    mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)
    return str(mv.version)


def register_sweep(config, candidates: Iterable[CandidateResult], *, tracking_uri: Optional[str] = None) -> dict[str, str]:
    """Track + register a sweep's candidates; returns {registered name: "models:/<name>@champion"}."""
    return log_sweep(config, candidates, tracking_uri=tracking_uri, register=True).champions

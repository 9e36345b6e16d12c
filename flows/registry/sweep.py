"""Tracking (and registering) a whole sweep: a parent run per sweep, a child run per candidate with its params, metrics,
checkpoint, sample grids and a learned-schedule plot; then a registered version and the aliases (registration)."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from flows.registry.checks import Checks, LocalChecks
from flows.registry.loading import read_checkpoint, write_files
from flows.registry.registration import CHAMPION, champion_uri, log_model, register_candidate
from flows.registry.tracking import experiment, flatten, log_metrics, log_params, resolve_tracking_uri, tracking
from flows.results import CandidateResult
from flows.storage.checksums import files_sha256
from flows.storage.credentials import redact
from flows.storage.locks import pid_alive
from flows.storage.urls import read_url

log = logging.getLogger("flows.registry")

__all__ = ["SweepLog", "log_sweep", "register_sweep", "close_stale_runs"]


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




def close_stale_runs(client, experiment_id: str, sweep: str) -> list[str]:
    """Mark KILLED the runs a killed attempt of this sweep left RUNNING: its parent runs (tagged with this host and
    a process that no longer exists) and their child runs. Runs of live processes, or of other hosts, are left alone.
    Returns the ids marked."""
    host = socket.gethostname()
    marked = []
    parents = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`amed.sweep` = '{sweep}'",
                                 max_results=1000)
    for run in parents:
        tags = run.data.tags
        if tags.get("amed.host") != host or not tags.get("amed.pid", "").isdigit() or pid_alive(int(tags["amed.pid"])):
            continue
        children = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                      f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", max_results=10000)
        for r in [*children, run]:
            client.set_terminated(r.info.run_id, status="KILLED")
            marked.append(r.info.run_id)
    if marked:
        log.info("marked %d run(s) of a killed attempt of sweep %s as KILLED", len(marked), sweep)
    return marked


def unfinished_parent(client, experiment_id: str, config):
    """The newest parent run of this sweep (same name and config hash) that an earlier attempt left KILLED or FAILED
    (close_stale_runs has marked those whose process is gone), or None. A rerun carries on in it instead of opening a
    new set of runs; a FINISHED sweep, or one still RUNNING elsewhere, is left alone."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`amed.sweep` = '{config.name}' and "
                              f"tags.`amed.config_hash` = '{config.hash}'", order_by=["attributes.start_time DESC"],
                              max_results=20)
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            continue
        return run if run.info.status in ("KILLED", "FAILED") else None
    return None


def _children(client, experiment_id: str, parent_id: str) -> dict[tuple[str, str], Any]:
    """The child runs of a parent, keyed by (run name, checkpoint sha256)."""
    out = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=1000, page_token=token)
        for r in page:
            out[(r.data.tags.get("mlflow.runName", r.info.run_name), r.data.tags.get("amed.checkpoint_sha256"))] = r
        token = page.token
        if not token:
            return out


def log_sweep(config, candidates: Iterable[CandidateResult], *, tracking_uri: Optional[str] = None,
              register: bool = True, checks: Optional[Checks] = None) -> SweepLog:
    """Track a sweep (parent + child runs) and, with ``register``, register each candidate and move aliases.

    ``checks``: where the teacher-dependent steps run (reference samples, schedule plot, the logged model's
    reproduction check): :class:`~flows.registry.checks.LocalChecks` (default) or, from the flow,
    :class:`~flows.registry.checks.RayChecks`, so the flow process never loads the teacher."""
    import mlflow

    checks = checks or LocalChecks()

    candidates = list(candidates)
    uri = resolve_tracking_uri(tracking_uri, config=config)
    cfg_dict = redact(config.model_dump(mode="json"))  # validation refuses secrets; redact again before recording
    with tracking(uri) as client:
        exp_id = experiment(client, config.name, uri)
        close_stale_runs(client, exp_id, config.name)
        tags = {"amed.sweep": config.name, "amed.config_hash": config.hash, "amed.host": socket.gethostname(),
                "amed.pid": str(os.getpid())}
        resumed = unfinished_parent(client, exp_id, config)
        if resumed is not None:  # a killed or failed attempt of this very sweep: carry on in its runs
            tags["amed.attempt"] = str(int(resumed.data.tags.get("amed.attempt", "1")) + 1)
            log.info("resuming MLflow run %s of sweep %s (attempt %s, the last one ended %s)", resumed.info.run_id,
                     config.name, tags["amed.attempt"], resumed.info.status)
        start = (dict(run_id=resumed.info.run_id) if resumed is not None else
                 dict(experiment_id=exp_id, run_name=f"sweep-{config.name}-{config.hash[:8]}"))
        with mlflow.start_run(**start, tags=tags) as parent:
            res = SweepLog(uri, exp_id, parent.info.run_id)
            previous = _children(client, exp_id, parent.info.run_id) if resumed is not None else {}
            log_params(client, parent.info.run_id, flatten(cfg_dict))
            mlflow.log_text(json.dumps(cfg_dict, indent=2), "sweep.json")
            def one(cand: CandidateResult) -> _Logged:
                t0 = time.perf_counter()
                out = _log_candidate(mlflow, client, config, cfg_dict, cand, checks, register, previous,
                                     parent.info.run_id, exp_id, uri)
                out.seconds = time.perf_counter() - t0
                log.info("candidate %s %s nfe=%d seed=%d: %s=%.5g (base %s %s)%s in %.1fs", cand.dataset, cand.solver,
                         cand.nfe, cand.seed, cand.protocol.metric, cand.value, cand.base_name,
                         "not evaluated" if cand.base_value is None else f"{cand.base_value:.5g}",
                         f" -> {cand.registered_name} v{out.version}" if out.version else "", out.seconds)
                return out

            workers = register_workers(uri, len(candidates))
            if workers > 1:  # each thread has its own active run (MLflow's run stack is thread-local)
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="amed-register") as pool:
                    logged = list(pool.map(one, candidates))
            else:
                logged = [one(c) for c in candidates]
            for cand, out in zip(candidates, logged):  # in candidate order, whatever order the threads finished in
                res.child_run_ids.append(out.run_id)
                res.seconds_per_candidate.append(out.seconds)
                if out.version:
                    res.versions.append((out.name, out.version))
                res.moved[cand.registered_name] = res.moved.get(cand.registered_name, False) or out.moved
            _log_views(mlflow, client, parent.info.run_id, candidates)
            if register:
                for name in sorted({c.registered_name for c in candidates}):
                    try:
                        champ = client.get_model_version_by_alias(name, CHAMPION)
                    except mlflow.exceptions.MlflowException:
                        continue
                    res.champions[name] = champion_uri(name)
                    log_metrics(client, parent.info.run_id, {f"champion_version.{name}": float(champ.version),
                                                              f"champion_value.{name}": float(champ.tags.get("value", "nan"))})
                    mlflow.set_tag(f"champion.{name}", f"v{champ.version}")
    return res


@dataclass
class _Logged:
    """What logging (and registering) one candidate gave."""

    run_id: str
    name: str = ""
    version: Optional[str] = None
    moved: bool = False
    seconds: float = 0.0


def register_workers(uri: str, n: int) -> int:
    """Candidates logged and registered at once: 1 on SQLite or a local folder (one writer), else
    ``AMED_REGISTER_WORKERS`` (default 4) threads; the work is HTTP uploads, sampling and plots, mostly off the GIL."""
    if uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri:
        return 1
    try:
        want = int(os.environ.get("AMED_REGISTER_WORKERS", "4"))
    except ValueError:
        raise ValueError("AMED_REGISTER_WORKERS must be a whole number of threads (e.g. 4); unset it for the "
                         "default") from None
    return max(1, min(want, n))


_MODEL_LOCKS: dict[str, threading.Lock] = {}
_MODEL_LOCKS_GUARD = threading.Lock()


def _local_lock(name: str) -> threading.Lock:
    """Threads of this process take turns per registered model before they take the registry's lock, so they never
    poll the registry for each other."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(name, threading.Lock())


def _log_candidate(mlflow, client, config, cfg_dict, cand: CandidateResult, checks: Checks, register: bool,
                   previous: Optional[dict], parent_id: str, experiment_id: str, uri: str) -> _Logged:
    from amed_core.families import describe as describe_sampler
    from amed_core.families import sampler_from_files

    metric = cand.protocol.metric
    files = read_checkpoint(cand.checkpoint_url, config.storage_options)
    sampler = sampler_from_files(files)
    digest = files_sha256(files)
    run_name = f"{cand.dataset}-{cand.solver}-nfe{cand.nfe}-seed{cand.seed}"
    before = (previous or {}).get((run_name, digest))
    done_tag = before.data.tags.get("amed.model_version") if before is not None else None
    if before is not None and before.info.status == "FINISHED" and (done_tag or not register):
        # an earlier attempt logged (and registered) this candidate completely: nothing to redo
        if done_tag:
            name, version = done_tag.rsplit("/", 1)
            return _Logged(before.info.run_id, name, version)
        return _Logged(before.info.run_id)
    start = (dict(run_id=before.info.run_id) if before is not None else
             dict(experiment_id=experiment_id, run_name=run_name, parent_run_id=parent_id))
    with mlflow.start_run(**start, nested=True, tags={
            "amed.dataset": cand.dataset, "amed.solver": cand.solver, "amed.nfe": str(cand.nfe),
            "amed.seed": str(cand.seed), "amed.metric": metric, "amed.protocol_hash": cand.protocol.hash,
            "amed.checkpoint_sha256": digest, "amed.family": cand.family, "amed.teacher_id": cand.teacher_id}) as run:
        rid = run.info.run_id
        if before is None or metric not in before.data.metrics:  # a resumed run keeps what it logged (no 2nd point)
            _log_candidate_values(client, rid, cfg_dict, cand, sampler, describe_sampler, metric)
        with tempfile.TemporaryDirectory(prefix="amed-log-") as tmp:
            ckpt = write_files(Path(tmp, "checkpoint"), files)
            mlflow.log_artifacts(str(ckpt), "checkpoint")
            for name, url in cand.artifacts.items():
                try:
                    p = Path(tmp, "plots", Path(name).name)
                    p.parent.mkdir(exist_ok=True)
                    p.write_bytes(read_url(url, name, config.storage_options))
                    mlflow.log_artifact(str(p), "plots")
                except (OSError, ValueError) as e:
                    log.warning("artifact %s (%s) not logged: %s", name, url, e)
            ds = next(d for d in config.datasets if d.name == cand.dataset)  # metadata only: no model loaded here
            seeds = [cand.protocol.seed, cand.protocol.seed + 1]
            ref = checks.reference(config.model_dump(mode="json"), cand.dataset, cand.checkpoint_url, seeds,
                                   list(range(cand.protocol.seed, cand.protocol.seed + 8)),
                                   f"{cand.dataset} {cand.solver} NFE {cand.nfe} (seed {cand.seed})",
                                   **_side_by_side_args(cand))
            if ref.get("png") is None and cand.family == "gs":  # GS's learned grid and model times next to the panel's
                ref["png"] = _gs_schedule_png(sampler, cand)
            Path(tmp, "plots").mkdir(exist_ok=True)
            for key, fname in (("png", "schedule.png"), ("side_by_side", "side_by_side.png")):
                if ref.get(key) is not None:  # the learned schedule (samplers without a predictor: sigmas in params);
                    Path(tmp, "plots", fname).write_bytes(ref[key])  # the champion's story picture
                    mlflow.log_artifact(str(Path(tmp, "plots", fname)), "plots")
            if not register:
                return _Logged(rid)
            t0 = time.perf_counter()
            info = log_model(mlflow, ckpt, ds, ref["expected"], seeds)
            if not checks.reproduces(uri, info.model_uri, seeds, ref["expected"]):
                raise RuntimeError(f"logged model {info.model_uri} does not reproduce its checkpoint's samples; "
                                   "not registering it")
        with _local_lock(cand.registered_name):
            version, moved = register_candidate(mlflow, client, cand, info, digest, rid,  # under the model's lock
                                                storage_options=config.storage_options,
                                                aliases=[] if cand.diverged else None)  # a diverged run is never champion
        log_metrics(client, rid, {"log_register_seconds": time.perf_counter() - t0})
        mlflow.set_tag("amed.model_version", f"{cand.registered_name}/{version}")
        return _Logged(rid, cand.registered_name, version, moved.get(CHAMPION, False))


def _side_by_side_args(cand: CandidateResult) -> dict:
    """reference_samples' baseline arguments: the panel best's checkpoint and both titles (none for the panel's own
    winner, or a panel without a checkpoint)."""
    best = cand.panel_best or {}
    url = best.get("checkpoint_url")
    if not url or url == cand.checkpoint_url:
        return {}
    label = cand.panel_name  # its one name with options (amed_core.evaluate.baseline_name)
    value = best.get("value")
    return {"baseline_url": url, "titles": [f"{cand.solver} NFE {cand.nfe}: {cand.value:.4g}",
                                            f"{label}: {value:.4g}" if value is not None else label]}


def _gs_schedule_png(sampler, cand: CandidateResult) -> Optional[bytes]:
    """GS's schedule plot (amed_core.families.gs.schedule_plot_png) with the panel's best grid at its NFE; no teacher
    is needed, so it is drawn here. None (and a warning) if it cannot be drawn: a plot never loses a candidate."""
    from amed_core.families.gs import schedule_plot_png

    best = cand.panel_best or {}
    try:
        return schedule_plot_png(sampler, panel_sigmas=best.get("sigmas"),
                                 panel_label=f"panel best: {cand.panel_name}",
                                 title=f"{cand.dataset} GS NFE {cand.nfe} (seed {cand.seed})")
    except Exception as e:  # noqa: BLE001 - a plot must never lose a candidate
        log.warning("GS schedule plot for %s not made: %s", cand.solver, e)
        return None


def _log_candidate_values(client, rid: str, cfg_dict: dict, cand: CandidateResult, sampler, describe_sampler,
                          metric: str) -> None:
    """A candidate's params (the sweep's config, the candidate, its sampler spec) and metrics, in batches."""
    params = flatten(cfg_dict)
    params.update(flatten({"candidate": {k: v for k, v in cand.model_dump(mode="json").items()
                                          if k not in ("loss_history", "sampler_spec", "artifacts", "value",
                                                       "base_value", "rmse", "train_seconds")}}))
    params.update(flatten({"spec": sampler.spec.to_dict() if hasattr(sampler.spec, "to_dict") else
                           {k: v for k, v in describe_sampler(sampler).items() if k != "sigmas"}}))
    log_params(client, rid, params)
    improvement = cand.base_value - cand.value if cand.base_value is not None else None
    log_metrics(client, rid, {
        metric: cand.value, f"base_{metric}": cand.base_value, "improvement": improvement,
        "improvement_pct": 100 * improvement / cand.base_value if cand.base_value and improvement is not None else None,
        "rmse": cand.rmse, "train_seconds": cand.train_seconds, "teacher_nfe": cand.teacher_nfe,
        "nfe": cand.nfe, "denoiser_calls": cand.denoiser_calls, "panel_value": cand.panel_value,
        "margin": cand.margin, **{f"per_sample_{k}": v for k, v in (cand.per_sample or {}).items()}},
        curves={"train_loss": cand.loss_history})


def _log_views(mlflow, client, run_id: str, candidates: list[CandidateResult]) -> None:
    """On the parent run: every candidate with the best training-free sampler and the margin (results_table.json,
    results.md), the best per (teacher, NFE) across families (tags ``best.<teacher>.nfe<N>``, metrics ``margin.*``),
    and the quality-vs-NFE plot with a line per family (plots/quality_vs_nfe.png)."""
    from flows.results import champion_rows, quality_plot_png, results_table

    if not candidates:
        return
    rows = results_table(candidates)
    mlflow.log_dict(rows, "results_table.json")
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    best = champion_rows(candidates)
    md += ["", "Best per (teacher, NFE) across families:", "", "| " + " | ".join(best[0]) + " |", "|" + "---|" * len(best[0])]
    md += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in best]
    mlflow.log_text("\n".join(md) + "\n", "results.md")
    for r in best:
        key = f"{r['teacher']}.nfe{r['nfe']}"
        mlflow.set_tag(f"best.{key}", f"{r['best']} {r['value']} (panel {r['panel_best']} {r['panel']}, margin {r['margin']})")
        if isinstance(r["margin"], float):
            log_metrics(client, run_id, {f"margin.{key}": r["margin"], f"best_value.{key}": r["value"]})
    png = quality_plot_png(candidates)
    if png:
        with tempfile.TemporaryDirectory(prefix="amed-plot-") as tmp:
            Path(tmp, "quality_vs_nfe.png").write_bytes(png)
            mlflow.log_artifact(str(Path(tmp, "quality_vs_nfe.png")), "plots")


def register_sweep(config, candidates: Iterable[CandidateResult], *, tracking_uri: Optional[str] = None,
                   checks: Optional[Checks] = None) -> dict[str, str]:
    """Track + register a sweep's candidates; returns {registered name: "models:/<name>@champion"}."""
    return log_sweep(config, candidates, tracking_uri=tracking_uri, register=True, checks=checks).champions

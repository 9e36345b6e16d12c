"""What a sweep shows people: the panel summaries, the Prefect artifacts (results table, champions, best per
(teacher, NFE), quality-vs-NFE plot, sample grids) and the plain-text tables of the flow's final log lines and of
`amed distill`. Split from :mod:`flows.distill` (the flow and its stages), which calls these after registering.
"""

from __future__ import annotations

import base64
import math

from flows.config import SweepConfig
from flows.plan import SweepPlan, slug
from flows.results import CandidateResult, champion_rows, quality_plot_png, results_table
from flows.storage.runs import RunStore

__all__ = ["panel_summaries", "publish_artifacts", "text_table", "shown_uri", "final_lines", "MAX_INLINE_GRIDS",
           "MarginIntervals"]


class MarginIntervals:
    """The 95 % interval of a margin value / panel over noise seeds: a paired bootstrap over samples of the two
    per-sample error vectors the evaluate jobs stored (``errors_key``, checked against ``errors_sha256``;
    ``amed_core.evaluate.margin_interval``). None where a score has no per-sample errors (metric fd_exact / fid)."""

    def __init__(self, store: RunStore):
        self.store = store
        self._cache: dict = {}

    def _errors(self, score: dict):
        key = score.get("errors_key")
        if not key:
            return None
        if key not in self._cache:
            from safetensors.torch import load

            from flows.storage.checksums import sha256

            data = self.store.get(key)
            if score.get("errors_sha256") and sha256(data) != score["errors_sha256"]:
                raise ValueError(f"{key}: checksum mismatch (the store's per-sample errors changed); rerun its evaluation")
            self._cache[key] = load(data)["errors"]
        return self._cache[key]

    def __call__(self, score: dict, panel_score: dict):
        from amed_core.evaluate import margin_interval

        e, p = self._errors(score), self._errors(panel_score)
        if e is None or p is None or e.shape != p.shape:
            return None
        return [round(v, 4) for v in margin_interval(e, p)]


def panel_summaries(plan: SweepPlan, scores: dict, ranked: list | None = None) -> dict:
    """Per (dataset, NFE): every panel entry's score (solver, options, schedule, its sigmas, value) and the best one (lowest
    finite value; ties: the first in plan order) - the baseline every candidate of that (dataset, NFE) faces.
    With a ranking round (``ranked``: [{"dataset", "nfe", "metric", "num_samples", "values"}]) every entry also shows
    its ranking score (``rank_value``); only the finalists have a full-count ``value``."""
    from amed_core.schedules import ScheduleSpec

    jobs = {b.id: b for b in plan.baselines}
    ranked = {(r["dataset"], r["nfe"]): r for r in (ranked or [])}
    out = {}
    for slot in plan.panels:
        entries = []
        rank = ranked.get((slot.dataset, slot.nfe)) or {}
        for i in slot.entries:
            b, sc = jobs[i], scores.get(i, {})
            entries.append({"id": i, "solver": b.solver, "options": dict(b.solver_options),
                            "schedule": b.schedule.get("schedule_type"), "rho": b.schedule.get("rho"),
                            "sigmas": [float(v) for v in ScheduleSpec.from_dict(b.schedule).grid(b.num_steps)],
                            "value": sc.get("value"), "denoiser_calls": sc.get("nfe"),
                            "per_sample": sc.get("per_sample", {}),
                            **({"rank_value": rank["values"].get(i), "rank_metric": rank.get("metric"),
                                "rank_samples": rank.get("num_samples")} if rank else {})})
        finite = [e for e in entries if e["value"] is not None and math.isfinite(e["value"])]
        best = min(finite, key=lambda e: e["value"]) if finite else {}
        out[(slot.dataset, slot.nfe)] = {"teacher_id": slot.teacher_id, "protocol": slot.protocol, "entries": entries,
                                         "best": best}
    return out


def publish_artifacts(cfg, results, scores, plan, results_url, champions) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = slug(cfg.name).lower().replace("_", "-").replace(".", "-")
    # the champions in the description too: the flow run's Artifacts tab shows descriptions, not contents
    champs = "; champions: " + ", ".join(champions.values()) if champions else ""
    create_table_artifact(table=results_table(results), key=f"{key}-results",
                          description=f"every candidate (families free/gits/amed/epd/gs), the best training-free sampler of its (teacher, NFE) and the margin value/panel ({results[0].protocol.metric if results else ''}, "
                                      f"lower is better){champs}; {results_url}; store {plan.store_url}; registry "
                                      f"{shown_uri(cfg.mlflow_tracking_uri) if cfg.register_models else 'none'}")
    store = RunStore(plan.store_url, cfg.storage_options)
    lines = [f"# Sweep `{cfg.name}`", "", f"Results: `{results_url}`", "", f"Store: `{plan.store_url}`", "",
             f"MLflow registry: `{shown_uri(cfg.mlflow_tracking_uri)}`" if cfg.register_models else
             "MLflow registry: none (register_models: false)", ""]
    if champions:
        lines += ["## Champions", ""] + [f"- `{n}` -> `{u}`" for n, u in champions.items()] + [""]
    rows = champion_rows(results)
    if rows:
        lines += ["## Best per (teacher, NFE) across families", "", "| " + " | ".join(rows[0]) + " |",
                  "|" + "---|" * len(rows[0])] + ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows] + [""]
    png = quality_plot_png(results)
    if png:
        lines += ["## Quality vs NFE", "", _img(png, "quality vs NFE per family"), ""]
    lines += ["## Samples", ""]
    grids = [(f"{c.eval.title} (seed {c.train.seed})", c.eval.id, c.eval.grid_key) for c in plan.candidates]
    grids += [(f"{b.dataset.name} {_named(b)} NFE {b.nfe} (training-free)", b.id, b.grid_key) for b in plan.baselines]
    grids = [g for g in grids if scores.get(g[1], {}).get("grid_url") and store.exists(g[2])]
    for title, _, key_ in grids[:MAX_INLINE_GRIDS]:  # inline PNGs keep the artifact self-contained
        lines += [f"### {title}", "", _img(store.get(key_), title), ""]
    for title, _, key_ in grids[MAX_INLINE_GRIDS:]:
        lines += [f"- {title}: `{store.url_of(key_)}`"]
    create_markdown_artifact(markdown="\n".join(lines), key=f"{key}-samples",
                             description="champions, best per (teacher, NFE), quality vs NFE and the sample grids"
                                         + (f" ({', '.join(champions.values())})" if champions else ""))


MAX_INLINE_GRIDS = 24


def _named(job) -> str:
    """A training-free job by its one name with options (two iPNDM entries differ by AFS: both were "ipndm")."""
    from flows.results import entry_name

    return entry_name({"solver": job.solver, "schedule": job.schedule.get("schedule_type"),
                       "rho": job.schedule.get("rho"), "options": dict(job.solver_options)})


def _img(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def text_table(rows: list[dict]) -> str:
    """Rows of equal keys as a right-aligned plain-text table (the CLI's and the flow's final log lines)."""
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def shown_uri(uri: str) -> str:
    """A tracking URI as it may be shown (password redacted)."""
    from flows.registry.tracking import redact_uri

    return redact_uri(uri)


def final_lines(logger, cfg: SweepConfig, table: list[dict], reg: dict) -> None:
    """The outcome as the run's last log lines (what `prefect deployment run --watch` and the UI end with)."""
    metric = cfg.evaluation.metric
    lines = [f"results of sweep {cfg.name} ({metric}, lower is better; 'base' = the training-free base solver "
             f"at the same NFE; 'panel' = the best training-free sampler, margin = value / panel):", text_table(table),
             f"results.json: {reg['results_url']}"]
    best = champion_rows([CandidateResult.model_validate(r) for r in reg["results"]])
    if best:
        lines += ["best per (teacher, NFE) across families:", text_table(best)]
    if reg["champions"]:
        lines.append(f"champions in {shown_uri(cfg.mlflow_tracking_uri)} (fetch: amed fetch URI --out DIR):")
        lines += [f"  {name}: {uri}" for name, uri in reg["champions"].items()]
    elif cfg.register_models:
        lines.append("no champion: no candidate has a finite score under this protocol (see results.json)")
    else:
        lines.append("no models registered (register_models: false)")
    for line in "\n".join(lines).splitlines():
        logger.info("%s", line)

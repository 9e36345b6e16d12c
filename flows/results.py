"""What the evaluate stage hands to the register stage (and what is written to the store as JSON).

The pipeline (flows/distill.py) produces these; the registry (flows/registry/) consumes them.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from flows.storage.checksums import json_digest


class EvalProtocol(BaseModel):
    """How a number was measured; two numbers are comparable only under the same protocol hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field(description="fd_exact | rmse | fid")
    num_samples: int
    seed: int
    reference: str = Field(default="", description="what the samples are compared with (mixture hash, FID stats hash)")

    @property
    def hash(self) -> str:
        return json_digest(self.model_dump(), compact=False)


class CandidateResult(BaseModel):
    """One trained predictor, evaluated next to its base solver at the same NFE."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    solver: str                       # e.g. "amed", "amed+ipndm"
    base_solver: str                  # the training-free solver it is compared with at the same NFE
    base_options: dict = Field(default_factory=dict)  # its schedule, rho and options (afs, ...): see base_name
    nfe: int
    seed: int
    checkpoint_url: str               # folder holding predictor.safetensors + sampler.json
    protocol: EvalProtocol
    value: float                      # the protocol's metric (lower is better)
    base_value: Optional[float] = None  # the base solver's metric under the same protocol (None: not evaluated)
    rmse: Optional[float] = None
    train_seconds: float = 0.0
    teacher_nfe: int = 0              # denoiser calls spent by the (shared) teacher, attributed to this sweep
    loss_history: list[float] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict)  # name -> URL (samples.png, schedule.png)
    sampler_spec: dict = Field(default_factory=dict)          # the SamplerSpec JSON
    # Families (issue 12): what the candidate is, what it costs, and the training-free panel it is compared with.
    family: str = "amed"              # free | gits | amed | epd | gs
    denoiser_calls: Optional[int] = None   # per sample (EPD: (N - 1)(K + 1) - afs; the others: the NFE)
    teacher_id: str = ""              # the teacher's identity: model_id, else <dataset>-<content hash[:8]>
    panel_best: dict = Field(default_factory=dict)            # the best training-free entry: solver, options, value
    panel_value: Optional[float] = None                       # its metric (the baseline every candidate faces)
    per_sample: dict = Field(default_factory=dict)            # error vs the reference solution: median, p90, p99
    margin_ci: Optional[list[float]] = None                   # 95 % interval of the margin over noise seeds (paired
                                                              # bootstrap over samples; rmse only)
    # Issue 21: validation on held-out trajectories (first/best/last scores), diverged, stopped early, the panel start.
    training: dict = Field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        """Its training diverged (validation, its own loss, or its loss against its peers'): reported, never champion."""
        return bool(self.training.get("diverged") or self.training.get("diverged_vs_peers"))

    @property
    def status(self) -> str:
        """ok | diverged | at start (validation kept the panel start: training did not help; a start that could not
        reproduce the winner then commits the winner itself) | stopped early."""
        if self.diverged:
            return "diverged"
        v = self.training.get("validation") or {}
        if self.training.get("fallback") or (self.training.get("init") and v and not v.get("improved")):
            return "at start"
        return "stopped early" if self.training.get("stopped_early") else "ok"

    @property
    def margin(self) -> Optional[float]:
        """value / panel_value (< 1: better than the best training-free sampler)."""
        if self.panel_value is None or not self.panel_value:
            return None
        return self.value / self.panel_value

    @property
    def base_name(self) -> str:
        """The base solver with its options (``amed_core.evaluate.baseline_name``), e.g. ``ipndm[poly7,afs=True,...]``."""
        return entry_name({"solver": self.base_solver, **self.base_options}) if self.base_options else self.base_solver

    @property
    def panel_name(self) -> str:
        """The panel's best entry with its options, or ``-``."""
        return entry_name(self.panel_best) if self.panel_best else "-"

    @property
    def verdict(self) -> Optional[str]:
        """better / tie / worse than the best training-free sampler, from the margin's interval (None without one)."""
        if not self.margin_ci:
            return None
        from amed_core.evaluate import verdict

        return verdict(self.margin_ci)

    @property
    def registered_name(self) -> str:
        """Registered model per (teacher identity, NFE): ``amed-<model_id or dataset-hash8>-nfe<N>``, so a new
        checkpoint of a model never inherits the old one's champion (results without a teacher id: the dataset)."""
        ident = self.teacher_id or self.dataset
        return f"amed-{ident}-nfe{self.nfe}".replace(":", "-").replace("/", "-").replace("+", "-")


# ---------------------------------------------------------------------------------------------
# Readable views of a sweep's results (the flow's table, the Prefect artifacts and the MLflow parent run).

def entry_name(entry: dict) -> str:
    """A panel entry or base solver ({solver, schedule, rho, options}) by its one name with its options
    (``amed_core.evaluate.baseline_name``: ``ipndm[poly7,afs=False,max_order=4]``)."""
    from amed_core.evaluate import baseline_name

    return baseline_name(str(entry.get("solver")), entry.get("options") or {}, entry.get("schedule"), entry.get("rho"))


def flag_diverged(results: list[CandidateResult], factor: float = 10.0) -> list[CandidateResult]:
    """Mark (``training["diverged_vs_peers"]``) each trained candidate whose final training loss is above ``factor``
    times the median final loss of the other candidates of its (teacher, NFE, family) (issue 21: a diverged run is
    reported as such, not silently scored). Returns ``results``."""
    import math
    import statistics

    groups: dict = {}
    for r in results:
        if r.loss_history:
            groups.setdefault((r.teacher_id or r.dataset, r.nfe, r.family), []).append(r)
    for group in groups.values():
        for r in group:
            peers = [p.loss_history[-1] for p in group if p is not r and math.isfinite(p.loss_history[-1])]
            last = r.loss_history[-1]
            if peers and (not math.isfinite(last) or last > factor * statistics.median(peers)):
                r.training["diverged_vs_peers"] = True
    return results


def results_table(results: list[CandidateResult]) -> list[dict]:
    """One row per candidate (every family; the panel's winner as family free): its score, the best training-free
    sampler of its (teacher, NFE) with its options, the margin value / panel best (< 1: better), the base solver at
    the same NFE, denoiser calls and per-sample error percentiles where the protocol has a reference solution."""
    rows = []
    for r in results:
        gain = (r.base_value - r.value) / r.base_value * 100 if r.base_value else None
        best = r.panel_best or {}
        ps = r.per_sample or {}
        solver = f"{r.solver} ({r.sampler_spec['init']} init)" if r.family == "gs" and r.sampler_spec.get("init") else r.solver
        rows.append({"dataset": r.dataset, "family": r.family, "solver": solver, "nfe": r.nfe,
                     "calls": r.denoiser_calls if r.denoiser_calls is not None else r.nfe, "seed": r.seed,
                     "metric": r.protocol.metric, "value": round(r.value, 6),
                     "panel_best": entry_name(best) if best else "-",
                     "panel": round(r.panel_value, 6) if r.panel_value is not None else "-",
                     "margin": round(r.margin, 3) if r.margin is not None else "-",
                     **({"margin_ci95": f"[{r.margin_ci[0]:.3f}, {r.margin_ci[1]:.3f}]", "verdict": r.verdict}
                        if r.margin_ci else {}),
                     "base_solver": r.base_name if r.base_value is not None else f"{r.base_solver} (not evaluated)",
                     "base": round(r.base_value, 6) if r.base_value is not None else "-",
                     "improvement_%": round(gain, 1) if gain is not None else "-",
                     **({"p50": round(ps["median"], 5), "p90": round(ps["p90"], 5), "p99": round(ps["p99"], 5)}
                        if ps else {}),
                     "train_s": round(r.train_seconds, 1), **_training_cells(r)})
    keys = list(dict.fromkeys(k for row in rows for k in row))  # rows of equal keys (text_table)
    return [{k: row.get(k, "-") for k in keys} for row in rows]


def _training_cells(r: CandidateResult) -> dict:
    """The status column, and with validation the held-out score at the start and the kept one (issue 21)."""
    if r.family == "free" and not r.training:
        return {}
    v = r.training.get("validation") or {}
    cells = {"status": r.status}
    if v:
        cells["val_start"] = round(v["first"], 5) if v.get("first") is not None else "-"
        cells["val_kept"] = round(v["best"], 5) if v.get("best") is not None else "-"
    return cells


def champion_rows(results: list[CandidateResult]) -> list[dict]:
    """Per (teacher, NFE): the best candidate across families (lowest value under one protocol: where the champion
    alias moves when the sweep registers), the best training-free sampler and the margin. Diverged candidates are
    left out."""
    best: dict = {}
    for r in results:
        if r.diverged:
            continue
        k = (r.teacher_id or r.dataset, r.nfe, r.protocol.hash)
        if k not in best or r.value < best[k].value:
            best[k] = r
    rows = [{"teacher": k[0], "nfe": k[1], "best": f"{r.family}:{r.solver}", "value": round(r.value, 6),
              "panel_best": r.panel_name,
             "panel": round(r.panel_value, 6) if r.panel_value is not None else "-",
             "margin": round(r.margin, 3) if r.margin is not None else "-",
             **({"margin_ci95": f"[{r.margin_ci[0]:.3f}, {r.margin_ci[1]:.3f}]", "verdict": r.verdict}
                if r.margin_ci else {})} for k, r in sorted(best.items())]
    keys = list(dict.fromkeys(k for row in rows for k in row))  # rows of equal keys (text_table)
    return [{k: row.get(k, "-") for k in keys} for row in rows]


def quality_plot_png(results: list[CandidateResult]) -> Optional[bytes]:
    """Quality vs NFE, a line per family (each family's best value per (teacher, NFE); log scale); None if empty."""
    if not results:
        return None
    import matplotlib

    from amed_core.evaluate.pictures import figure_png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    teachers = sorted({r.teacher_id or r.dataset for r in results})
    for ti, t in enumerate(teachers):
        for fi, fam in enumerate(("free", "gits", "amed", "epd", "gs")):
            pts: dict[int, float] = {}
            for r in results:
                if (r.teacher_id or r.dataset) == t and r.family == fam and r.value > 0:
                    pts[r.nfe] = min(pts.get(r.nfe, float("inf")), r.value)
            if pts:
                xs = sorted(pts)
                ax.plot(xs, [pts[x] for x in xs], marker="os^Dv"[fi], color=f"C{fi}",
                        linestyle=["-", "--", ":", "-."][ti % 4],
                        label=fam + (f" ({t})" if len(teachers) > 1 else ""))
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(results[0].protocol.metric + " (lower is better)")
    ax.set_title("best per family" + (f": {teachers[0]}" if len(teachers) == 1 else ""), fontsize=9)
    ax.legend(fontsize=8)
    return figure_png(fig)

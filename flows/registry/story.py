"""The champion's story, in one sentence built from its version tags: what it scored, the best training-free panel
entry it beat (with that entry's options), by how much, under which protocol. The MLflow model page (description,
next to the side-by-side sample picture) and `amed fetch` show the same sentence (:func:`champion_sentence`)."""

from __future__ import annotations

import json
from typing import Mapping, Optional

__all__ = ["champion_sentence", "baseline_label", "protocol_label", "SIDE_BY_SIDE", "side_by_side_markdown"]

SIDE_BY_SIDE = "plots/side_by_side.png"  # the candidate run's picture: its samples | the panel best's, same noise


def _float(tags: Mapping[str, str], key: str) -> Optional[float]:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def baseline_label(solver: str, options_json: str | Mapping | None) -> str:
    """A baseline by its one name with options (``amed_core.evaluate.baseline_name``: ``ipndm[poly7,afs=False,
    max_order=4]``, as in the results table and `amed fetch`) from its version tags: ``baseline_options`` {schedule,
    rho, **options} or ``base_options`` {schedule, rho, options} (flows.registry.registration)."""
    from amed_core.evaluate import baseline_name

    try:
        opts = dict(json.loads(options_json) if isinstance(options_json, str) else (options_json or {}))
    except (TypeError, ValueError):
        opts = {}
    schedule, rho = opts.pop("schedule", None), opts.pop("rho", None)
    options = opts.pop("options", None) or {}
    return baseline_name(solver, {**opts, **options}, schedule, rho)


def protocol_label(tags: Mapping[str, str]) -> str:
    """``fd_exact on 50000 samples from seed 1000 (protocol 1a2b3c4d)`` from the version's protocol tags."""
    try:
        p = json.loads(tags.get("protocol") or "{}")
    except ValueError:
        p = {}
    metric = p.get("metric") or tags.get("metric") or "the metric"
    parts = [str(metric)]
    if p.get("num_samples"):
        parts.append(f"on {p['num_samples']} samples")
    if p.get("seed") is not None:
        parts.append(f"from seed {p['seed']}")
    ph = tags.get("protocol_hash")
    return " ".join(parts) + (f" (protocol {ph[:8]})" if ph else "")


def champion_sentence(tags: Mapping[str, str], version: Optional[str] = None) -> str:
    """One sentence saying why this version is the champion, from its tags (method, family, nfe, metric, value,
    baseline_solver, baseline_options, baseline_value, margin, protocol, protocol_hash)."""
    method = tags.get("method") or tags.get("solver") or "?"
    family = tags.get("family")
    metric = tags.get("metric") or "value"
    value, base, margin = _float(tags, "value"), _float(tags, "baseline_value"), _float(tags, "margin")
    who = (f"v{version} " if version else "") + f"{method}" + (f" (family {family})" if family else "") + \
        (f" at NFE {tags['nfe']}" if tags.get("nfe") else "")
    score = f"{metric} {value:.4g}" if value is not None else f"{metric} unknown"
    protocol = protocol_label(tags)
    if base is None or not tags.get("baseline_solver"):
        return f"{who} is the champion with {score} under {protocol}; no training-free baseline was recorded for it."
    baseline = baseline_label(tags["baseline_solver"], tags.get("baseline_options"))
    if margin is None and base:
        margin = value / base if value is not None else None
    if family == "free" and margin is not None and margin >= 1:
        return (f"{who} is the champion: no learned sampler beat the best training-free sampler, which is this one, "
                f"{baseline}, with {score} under {protocol}.")
    if margin is None or value is None:
        return f"{who} is the champion with {score}; the best training-free sampler {baseline} scored {base:.4g} under {protocol}."
    if margin < 1:
        how = f"{100 * (1 - margin):.1f} % lower (margin {margin:.3g})"
    else:
        how = f"no lower (margin {margin:.3g})"
    return (f"{who} is the champion: {score} against {base:.4g} for the best training-free sampler, {baseline}, "
            f"{how}, under {protocol}.")


def side_by_side_markdown(run_id: str, title: str = "samples: champion | best training-free, same noise") -> str:
    """Markdown showing the candidate run's side-by-side picture on an MLflow server's pages (the UI's own artifact
    route, relative to the page, so it works behind any host name or proxy prefix)."""
    from urllib.parse import quote

    return f"![{title}](get-artifact?path={quote(SIDE_BY_SIDE, safe='')}&run_uuid={run_id})"

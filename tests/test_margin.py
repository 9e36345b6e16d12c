"""The champion's margin with a confidence interval over noise seeds (issue 21, item 7): a paired bootstrap over
samples of the two per-sample error vectors; the results table, the best-per-(teacher, NFE) rows and the registry's
version tags carry it with a verdict, so a 2 % "win" inside the noise is reported as a tie."""

from __future__ import annotations

import pytest
import torch

from amed_core.evaluate import margin_interval, verdict
from flows.results import CandidateResult, EvalProtocol, champion_rows, results_table

PROTO = EvalProtocol(metric="rmse", num_samples=512, seed=1000, reference="ref")


def _errors(scale: float, n: int = 512, seed: int = 0, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * (0.1 + spread * torch.rand(n, generator=g, dtype=torch.float64))


def test_interval_of_a_clear_win_a_tie_and_identity():
    panel = _errors(1.0)
    lo, hi = margin_interval(0.5 * panel, panel)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5) and verdict((lo, hi)) == "better"
    # per-sample errors that differ sample by sample: a 2 % lower RMSE inside the noise of 512 samples is a tie
    noisy = _errors(0.98, seed=1)
    r = float((noisy.pow(2).mean() / panel.pow(2).mean()).sqrt())
    lo, hi = margin_interval(noisy, panel)
    assert lo < r < hi and lo < 1 < hi and verdict((lo, hi)) == "tie"
    lo, hi = margin_interval(_errors(1.3, seed=1), panel)
    assert lo > 1 and verdict((lo, hi)) == "worse"
    assert margin_interval(panel, panel) == (pytest.approx(1.0), pytest.approx(1.0))
    assert margin_interval(noisy, panel) == margin_interval(noisy, panel)  # seeded: the same interval every time
    with pytest.raises(ValueError, match="same seeds"):
        margin_interval(panel[:10], panel)


def test_interval_covers_the_population_ratio():
    """Over 40 independent draws of 256 paired samples, the 95 % interval covers the population ratio in most."""
    g = torch.Generator().manual_seed(5)
    pop_e, pop_p = torch.rand(200_000, generator=g, dtype=torch.float64), torch.rand(200_000, generator=g, dtype=torch.float64)
    pop_e = 0.9 * pop_p + 0.3 * pop_e  # correlated, as two samplers on the same noise are
    true = float((pop_e.pow(2).mean() / pop_p.pow(2).mean()).sqrt())
    hits = 0
    for k in range(40):
        idx = torch.randint(200_000, (256,), generator=g)
        lo, hi = margin_interval(pop_e[idx], pop_p[idx], num_resamples=500, seed=k)
        hits += lo <= true <= hi
    assert hits >= 34  # 95 % nominal; binomial(40, .95) is >= 34 with probability ~0.99


def _result(value, ci, nfe=5, family="amed"):
    return CandidateResult(dataset="d", solver="amed+ipndm", base_solver="ipndm", nfe=nfe, seed=0, checkpoint_url="x",
                           protocol=PROTO, value=value, base_value=1.0, family=family, teacher_id="t",
                           panel_best={"solver": "deis", "value": 0.5}, panel_value=0.5, margin_ci=ci,
                           per_sample={"median": 0.1, "p90": 0.2, "p99": 0.3, "max": 0.4, "mean": 0.12})


def test_views_and_tags_carry_the_interval():
    from flows.registry.registration import family_tags

    rows = [_result(0.49, [0.95, 1.03]), _result(0.2, [0.35, 0.45], nfe=3), _result(0.7, None, nfe=7, family="free")]
    table = results_table(rows)
    assert table[0]["margin_ci95"] == "[0.950, 1.030]" and table[0]["verdict"] == "tie"
    assert table[1]["verdict"] == "better" and table[2]["margin_ci95"] == "-"
    assert {"p50", "p90", "p99"} <= set(table[0])
    best = champion_rows(rows)
    assert [(b["nfe"], b["verdict"]) for b in best] == [(3, "better"), (5, "tie"), (7, "-")]
    tags = family_tags(rows[0])
    assert tags["verdict"] == "tie" and float(tags["margin_ci95_low"]) == 0.95 and float(tags["margin_ci95_high"]) == 1.03
    assert float(tags["per_sample_p99"]) == 0.3

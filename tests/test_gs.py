"""GS beyond the golden cases: at initialisation it is multistep DPM-Solver++(3M) on a grid uniform in VP time (checked
against our own dpmpp solver), its checkpoint (sampler.json + gs.safetensors) round-trips and refuses bad files naming
the file and the field, other samplers' grids start it (or are refused where GS cannot express them), and training on a
teacher's final samples lowers the validation loss, keeps the best EMA checkpoint, and takes a pluggable feature
distance (a small local feature network here)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from amed_core import families as F
from amed_core.adapters import load_teacher
from amed_core.methods import solve
from amed_core.methods.gs import (EMA, FeatureDistance, GSConfig, GSParams, GSTrainConfig, clip_grad_norm, l2_distance,
                                  train_gs, validation_loss)
from amed_core.schedules import ScheduleSpec, get_schedule
from amed_core.teacher import StudentGrid, TeacherSpec, generate_shard
from gs_feature_net import TinyFeatures


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


@pytest.fixture(scope="module")
def pairs(teacher):
    """An endpoint-only teacher: 2 stored points, 32 Heun steps between them; 192 training + 64 validation pairs."""
    sch = ScheduleSpec("polynomial", rho=7.0, sigma_min=float(teacher.sigma_min), sigma_max=float(teacher.sigma_max))
    spec = TeacherSpec.for_denoiser(teacher, [StudentGrid(sch, 2)], num_trajectories=256, shard_size=256, sub_steps=31,
                                    solver="heun", dtype="float64")
    shard = generate_shard(teacher, spec, 0)
    assert shard.states.shape[0] == 2
    noise, final = shard.noise.double(), shard.states[-1].double()
    return (noise[:192], final[:192]), (noise[192:], final[192:])


def _noise(n=6, seed=3):
    return torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("nfe", [3, 6])
def test_theory_init_is_dpm_solver_pp_3m_on_a_vp_uniform_grid(teacher, nfe):
    """With the fixes that make its conventions ours (end at the net's sigma_min, EDM start and output), GS at init
    equals dpmpp(max_order 3, data prediction, no lower-order final step, no thresholding) on the time-uniform grid
    over the net's
    range; with the reference's conventions, the same solver on GS's own end points, scaled as the reference does."""
    cfg = F.gs.config_for(teacher, nfe, end="net", start="edm", output="edm")
    p = GSParams.reference_init(cfg)
    noise = _noise()
    with torch.no_grad():
        x = F.gs.GSSampler(p, F.gs.spec_doc(p))(teacher, noise).x
        grid = get_schedule(nfe + 1, 0.002, 80.0, schedule_type="time_uniform", schedule_rho=1.0)
        torch.testing.assert_close(p.sigmas(), grid, rtol=1e-10, atol=0)
        want = solve("dpmpp", teacher, noise * grid[0], grid, max_order=3, predict_x0=True, lower_order_final=False,
                     dynamic_thresholding=False).x
    assert float((x - want).abs().max()) < 1e-9  # sigma(t) = sqrt(exp(.) - 1) near 0.002: ~1e-11 relative
    ref = GSParams.reference_init(F.gs.config_for(teacher, nfe))  # VP start noise, VP output, ends at sigma 0.0105
    r = ref.remap
    with torch.no_grad():
        x = F.gs.GSSampler(ref, F.gs.spec_doc(ref))(teacher, noise).x
        grid = ref.sigmas()
        one = torch.ones((), dtype=torch.float64)
        want = solve("dpmpp", teacher, noise / r.alpha(one), grid, max_order=3, predict_x0=True, lower_order_final=False,
                     dynamic_thresholding=False).x
    assert float((x - want * r.alpha(torch.tensor(r.t_eps, dtype=torch.float64))).abs().max()) < 1e-9


def test_checkpoint_round_trip_describe_and_export(teacher, tmp_path):
    cfg = F.gs.config_for(teacher, 4, theory=False)
    p = GSParams.reference_init(cfg)
    with torch.no_grad():  # a "trained" checkpoint: move every tensor
        for k, name in enumerate(GSParams.TENSORS):
            t = getattr(p, name)
            t.add_(0.01 * (k + 1) * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape))
    s = F.gs.GSSampler(p, F.gs.spec_doc(p, init={"kind": "reference"}))
    files = F.sampler_files(s)
    assert set(files) == {"gs.safetensors", "sampler.json"} and F.checkpoint_kind(files["sampler.json"]) == "gs"
    again = F.load_sampler(F.save_sampler(tmp_path / "gs", s))
    noise = _noise()
    assert torch.equal(again(teacher, noise).x, s(teacher, noise).x)
    assert F.sampler_files(again) == files  # stable bytes
    d = F.describe(again)
    assert (d["family"], d["nfe"], d["denoiser_calls"], d["num_steps"], d["order"], d["theory"]) == ("gs", 4, 4, 5, 4, False)
    ks = again.params.export_sigmas()
    assert ks[-1] == 0.0 and ks[:-1] == pytest.approx(d["sigmas"], rel=1e-12) and len(ks) == 6
    assert again.params.export_sigmas(append_zero=False) == ks[:-1]
    assert again(teacher, noise, return_trajectory=True).trajectory.shape == (5, 6, 1, 8, 8)


def _mutate(files, doc_change=None, tensor_change=None):
    from safetensors.torch import load, save

    out = dict(files)
    if doc_change:
        doc = json.loads(files["sampler.json"])
        doc_change(doc)
        out["sampler.json"] = json.dumps(doc).encode()
    if tensor_change:
        t = load(files["gs.safetensors"])
        tensor_change(t)
        out["gs.safetensors"] = save(t)
    return out


BAD = [
    ("order", lambda d: d["gs"].update(order=9), None, "sampler.json: gs.order must be an integer in \\[1, 4\\]"),
    ("t_eps", lambda d: d["gs"].update(t_eps=1.5), None, "sampler.json: gs.t_eps"),
    ("end", lambda d: d["gs"].update(end="zero"), None, "sampler.json: gs.end must be one of"),
    ("unknown", lambda d: d.update(extra=1), None, "sampler.json: \\['extra'\\] are not GS checkpoint fields"),
    ("nfe", lambda d: d.update(nfe=5), None, "sampler.json: nfe must equal gs.steps"),
    ("sigmas", lambda d: d["sigmas"].__setitem__(1, 33.0), None, "sampler.json: sigmas does not match the grid"),
    ("nan", None, lambda t: t["c_diff"].__setitem__((0, 0), float("nan")), "gs.safetensors: tensor c_diff holds non-finite"),
    ("shape", None, lambda t: t.update(t_couple=torch.zeros(3, dtype=torch.float64)),
     "gs.safetensors: tensor t_couple has shape \\(3,\\); steps=4, order=4 need \\(4,\\)"),
    ("bound", None, lambda t: t["t_couple"].__setitem__(0, 2.0), "gs.safetensors: tensor t_couple reaches"),
    ("negative-time", None, lambda t: t["t_couple"].__setitem__(3, -0.3), "leave VP time .* set gs.clip_model_time"),
    ("nan-time", None, lambda t: t["t_couple"].__setitem__(3, -0.255), "leave VP time .* set gs.clip_model_time"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoints_name_the_file_and_field(teacher, case):
    p = GSParams.reference_init(F.gs.config_for(teacher, 4))
    files = F.sampler_files(F.gs.GSSampler(p, F.gs.spec_doc(p)))
    _, doc_change, tensor_change, msg = case
    bad = _mutate(files, doc_change, tensor_change)
    if tensor_change is not None and case[0] in ("bound", "negative-time", "nan-time"):  # keep the doc consistent with the tensors
        from amed_core.methods.gs import gs_tensors_from_bytes

        q = gs_tensors_from_bytes(bad["gs.safetensors"], p.config)
        bad = _mutate(bad, lambda d: d.update(q.describe()) if math.isfinite(sum(q.describe()["model_sigmas"])) else None)
    with pytest.raises(ValueError, match=msg):
        F.sampler_from_files(bad)
    with pytest.raises(ValueError, match="lacks \\['gs.safetensors'\\]"):
        F.sampler_from_files({"sampler.json": files["sampler.json"]})


def test_a_teacher_starting_above_gs_is_refused(teacher):
    """GS starts at min(152.17, the net's sigma_max), as the reference; a VE-style net's teacher (sigma_max 500) starts
    elsewhere, so its end states are no targets for GS: refused naming the fix."""
    cfg = GSConfig(steps=4, order=4, net_sigma_min=0.002, net_sigma_max=500.0)
    with pytest.raises(ValueError, match="GS starts at sigma 152.167 .* teacher starts at 500; use a teacher"):
        F.gs.check_start(cfg, 500.0)
    F.gs.check_start(F.gs.config_for(teacher, 4), float(teacher.sigma_max))


def test_init_from_another_grid(teacher):
    """The panel's schedule starts GS when it has N + 1 points inside GS's end sigmas: its interior is kept (to
    rounding), the ends are GS's; a 2-evaluation or AFS grid, or a point outside, is refused with the reason."""
    cfg = F.gs.config_for(teacher, 5)
    poly = get_schedule(6, 0.002, 80.0, schedule_type="polynomial", schedule_rho=7.0)
    p, rec = F.gs.init_params(cfg, poly.tolist(), source={"solver": "ipndm"})
    got = p.sigmas()
    torch.testing.assert_close(got[1:-1], poly[1:-1], rtol=1e-9, atol=0)
    assert float(got[-1]) == pytest.approx(p.remap.sigma_lo) and rec["kind"] == "grid" and rec["source"] == {"solver": "ipndm"}
    assert rec["source_sigmas"] == poly.tolist() and rec["sigmas"] == got.tolist()
    with pytest.raises(ValueError, match="has 6 points; this one has 7"):
        F.gs.init_params(cfg, get_schedule(7, 0.002, 80.0).tolist())
    low = get_schedule(6, 0.0005, 80.0, schedule_type="logsnr")
    with pytest.raises(ValueError, match="strictly between GS's end sigmas"):
        F.gs.init_params(F.gs.config_for(teacher, 5, t_eps=0.05), low.tolist())


def test_training_lowers_validation_loss_and_keeps_the_best(teacher, pairs):
    (n, y), (vn, vy) = pairs
    cfg = GSTrainConfig(iterations=60, batch_size=24, eval_every=20, seed=1)
    s, res = F.gs.fit(teacher, n, y, cfg, nfe=3, val=(vn, vy))
    assert res.updates == 60 and res.skipped == 0 and len(res.losses) == 60 and res.trajectories == 60 * 24
    assert [i for i, _ in res.val_history] == [1, 20, 40, 60]
    assert res.best_val < 0.5 * res.initial_val
    assert res.best_val == min(v for _, v in res.val_history)
    # the returned parameters are the best EMA checkpoint: their validation loss is the recorded best
    assert validation_loss(teacher, s.params, vn, vy) == pytest.approx(res.best_val, rel=1e-12)
    doc = s.spec.doc
    assert doc["train"]["best_iteration"] == res.best_iteration and doc["init"]["kind"] == "reference"
    again, res2 = F.gs.fit(teacher, n, y, cfg, nfe=3, val=(vn, vy))  # deterministic
    assert res2.losses == res.losses
    last, _ = F.gs.fit(teacher, n, y, GSTrainConfig(iterations=60, batch_size=24, eval_every=20, seed=1, keep="last"),
                       nfe=3, val=(vn, vy))
    assert validation_loss(teacher, last.params, vn, vy) == pytest.approx(res.val_history[-1][1], rel=1e-12)
    with pytest.raises(ValueError, match="batch_size 500 exceeds the 192 training pairs"):
        F.gs.fit(teacher, n, y, GSTrainConfig(iterations=1, batch_size=500), nfe=3)


def test_feature_distance_is_pluggable(teacher, pairs):
    (n, y), (vn, vy) = pairs
    dist = FeatureDistance(TinyFeatures(), name="tiny")  # a small local network (tests/gs_feature_net.py)
    assert torch.equal(dist(vy[:4], vy[:4]), torch.zeros(4, dtype=torch.float64))
    assert bool((dist(vy[:4], vy[4:8]) > 0).all())
    assert not any(p.requires_grad for p in dist.network.parameters())
    cfg = GSTrainConfig(iterations=30, batch_size=24, eval_every=10, loss="tiny")
    s, res = F.gs.fit(teacher, n, y, cfg, nfe=3, val=(vn, vy), distance=dist)
    assert res.best_val < res.initial_val
    assert validation_loss(teacher, s.params, vn, vy, distance=dist) == pytest.approx(res.best_val, rel=1e-12)
    l2, _ = F.gs.fit(teacher, n, y, GSTrainConfig(iterations=30, batch_size=24, eval_every=10), nfe=3, val=(vn, vy))
    assert not torch.equal(s.params.mu_logit, l2.params.mu_logit)  # the distance reached the gradient
    assert s.spec.doc["train"]["loss"] == "tiny"


def test_ema_and_clipping_match_the_libraries_the_reference_uses():
    """EMA: torch_ema's update with its num_updates warm-up; clipping: torch.nn.utils.clip_grad_norm_ (both written
    out here; the clipping is compared with torch's own)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)) for _ in range(2)]
    ema = EMA(ps, 0.999)
    start = [p.detach().clone() for p in ps]
    with torch.no_grad():
        ps[0].add_(1.0)
    ema.update()  # n = 1: d = min(0.999, 2 / 11)
    torch.testing.assert_close(ema.shadow[0], start[0] - (1 - 2 / 11) * (start[0] - ps[0].detach()), rtol=0, atol=1e-15)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        p.grad = torch.randn(5, generator=g, dtype=torch.float64) * 3
        q.grad = p.grad.clone()
    norm = clip_grad_norm(ps, 1.0)
    ref = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    assert norm == pytest.approx(float(ref), rel=1e-15)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-15, atol=0)


def test_labels_reach_the_denoiser_and_l2_is_the_reference_loss():
    class Labelled(torch.nn.Module):
        sigma_min, sigma_max = 0.002, 80.0

        def forward(self, x, sigma, class_labels=None):
            return x / (1 + sigma ** 2) + 0.1 * class_labels.argmax(1).to(x.dtype).reshape(-1, 1, 1, 1)

    net = Labelled()
    p = GSParams.reference_init(GSConfig(steps=3, order=3, net_sigma_min=0.002, net_sigma_max=80.0))
    labels = torch.eye(3, dtype=torch.float64)
    x = F.gs.GSSampler(p, F.gs.spec_doc(p))(net, _noise(3), class_labels=labels).x
    y = F.gs.GSSampler(p, F.gs.spec_doc(p))(net, _noise(3), class_labels=labels[[0, 0, 0]]).x
    assert not torch.allclose(x[1:], y[1:]) and torch.equal(x[0], y[0])
    a, b = _noise(2, 1), _noise(2, 2)
    torch.testing.assert_close(l2_distance(a, b), ((a - b) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="noise and target must be tensors of one"):
        train_gs(net, p, a, b[:1], GSTrainConfig(iterations=1))


def test_cli_train_gs_with_panel_init_and_a_feature_loss(tmp_path, capsys):
    """`amed train --method gs`: endpoint teacher, init from the best expressible training-free schedule (by the L2
    loss on the held-out pairs), a py: feature distance; the checkpoint loads, describes and samples."""
    from flows.cli import main

    out = tmp_path / "gs"
    assert main(["train", "--method", "gs", "--nfe", "4", "--teacher", "digits-gmm", "--out", str(out), "--iterations",
                 "20", "--trajectories", "96", "--val", "32", "--teacher-m", "16", "--gs-init", "panel", "--loss",
                 "py:gs_feature_net:build", "--gs-options", '{"order": 3, "output": "edm"}', "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "GS init: {'solver'" in text and "validation loss" in text
    s = F.load_sampler(out)
    d = F.describe(s)
    assert (d["family"], d["nfe"], d["order"], d["init"]) == ("gs", 4, 3, "grid") and s.spec.config.output == "edm"
    rec = json.loads((out / "train.json").read_text())
    assert rec["train_config"]["loss"] == "py:gs_feature_net:build" and rec["init"]["source"]["solver"] in (
        "dpmpp", "ipndm", "deis", "unipc", "euler")
    assert sorted(p.name for p in out.iterdir()) == ["gs.safetensors", "sampler.json", "train.json"]
    assert main(["train", "--method", "gs", "--nfe", "4", "--teacher", "digits-gmm", "--out", str(tmp_path / "x"),
                 "--gs-options", "[1]"]) != 0
    assert "--gs-options must be a JSON object" in capsys.readouterr().err
    assert main(["train", "--method", "gs", "--nfe", "3", "--teacher", "digits-gmm", "--out", str(tmp_path / "y"),
                 "--iterations", "1", "--trajectories", "24", "--val", "8", "--teacher-m", "4", "--loss",
                 "py:nope_missing:build", "--no-progress"]) != 0
    assert "loss py:nope_missing:build: " in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_grid_only_export_is_opt_in_and_exact_at_the_fixed_init(teacher):
    """`amed export` refuses GS (its model times and coefficients are not a sigma list) unless grid_only, which
    exports its grid with DPM-Solver++(3M) and says it is an approximation; at the init with our conventions (where GS
    is exactly that solver on its grid) the export's sampler reproduces GS's samples."""
    from amed_core.integrations import export_schedule, from_export

    cfg = F.gs.config_for(teacher, 4, end="net", start="edm", output="edm")
    p = GSParams.reference_init(cfg)
    s = F.gs.GSSampler(p, F.gs.spec_doc(p))
    with pytest.raises(ValueError, match="--grid-only"):
        export_schedule(s, "sigmas.json")
    doc = export_schedule(s, "sigmas.json", grid_only=True)
    assert doc["approximation"] is True and doc["solver"] == "dpmpp" and doc["family"] == "gs"
    assert doc["sigmas"] == pytest.approx(F.describe(s)["sigmas"], rel=1e-15) and doc["nfe"] == 4
    with pytest.raises(ValueError, match="k-diffusion"):  # 3M is not k-diffusion's sample_dpmpp_2m
        export_schedule(s, "k-diffusion", grid_only=True)
    noise = _noise()
    with torch.no_grad():
        want = s(teacher, noise).x
        got = from_export(doc)(teacher, noise).x
    assert float((got - want).abs().max()) < 1e-9

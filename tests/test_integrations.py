"""amed_core.integrations: samplers of every family inside diffusers pipelines, through k-diffusion's sampler signature
and as exported schedules, on tiny random diffusers models built from configs (nothing downloaded) and on the shipped
neural teacher digits-tiny-unet; a champion fetched from a real MLflow registry (SQLite) with its story on the model
page (checked in headless Chromium when it is installed) and in `amed fetch`.

Peers: diffusers' own pipelines and schedulers, the `k-diffusion` package's wrappers (external.py) and samplers
(sampling.py), installed with --no-deps (tests/k_diffusion_peer.py; CI installs it as the README's test command says).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from amed_core.adapters import load_teacher  # noqa: E402
from amed_core.amed import AMEDPredictor, Sampler, SamplerSpec, save_checkpoint  # noqa: E402
from amed_core.families import StaticSampler, StaticSpec, describe, free, save_sampler  # noqa: E402
from amed_core.integrations import (export_schedule, from_export, pipeline_denoiser, sample_with,  # noqa: E402
                                    sampler_sigmas, to_k_diffusion)
from amed_core.schedules import ScheduleSpec  # noqa: E402
from k_diffusion_peer import load_k_diffusion  # noqa: E402
from test_adapters import SCHED, _one_thread, _small_unet, _tiny_sd_pipeline  # noqa: E402,F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's (sampling, external) modules."""
    try:
        sampling, external, _ = load_k_diffusion("sampling", "external")
    except ImportError as e:
        pytest.skip(str(e))
    return sampling, external


def _ddpm_pipe(prediction_type="epsilon"):
    pipe = diffusers.DDPMPipeline(unet=_small_unet(), scheduler=diffusers.DDPMScheduler(**SCHED, prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _in_range(den, kind="polynomial", rho=7.0):
    return ScheduleSpec(kind, den.sigma_min, den.sigma_max, rho)


def _samplers(den, nfe=5):
    """One sampler per family for ``den`` (AMED and EPD with their untrained initial weights: the plumbing is under
    test, every number is compared with the same sampler through load_sampler)."""
    from amed_core.families import epd as epd_family

    spec = SamplerSpec.create("amed+ipndm", nfe=nfe, afs=True, denoiser=den)
    amed = Sampler(spec, AMEDPredictor(spec.predictor, seed=0))
    fr = free.make("ipndm", nfe, afs=False, schedule=_in_range(den), denoiser=den)
    g = StaticSampler(StaticSpec("gits", "ipndm", "gits+ipndm", nfe, fr.spec.sigmas[:2] + tuple(
        s * 0.9 for s in fr.spec.sigmas[2:]), False, {"max_order": 4}, None, den.identity(), {"metric": "dev"}))
    from amed_core.methods.epd import EPDParams

    sig = _in_range(den).grid(3)  # epd+ipndm on 3 points: NFE 4 (the paper's parallel count), 6 denoiser calls
    epd = epd_family.EPDSampler(EPDParams(3, 2, generator=torch.Generator().manual_seed(0)),
                                epd_family.spec_doc("epd+ipndm", 4, sig, afs=False, options={}, num_points=2,
                                                    teacher=den.identity()))
    return {"free": fr, "gits": g, "amed": amed, "epd": epd}


class _Calls:
    """Counts a module's forward calls (and the batch of each)."""

    def __init__(self, module):
        self.batches: list[int] = []
        self._h = module.register_forward_pre_hook(lambda m, a, kw=None: self.batches.append(int(a[0].shape[0])),
                                                   with_kwargs=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


# -- diffusers pipelines -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_with_ddpm_pipeline_every_family(prediction_type):
    """A DDPM-style pipeline: sample_with == the pipeline's own tail around load_sampler's samples on the pipeline's
    noise, for every family; the UNet is called the sampler's NFE times (EPD's K points of a step in one batch)."""
    pipe = _ddpm_pipe(prediction_type)
    den = pipeline_denoiser(pipe)
    for family, sampler in _samplers(den).items():
        with _Calls(pipe.unet) as calls:
            out = sample_with(pipe, sampler, batch_size=2, generator=torch.Generator().manual_seed(3), output_type="np")
        about = describe(sampler)  # EPD batches its K points per step: UNet calls = its NFE, samples = denoiser_calls
        assert len(calls.batches) == about["nfe"] and sum(calls.batches) == 2 * about["denoiser_calls"], family
        noise = randn_tensor((2, 3, 16, 16), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            x = sampler(den, noise).x
        want = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert out.images.shape == (2, 16, 16, 3)
        assert abs(out.images - want).max() == 0, family
    pil = sample_with(pipe, sampler, generator=torch.Generator().manual_seed(3)).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    with pytest.raises(ValueError, match="prompt"):
        sample_with(pipe, sampler, prompt="a cat")


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    pipe, _, _ = _tiny_sd_pipeline(transformers, tmp_path_factory.mktemp("sd"))
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sample_with_stable_diffusion_cfg(sd_pipe, prediction_type):
    """Stable Diffusion 1.x/2.x-style (text encoder, CFG, VAE, eps or v): sample_with == load_sampler on the pipeline's
    noise and prompt embeddings; one UNet call per evaluation (both guidance halves batched)."""
    pipe = sd_pipe
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    prompts = ["a cat", "red dog"]
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, None)
    den = pipeline_denoiser(pipe, guidance_scale=5.0, prompt_embeds=cond, negative_prompt_embeds=uncond)
    spec = SamplerSpec.create("amed+dpmpp", nfe=5, afs=True, denoiser=den)
    amed = Sampler(spec, AMEDPredictor(spec.predictor, seed=1))
    with _Calls(pipe.unet) as calls:
        out = sample_with(pipe, amed, prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert calls.batches == [4] * 5  # NFE 5, each call [uncond; cond] for 2 prompts
    noise = randn_tensor((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = amed(den, noise, class_labels=torch.arange(2)).x
    torch.testing.assert_close(out.images, want, rtol=0, atol=0)
    imgs = sample_with(pipe, amed, prompt=prompts, generator=torch.Generator().manual_seed(0), output_type="np")
    with torch.no_grad():
        decoded = pipe.vae.decode(want / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(torch.from_numpy(imgs.images), (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    assert type(imgs).__name__ == "StableDiffusionPipelineOutput"
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_with(pipe, amed, prompt=prompts, guidance_scale=3.0)  # distilled at 5


def test_diffusers_schedule_export_agrees_with_the_pipelines_own_scheduler(sd_pipe):
    """A free Euler sampler and a GITS schedule on Euler, exported (--to diffusers) and run by the pipeline's own
    EulerDiscreteScheduler loop (pipe(..., sigmas=...)), agree with sample_with on the same noise; both spend the NFE."""
    pipe = sd_pipe
    base = dict(pipe.scheduler.config)
    den = pipeline_denoiser(pipe, guidance_scale=5.0, **dict(zip(("prompt_embeds", "negative_prompt_embeds"),
                                                                 pipe.encode_prompt(["a cat"], "cpu", 1, True, None))))
    fr = free.make("euler", 6, afs=False, schedule=_in_range(den), denoiser=den)
    gits = StaticSampler(StaticSpec("gits", "euler", "gits+euler", 4, tuple(fr.spec.sigmas[i] for i in (0, 1, 3, 4, 6)),
                                    False, {}, None, den.identity(), {}))
    noise = randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    for sampler in (fr, gits):
        doc = export_schedule(sampler, "diffusers", alphas_cumprod=den.alphas_cumprod)
        assert doc["diffusers"]["scheduler"] == "EulerDiscreteScheduler" and doc["diffusers"]["timestep_gap"] < 0.01
        ours = sample_with(pipe, sampler, prompt="a cat", guidance_scale=5.0, latents=noise, output_type="latent").images
        pipe.scheduler = getattr(diffusers, doc["diffusers"]["scheduler"]).from_config(base, **doc["diffusers"]["config"])
        with _Calls(pipe.unet) as calls:
            theirs = pipe(prompt="a cat", sigmas=doc["sigmas"], guidance_scale=5.0, latents=noise.clone(),
                          output_type="latent").images
        assert len(calls.batches) == sampler.spec.nfe
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))
    ipndm = free.make("ipndm", 5, afs=False, schedule=_in_range(den), denoiser=den)
    with pytest.raises(ValueError, match=r"--to diffusers: diffusers has no sampler that computes ipndm"):
        export_schedule(ipndm, "diffusers")
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(base)


# -- k-diffusion ----------------------------------------------------------------------------------------------------


class _UNetFn(torch.nn.Module):
    """What k-diffusion's wrappers wrap: inner_model(x_in, t) -> eps or v (a diffusers UNet2DModel)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, **kwargs):
        return self.unet(x, t).sample


K_CASES = [("euler", {}), ("heun", {}), ("dpm2", {}),
           ("dpmpp", {"max_order": 2, "lower_order_final": False, "dynamic_thresholding": False})]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_to_k_diffusion_on_k_diffusion_wrappers(kd, prediction_type):
    """On k-diffusion's own DiscreteEps/VDDPMDenoiser around a tiny diffusers UNet: exported free schedules run by
    k-diffusion's samplers == the same samplers through to_k_diffusion; an AMED sampler through to_k_diffusion (its
    features found by name inside the wrapper) == load_sampler on our diffusers adapter of the same UNet, to float
    tolerance (the wrapper interpolates the UNet's timestep in log sigma, ours in VP time: BENCHMARKS "Integrations")."""
    sampling, external = kd
    pipe = _ddpm_pipe(prediction_type)
    den = pipeline_denoiser(pipe)
    wrap = (external.DiscreteEpsDDPMDenoiser if prediction_type == "epsilon" else external.DiscreteVDDPMDenoiser)(
        _UNetFn(pipe.unet), pipe.scheduler.alphas_cumprod, quantize=False)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for solver, opts in K_CASES:
        s = free.make(solver, 6, afs=False, options=opts, schedule=_in_range(den), denoiser=den)
        doc = export_schedule(s, "k-diffusion")
        fn = getattr(sampling, doc["k_diffusion"]["sampler"].rsplit(".", 1)[1])
        sig = torch.tensor(doc["sigmas"])
        with torch.no_grad():
            theirs = fn(wrap, noise * sig[0], sig, disable=True)
            ours = to_k_diffusion(s)(wrap, noise * sig[0], sig)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    for family, sampler in _samplers(den).items():
        sig = sampler_sigmas(sampler)
        with torch.no_grad():
            want = sampler(den, noise).x
            got = to_k_diffusion(sampler)(wrap, noise * sig[0], torch.cat([sig, sig.new_zeros(1)]))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), family


def test_to_k_diffusion_digits_tiny_unet(kd):
    """The shipped neural teacher as the k-diffusion-style model (its forward is model(x, sigma, class_labels=...)):
    k-diffusion's samplers == ours through to_k_diffusion; every family through to_k_diffusion == load_sampler,
    directly and through a black-box wrapper (features found by the checkpoint's layer name); bad input refused."""
    sampling, _ = kd
    teacher = load_teacher("digits-tiny-unet")
    noise = torch.randn(3, *teacher.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for solver, opts in K_CASES:
        s = free.make(solver, 6, afs=False, options=opts, denoiser=teacher)
        doc = export_schedule(s, "k-diffusion")
        sig = torch.tensor(doc["sigmas"], dtype=torch.float64)
        with torch.no_grad():
            theirs = getattr(sampling, doc["k_diffusion"]["sampler"].rsplit(".", 1)[1])(teacher, noise * sig[0], sig,
                                                                                       disable=True)
            ours = to_k_diffusion(s)(teacher, noise * sig[0], sig)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)

    class Box(torch.nn.Module):  # a wrapper that is not one of our denoisers: model(x, sigma) -> denoised
        def __init__(self, den):
            super().__init__()
            self.inner_model = den.net
            self._den = [den]

        def forward(self, x, sigma, **kw):
            return self._den[0](x, sigma)

    seen = []
    for family, sampler in _samplers(teacher).items():
        sig = sampler_sigmas(sampler)
        with torch.no_grad():
            want = sampler(teacher, noise).x
            for model in (teacher, Box(teacher)):
                got = to_k_diffusion(sampler)(model, noise * sig[0], sig, callback=seen.append)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12), family
    assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(seen[0])
    amed = _samplers(teacher)["amed"]
    sig = sampler_sigmas(amed)
    with pytest.raises(ValueError, match="^sigmas: this sampler runs on its own 4 time points"):
        to_k_diffusion(amed)(teacher, noise * 80, torch.linspace(80, 0.002, 6))
    with pytest.raises(ValueError, match="^feature_module: this sampler reads its features from 'tiny-unet:enc.8x8_block0'"):
        to_k_diffusion(amed)(lambda x, s: teacher(x, s), noise * sig[0], sig)
    with pytest.raises(ValueError, match="^options"):
        to_k_diffusion(amed)(teacher, noise * sig[0], sig, s_churn=1.0)
    with pytest.raises(ValueError, match=r"^--to k-diffusion: k-diffusion has no sampler that computes ipndm"):
        export_schedule(_samplers(teacher)["free"], "k-diffusion")
    with pytest.raises(ValueError, match=r"analytical first step"):
        export_schedule(free.make("euler", 5, afs=True, denoiser=teacher), "k-diffusion")
    with pytest.raises(ValueError, match="not a pure schedule"):
        export_schedule(amed, "sigmas.json")


def test_comfyui_example_node_function(tmp_path):
    """docs/examples/comfyui_amed_sampler.py: champion_sampler(uri) gives the SAMPLER function and SIGMAS ComfyUI
    would get, and that function reproduces load_sampler (ComfyUI itself is not installed: its node class is not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfyui_amed_sampler", ROOT / "docs/examples/comfyui_amed_sampler.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    teacher = load_teacher("digits-tiny-unet")
    amed = _samplers(teacher)["amed"]
    ckpt = save_checkpoint(tmp_path / "ckpt", amed.predictor, amed.spec)
    fn, sigmas = mod.champion_sampler(str(ckpt))
    assert sigmas.dtype == torch.float32 and mod.NODE_CLASS_MAPPINGS["AMEDChampionSampler"].RETURN_TYPES == ("SAMPLER", "SIGMAS")
    noise = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        got = fn(teacher, noise * sigmas[0].double(), torch.cat([sigmas, sigmas.new_zeros(1)]), extra_args={}, callback=None,
                 disable=True)
        want = amed(teacher, noise).x
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -- a champion from the registry: fetch, the integrations, the story (model page, amed fetch), amed export -------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow registry on SQLite, laid out as the quickstart leaves it (``amed-runs/quickstart/mlflow.db``),
    holding per model the panel's best entry (free ipndm), a GITS schedule on iPNDM and an AMED sampler that beats both
    (values under one rmse protocol): ``amed-tinyddpm-nfe5`` for a tiny DDPM pipeline folder (teacher ``diffusers``),
    and ``amed-digits-nfe5`` for the quickstart's digits-gmm (what the README's blocks fetch)."""
    from flows.config import load_sweep
    from flows.registry import log_sweep
    from flows.results import CandidateResult, EvalProtocol

    root = tmp_path_factory.mktemp("registry")
    _ddpm_pipe().save_pretrained(root / "ddpm")
    dens = {"ddpm": load_teacher(f"diffusers:{root / 'ddpm'}"), "digits": load_teacher("digits-gmm")}
    uri = f"sqlite:///{root / 'amed-runs' / 'quickstart' / 'mlflow.db'}"
    proto = EvalProtocol(metric="rmse", num_samples=64, seed=1000, reference="integrations")
    best = {"id": "panel-ipndm", "solver": "ipndm", "options": {"max_order": 4, "afs": False}, "schedule": "polynomial",
            "rho": 7.0, "value": 0.5}
    cands = []
    for ds, den in dens.items():
        samplers = _samplers(den)
        folders = {fam: str(save_sampler(root / "ckpt" / ds / fam, samplers[fam])) for fam in ("free", "gits", "amed")}
        with_ckpt = {**best, "checkpoint_url": folders["free"]}
        for fam, solver, value, panel in (("free", "ipndm", 0.5, best), ("gits", "gits+ipndm", 0.3, with_ckpt),
                                          ("amed", "amed+ipndm", 0.2, with_ckpt)):
            cands.append(CandidateResult(dataset=ds, solver=solver, base_solver="ipndm", nfe=5, seed=0,
                                         checkpoint_url=folders[fam], protocol=proto, value=value, base_value=0.5,
                                         family=fam, teacher_id="tinyddpm" if ds == "ddpm" else "digits",
                                         panel_best=panel, panel_value=0.5, denoiser_calls=5))
    cfg = load_sweep({"name": "integrations", "mlflow_tracking_uri": uri, "solvers": ["amed+ipndm"], "nfes": [5],
                      "evaluation": {"metric": "rmse", "num_samples": 64},
                      "datasets": [{"name": "ddpm", "teacher": "diffusers", "weights_url": str(root / "ddpm"),
                                    "model_id": "tinyddpm"}, {"name": "digits", "teacher": "digits-gmm", "model_id": "digits"}]})
    res = log_sweep(cfg, cands)
    assert len(res.versions) == 6, res
    return {"uri": uri, "root": root, "name": "amed-tinyddpm-nfe5", "den": dens["ddpm"]}


SENTENCE = (r"v3 amed\+ipndm \(family amed\) at NFE 5 is the champion: rmse 0\.2 against 0\.5 for the best "
            r"training-free sampler, ipndm\[poly7,afs=False,max_order=4\], 60\.0 % lower \(margin 0\.4\), under rmse "
            r"on 64 samples from seed 1000 \(protocol [0-9a-f]{8}\)\.")


def test_fetched_champion_story_and_integrations(registry, kd, tmp_path, capsys):
    """The champion fetched from the registry samples inside the diffusers pipeline and through k-diffusion's signature
    as load_sampler does; the model page (description) and `amed fetch` say why it won in the same sentence, next to
    its samples and the panel best's on the same noise; `amed export` writes a GITS version's schedule and refuses
    the AMED champion in one line."""
    from mlflow import MlflowClient

    from flows.cli import main
    from flows.registry import load_sampler

    uri, name = registry["uri"], registry["name"]
    client = MlflowClient(uri, uri)
    model = client.get_registered_model(name)
    champ = client.get_model_version_by_alias(name, "champion")
    lines = model.description.split("\n\n")
    assert lines[0] == f"champion: {model.tags['champion']}" and lines[0].startswith("champion: v3 (amed+ipndm, rmse 0.2)")
    assert re.fullmatch("why: " + SENTENCE, lines[1]), lines[1]
    assert re.fullmatch(SENTENCE, champ.description)
    assert lines[2] == f"![samples: champion | best training-free, same noise](get-artifact?path=plots%2Fside_by_side.png&run_uuid={champ.run_id})"
    png = Path(client.download_artifacts(champ.run_id, "plots/side_by_side.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000

    assert main(["fetch", f"models:/{name}@champion", "--out", str(tmp_path / "champ"), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^why      " + SENTENCE + "$", printed, re.M), printed

    fetched = load_sampler(f"models:/{name}@champion", tracking_uri=uri)
    pipe = diffusers.DDPMPipeline.from_pretrained(registry["root"] / "ddpm")
    pipe.set_progress_bar_config(disable=True)
    out = sample_with(pipe, fetched, batch_size=2, generator=torch.Generator().manual_seed(7), output_type="np")
    noise = randn_tensor((2, 3, 16, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = fetched(registry["den"], noise).x
    assert abs(out.images - (want / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()).max() == 0
    wrap = kd[1].DiscreteEpsDDPMDenoiser(_UNetFn(pipe.unet), pipe.scheduler.alphas_cumprod, quantize=False)
    sig = sampler_sigmas(fetched)
    with torch.no_grad():
        got = to_k_diffusion(fetched)(wrap, noise * sig[0], sig)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))

    out_json = tmp_path / "gits.json"
    assert main(["export", f"models:/{name}@best-gits-ipndm", "--to", "sigmas.json", "--out", str(out_json),
                 "--tracking-uri", uri]) == 0
    doc = json.loads(out_json.read_text())
    gits = load_sampler(f"models:/{name}@best-gits-ipndm", tracking_uri=uri)
    assert doc["sigmas"] == list(gits.spec.sigmas) and doc["solver"] == "ipndm" and doc["family"] == "gits"
    back = from_export(doc)  # the export round-trips: the same samples
    with torch.no_grad():
        assert torch.equal(back(registry["den"], noise).x, gits(registry["den"], noise).x)
    with pytest.raises(ValueError, match="^format: not an amed-schedule export"):
        from_export({"sigmas": doc["sigmas"]})
    capsys.readouterr()
    assert main(["export", f"models:/{name}@champion", "--to", "k-diffusion", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("amed export: error: a amed sampler (amed+ipndm) is not a pure schedule") and "\n" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_page_in_headless_chromium(registry, tmp_path):
    """MLflow's own UI (``mlflow server`` on the registry's database, 127.0.0.1) shows the champion's story on the
    registered model's page: Debian's chromium, headless, renders the page; its DOM holds the sentence and the
    side-by-side picture, whose address serves the very PNG logged with the champion's run."""
    from browser import chromium, dump_dom, screenshot, visible_text

    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get update && apt-get install -y chromium)")
    from mlflow import MlflowClient

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow.log", "wb")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                               str(port), "--workers", "1", "--backend-store-uri", registry["uri"]],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow.log').read_text()[-2000:]}")
                time.sleep(0.5)
        page = f"{base}/#/models/{registry['name']}"
        shot = os.environ.get("AMED_SCREENSHOT_DIR")  # for people: a PNG of the page (--screenshot, a second run)
        if shot:
            screenshot(page, Path(shot) / "model-page.png", budget_ms=20000)
        dom = dump_dom(page, budget_ms=20000, timeout=240)
        text = visible_text(dom)
        assert re.search(SENTENCE, text), text[:3000]
        srcs = re.findall(r'<img[^>]+src="([^"]*side_by_side[^"]*)"', dom)
        assert srcs, dom[:3000]
        with urllib.request.urlopen(f"{base}/{srcs[0].replace('&amp;', '&').lstrip('/')}", timeout=30) as r:
            served = r.read()  # what the page's <img> loads
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()
    client = MlflowClient(registry["uri"], registry["uri"])
    champ = client.get_model_version_by_alias(registry["name"], "champion")
    logged = Path(client.download_artifacts(champ.run_id, "plots/side_by_side.png", str(tmp_path)))
    assert served == logged.read_bytes() and served[:8] == b"\x89PNG\r\n\x1a\n"


def test_champion_sentence_cases_and_the_flows_panel_checkpoint(tmp_path):
    """The story's sentence for a learned champion, for the panel's own winner, and without a recorded baseline; the
    register stage hands the panel best's checkpoint (the free sampler.json its evaluation writes) to the picture."""
    from flows.distill import _panel_best
    from flows.config import load_sweep
    from flows.plan import plan_sweep
    from flows.registry.story import champion_sentence
    from flows.storage import RunStore

    proto = json.dumps({"metric": "fd_exact", "num_samples": 50000, "seed": 12345, "reference": "r"})
    tags = {"method": "amed+ipndm", "family": "amed", "nfe": "3", "metric": "fd_exact", "value": "0.0125",
            "baseline_solver": "dpmpp", "baseline_options": json.dumps({"schedule": "logsnr", "rho": 1.0, "afs": True,
                                                                        "max_order": 3}),
            "baseline_value": "0.05", "margin": "0.25", "protocol": proto, "protocol_hash": "0123456789abcdef"}
    assert champion_sentence(tags, "7") == (
        "v7 amed+ipndm (family amed) at NFE 3 is the champion: fd_exact 0.0125 against 0.05 for the best training-free "
        "sampler, dpmpp[logsnr,afs=True,max_order=3], 75.0 % lower (margin 0.25), under fd_exact on 50000 samples from "
        "seed 12345 (protocol 01234567).")
    free_tags = {**tags, "method": "dpmpp", "family": "free", "value": "0.05", "margin": "1.0"}
    assert champion_sentence(free_tags, "2") == (
        "v2 dpmpp (family free) at NFE 3 is the champion: no learned sampler beat the best training-free sampler, which "
        "is this one, dpmpp[logsnr,afs=True,max_order=3], with fd_exact 0.05 under fd_exact on 50000 samples from seed "
        "12345 (protocol 01234567).")
    old = {k: v for k, v in tags.items() if not k.startswith(("baseline", "margin"))}
    assert champion_sentence(old, "1").endswith("is the champion with fd_exact 0.0125 under fd_exact on 50000 samples "
                                                "from seed 12345 (protocol 01234567); no training-free baseline was "
                                                "recorded for it.")

    cfg = load_sweep({"name": "story", "datasets": [{"name": "digits", "teacher": "digits-gmm"}], "solvers": ["amed"],
                      "nfes": [3], "store_url": str(tmp_path / "store"),
                      "panel": {"entries": [{"solver": "ipndm"}, {"solver": "dpmpp"}]}})
    plan = plan_sweep(cfg)
    slot = plan.panel_for("digits", 3)
    store = RunStore(plan.store_url)
    best = _panel_best({"id": slot.entries[1], "solver": "dpmpp", "value": 0.5}, plan, store)
    job = next(b for b in plan.baselines if b.id == slot.entries[1])
    assert job.checkpoint and best["checkpoint_url"] == store.url_of(job.checkpoint)
    assert _panel_best({}, plan, store) == {}

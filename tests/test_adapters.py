"""Model adapters on small random networks saved to temporary folders (nothing is downloaded).

Each adapter is checked against its library's own forward pass: NVlabs-style EDM precond modules (a
stand-in ``training.networks`` written to a temporary "EDM checkout"), diffusers' EulerDiscreteScheduler
loop, and two separate conditional / unconditional calls for classifier-free guidance.
"""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from amed_core.adapters import (
    PreconditionedDenoiser,
    convert_edm_pickle,
    load_edm_pickle,
    load_network,
    save_network,
)
from amed_core.adapters.edm import NetworkConfig, Preconditioning
from amed_core.adapters import load_teacher
from amed_core.schedules import DiscreteVP
from amed_core.solvers import euler
from amed_core.tiny_unet import TinyUNet, TinyUNetConfig

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are tiny: one torch thread is as fast and avoids oversubscribing a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# -- a stand-in EDM checkout -----------------------------------------------------------------------------------
# NVlabs' training/networks.py defines persistent precond modules (EDMPrecond, VPPrecond, VEPrecond) around
# SongUNet/DhariwalUNet and records constructor kwargs (init_kwargs). This stand-in follows EDM's published
# formulas independently of amed_core's preconditioning code; its raw network is a TinyUNet.
FAKE_NETWORKS = '''
import numpy as np
import torch
from amed_core.tiny_unet import TinyUNet, TinyUNetConfig


class _Persistent(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.init_args = ()
        self.init_kwargs = dict(kwargs)


class SongUNet(_Persistent):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = TinyUNet(TinyUNetConfig(**kwargs))
        self.enc = self.inner.enc

    def forward(self, x, noise_labels, class_labels=None):
        return self.inner(x, noise_labels, class_labels)


class VPPrecond(_Persistent):
    def __init__(self, img_resolution, img_channels, label_dim=0, beta_d=19.9, beta_min=0.1, M=1000, **model_kwargs):
        super().__init__(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, M
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim]) if class_labels is None \\
            else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = self.model(c_in * x, c_noise.flatten().expand(x.shape[0]), class_labels=class_labels)
        return c_skip * x + c_out * F_x


class EDMPrecond(_Persistent):
    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, **model_kwargs):
        super().__init__(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = None if self.label_dim == 0 else torch.zeros([1, self.label_dim]) if class_labels is None \\
            else class_labels.to(torch.float32).reshape(-1, self.label_dim)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = self.model(c_in * x, c_noise.flatten().expand(x.shape[0]), class_labels=class_labels)
        return c_skip * x + c_out * F_x
'''


@pytest.fixture
def edm_checkout(tmp_path):
    """A temporary 'EDM checkout' with training/networks.py; removed from sys.path/sys.modules afterwards."""
    root = tmp_path / "edm-code"
    (root / "training").mkdir(parents=True)
    (root / "training" / "__init__.py").write_text("")
    (root / "training" / "networks.py").write_text(textwrap.dedent(FAKE_NETWORKS))
    yield root
    for name in [m for m in sys.modules if m == "training" or m.startswith("training.")]:
        del sys.modules[name]
    while str(root) in sys.path:
        sys.path.remove(str(root))


def _edm_pickle(edm_checkout, tmp_path, cls="VPPrecond", label_dim=0, seed=0) -> Path:
    sys.path.insert(0, str(edm_checkout))
    import importlib

    networks = importlib.import_module("training.networks")
    torch.manual_seed(seed)
    net = getattr(networks, cls)(img_resolution=8, img_channels=1, label_dim=label_dim, model_channels=8)
    with torch.no_grad():  # the zero-initialised output layer would hide everything
        net.model.inner.out_conv.weight.normal_(0, 0.3)
        net.model.inner.out_conv.bias.normal_(0, 0.1)
    path = tmp_path / f"edm-{cls}.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": net, "augment_pipe": None}, f)
    # forget the module so that loading has to find it again through edm_code_dir
    for name in [m for m in sys.modules if m == "training" or m.startswith("training.")]:
        del sys.modules[name]
    sys.path.remove(str(edm_checkout))
    return path


class _Boom:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.target),))


def test_untrusted_pickle_is_refused_before_unpickling(tmp_path):
    sentinel = tmp_path / "code-ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Boom(sentinel)}))
    for call in (lambda: load_edm_pickle(path), lambda: load_teacher(f"edm:{path}"),
                 lambda: convert_edm_pickle(path, tmp_path / "out")):
        with pytest.raises(ValueError, match="trust_pickle"):
            call()
    assert not sentinel.exists()
    # trusting it really does run the code (so the refusal above is what protected us)
    with pytest.raises(ValueError):
        load_edm_pickle(path, trust_pickle=True)
    assert sentinel.exists()


@pytest.mark.parametrize("cls,label_dim", [("VPPrecond", 0), ("EDMPrecond", 10)])
def test_edm_pickle_matches_its_own_forward_and_converts(edm_checkout, tmp_path, cls, label_dim):
    path = _edm_pickle(edm_checkout, tmp_path, cls, label_dim)
    with pytest.raises(ValueError, match="edm_code_dir"):
        load_edm_pickle(path, trust_pickle=True)  # EDM code not importable
    den = load_teacher(f"edm:{path}", trust_pickle=True, edm_code_dir=str(edm_checkout))
    assert den.shape == (1, 8, 8) and den.label_dim == label_dim and (den.sigma_min, den.sigma_max) == (0.002, 80.0)
    assert den.feature_layer == "enc.8x8_block0"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g) * 2.0
    sigma = torch.tensor([0.01, 0.7, 30.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4, 7]), 10).float() if label_dim else None
    with torch.no_grad():
        ref = den.net(x, sigma, labels)
        with den.capture_features() as tap:
            got = den(x.double(), sigma.double(), labels)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), ref)
    assert tap.value.shape == (3, 8, 8)
    assert not den.net.model.enc["8x8_block0"]._forward_hooks

    out = tmp_path / "converted"
    convert_edm_pickle(path, out, trust_pickle=True, edm_code_dir=edm_checkout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "nvlabs" and cfg["nvlabs_class"] == "SongUNet"
    assert cfg["precond"]["kind"] == {"VPPrecond": "vp", "EDMPrecond": "edm"}[cls]
    conv = load_teacher(f"edm-safetensors:{out}", edm_code_dir=str(edm_checkout))
    assert isinstance(conv, PreconditionedDenoiser)
    with torch.no_grad():
        with conv.capture_features() as tap2:
            got2 = conv(x, sigma, labels)
    torch.testing.assert_close(got2, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tap2.value, tap.value, rtol=1e-5, atol=1e-5)
    assert conv.identity()["content_sha256"] == den.identity()["content_sha256"]


def test_convert_cli(edm_checkout, tmp_path):
    from flows.cli import main

    path = _edm_pickle(edm_checkout, tmp_path, "VPPrecond")
    out = tmp_path / "cli-out"
    assert main(["convert", "--from", "edm-pickle", str(path), "--out", str(out), "--edm-code-dir", str(edm_checkout)]) == 2
    assert not out.exists()
    assert main(["convert", "--from", "edm-pickle", str(path), "--trust-pickle", "--out", str(out),
                 "--edm-code-dir", str(edm_checkout)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_preconditioning_table(kind):
    """Table 1 of EDM: D(x; s) -> x as s -> 0 for a bounded F, and the VP c_noise hits 0 at s(t=0)."""
    p = Preconditioning(kind=kind)
    s = torch.tensor([1e-4, 0.5, 10.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = p.coefficients(s)
    assert abs(c_skip[0] - 1) < 1e-6 and abs(c_out[0]) < 2e-4
    if kind == "edm":  # unit-variance training target: c_skip^2 sd^2 + c_out^2 ... = sd^2 (EDM eq. 7-8)
        sd = p.sigma_data
        torch.testing.assert_close(c_in**2 * (s**2 + sd**2), torch.ones_like(s))
        torch.testing.assert_close(c_out**2, (sd**2 * s**2) / (s**2 + sd**2))
    if kind == "vp":
        assert abs(p.coefficients(torch.tensor([1e-12], dtype=torch.float64))[3].item()) < 1e-6


def test_network_folder_round_trip_and_config_errors(tmp_path):
    cfg = NetworkConfig(arch="tiny-unet", kwargs=TinyUNetConfig(model_channels=8).to_dict(), shape=(1, 8, 8),
                        precond=Preconditioning(kind="ve"), sigma_min=0.01, sigma_max=50.0, name="t")
    den = PreconditionedDenoiser(TinyUNet(TinyUNetConfig(model_channels=8)), cfg)
    torch.nn.init.normal_(den.net.out_conv.weight, 0, 0.2)
    save_network(den, tmp_path / "n")
    back = load_network(tmp_path / "n")
    assert NetworkConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x, 3.0), den(x, 3.0))
    assert (back.sigma_min, back.sigma_max) == (0.01, 50.0)
    with pytest.raises(ValueError, match="feature_layer"):
        load_network(tmp_path / "n", feature_layer="enc.nope")
    with pytest.raises(ValueError, match="config.json"):
        load_network(tmp_path)
    with pytest.raises(ValueError, match="precond.kind"):
        Preconditioning(kind="iddpm")
    with pytest.raises(ValueError, match="arch"):
        NetworkConfig(arch="mystery", kwargs={}, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="no option"):
        load_teacher(f"tiny-unet:{tmp_path / 'n'}", guidance_scale=2.0)
    via_url = load_teacher("tiny-unet", weights_url=str(tmp_path / "n"))
    torch.testing.assert_close(via_url(x, 3.0), den(x, 3.0))
    with pytest.raises(ValueError, match="never downloads"):
        load_teacher("edm-safetensors", weights_url="https://example.invalid/model")


def test_diffusers_unet2d_network_in_edm_wrapper(tmp_path):
    """A diffusers UNet2DModel as the raw network of an EDM-preconditioned denoiser (safetensors round trip)."""
    kwargs = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
                  down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                  norm_num_groups=4)
    unet = diffusers.UNet2DModel(**kwargs)
    cfg = NetworkConfig(arch="diffusers-unet2d", kwargs=dict(unet.config), shape=(3, 16, 16))
    den = PreconditionedDenoiser(unet, cfg)
    save_network(den, tmp_path / "d")
    back = load_teacher(f"edm-safetensors:{tmp_path / 'd'}")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), back.capture_features() as tap:
        torch.testing.assert_close(back(x, 2.0), den(x, 2.0))
    assert tap.value.shape == (2, 8, 8) and back.feature_layer == "mid_block"


# -- diffusers ---------------------------------------------------------------------------------------------------


def _small_unet(cond: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    if cond:
        return diffusers.UNet2DConditionModel(
            in_channels=4, out_channels=4, cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **common).eval()
    return diffusers.UNet2DModel(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), **common).eval()


SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("unet2d")
    _small_unet().save_pretrained(root)
    (root / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **SCHED}))
    return root


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_euler_scheduler_agrees_with_our_euler(unet_folder, prediction_type):
    """diffusers' own EulerDiscreteScheduler loop == amed_core's Euler on the converted denoiser, same times."""
    den = load_teacher(f"diffusers:{unet_folder}", prediction_type=prediction_type)
    unet = den.unet
    sched = diffusers.EulerDiscreteScheduler(**SCHED, prediction_type=prediction_type)
    sched.set_timesteps(timesteps=[999, 800, 600, 400, 200, 50])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 16, 16, generator=g)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(out, t, x).prev_sample
        sigmas = sched.sigmas[:-1].double()  # the scheduler's last sigma is 0: our denoise_to_zero
        torch.testing.assert_close(den.timestep(sigmas).float(), sched.timesteps.float(), rtol=0, atol=2e-3)
        ours = euler(den, noise * sigmas[0].float(), sigmas, denoise_to_zero=True)
    assert ours.nfe == 6
    torch.testing.assert_close(ours.x, x, rtol=1e-4, atol=1e-4)
    assert float(sched.sigmas[0]) == pytest.approx(den.sigma_max, rel=1e-5)


def test_diffusers_sigma_table_and_features(unet_folder):
    den = load_teacher(f"diffusers:{unet_folder}")
    table = DiscreteVP(den.alphas_cumprod)
    s = torch.tensor([0.03, 0.5, 3.0, 14.0], dtype=torch.float64)
    np.testing.assert_allclose(den.sigma_to_t(s).numpy(), table.sigma_inv(s.numpy()), rtol=1e-10)
    ac = np.asarray(den.alphas_cumprod)
    idx = torch.tensor([0, 10, 500, 999])
    table_sigmas = torch.from_numpy(np.sqrt((1 - ac) / ac))[idx]
    torch.testing.assert_close(den.timestep(table_sigmas), idx.double(), rtol=0, atol=1e-6)
    assert den.sigma_min == pytest.approx(table.sigma_min) and den.sigma_max == pytest.approx(float(table_sigmas[-1]))
    x = torch.randn(3, 3, 16, 16)
    with den.capture_features() as tap:
        den(x, 1.0)
    assert tap.value.shape == (3, 8, 8)
    assert not den.unet.mid_block._forward_hooks
    with pytest.raises(RuntimeError):
        with den.capture_features():
            den(torch.randn(3, 5, 16, 16), 1.0)  # wrong channel count: the UNet raises inside the block
    assert not den.unet.mid_block._forward_hooks
    with pytest.raises(ValueError, match="feature_layer"):
        load_teacher(f"diffusers:{unet_folder}", feature_layer="no_such_block")


def test_cfg_batching_equals_two_calls(tmp_path):
    unet = _small_unet(cond=True, seed=1)
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 5, 8, generator=g)      # two prompts
    uncond = torch.randn(1, 5, 8, generator=g)
    ac = diffusers.DDPMScheduler(**SCHED).alphas_cumprod
    w = 4.0
    guided = diffusers_den(unet, ac, w, cond, uncond)
    only_c = diffusers_den(unet, ac, 1.0, cond, None)
    only_u = diffusers_den(unet, ac, 1.0, uncond.expand(2, -1, -1), None)
    x = torch.randn(3, 4, 16, 16, generator=g) * 3
    labels = torch.nn.functional.one_hot(torch.tensor([1, 0, 1]), 2).float()
    sigma = torch.tensor([3.0, 0.4, 7.0])
    with torch.no_grad():
        with guided.capture_features() as tap:
            d = guided(x, sigma, labels)
        with only_c.capture_features() as tap_c:
            d_c = only_c(x, sigma, labels)
        d_u = only_u(x, sigma, labels)
    torch.testing.assert_close(d, d_u + w * (d_c - d_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tap.value, tap_c.value, rtol=1e-4, atol=1e-4)
    assert tap.value.shape == (3, 8, 8)
    assert guided.label_dim == 2
    with pytest.raises(ValueError, match="class_labels"):
        guided(x, sigma)  # two prompts: which one?
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        diffusers_den(unet, ac, 2.0, cond, None)


def diffusers_den(unet, ac, w, cond, uncond):
    from amed_core.adapters.diffusers_adapter import DiffusersDenoiser

    return DiffusersDenoiser(unet, alphas_cumprod=ac, guidance_scale=w, prompt_embeds=cond, negative_prompt_embeds=uncond)


def _latent_pipeline(tmp_path):
    """A tiny latent pipeline folder (conditional UNet, v-prediction DDPM table, AutoencoderKL) and a prompt file."""
    from safetensors.torch import save_file

    root = tmp_path / "pipe"
    _small_unet(cond=True).save_pretrained(root / "unet")
    diffusers.DDPMScheduler(**SCHED, prediction_type="v_prediction").save_pretrained(root / "scheduler")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, sample_size=32)
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    emb = tmp_path / "prompts.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 5, 8), "negative_prompt_embeds": torch.zeros(1, 5, 8)}, str(emb))
    return root, vae, emb


def test_latent_pipeline_folder_decodes_lazily(tmp_path):
    root, vae, emb = _latent_pipeline(tmp_path)
    den = load_teacher(f"diffusers:{root}", prompt_embeds=str(emb), guidance_scale=7.5)
    assert den.prediction_type == "v_prediction" and den.is_latent and den._vae is None
    assert den.shape == (4, 16, 16) and den.label_dim == 0
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        x0 = den(x, 2.0)
    assert den._vae is None  # sampling never touches the VAE
    img = den.decode(x0)
    assert img.shape == (2, 3, 32, 32) and den._vae is not None
    with torch.no_grad():
        ref = vae.decode(x0 / vae.config.scaling_factor).sample
    torch.testing.assert_close(img, ref)
    ident = den.identity()
    assert ident["guidance_scale"] == 7.5 and len(ident["content_sha256"]) == 64


def test_latent_samples_are_decoded_for_fid_and_pictures(tmp_path):
    """score_run decodes a latent model's samples (its VAE) before FID features and for the picture grid; the
    metric is computed on exactly those images. Pixel models are untouched (to_images is the identity)."""
    from amed_core.evaluate import FIDSetup, score_run, to_images
    from amed_core.fid import FIDStats, to_uint8
    from amed_core.schedules import ScheduleSpec
    from amed_core.methods import solve

    root, vae, emb = _latent_pipeline(tmp_path)
    den = load_teacher(f"diffusers:{root}", prompt_embeds=str(emb), guidance_scale=2.0)
    sigmas = ScheduleSpec(sigma_min=float(den.sigma_min), sigma_max=float(den.sigma_max)).grid(3)
    states = []

    def run(noise, labels):
        res = solve("euler", den, noise.float() * sigmas[0].float(), sigmas.float())
        states.append(res.x)
        return res

    def net(u8):  # a fixed feature map of the uint8 images (the plumbing, not Inception, is under test)
        return torch.nn.functional.avg_pool2d(u8.float(), 8).flatten(1)

    ref = FIDStats.empty(48).update(net(torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(3))))
    res = score_run(run, den, seeds=range(4), batch_size=2, metric="fid", fid=FIDSetup(net, ref.mu, ref.sigma), keep=4)
    assert res.samples.shape == (4, 3, 32, 32)  # pictures, not (4, 4, 16, 16) latents
    with torch.no_grad():
        want = vae.decode(torch.cat(states) / vae.config.scaling_factor).sample.double()
    torch.testing.assert_close(res.samples, want, rtol=1e-5, atol=1e-5)
    assert res.value == pytest.approx(FIDStats.empty(48).update(net(to_uint8(res.samples))).fid(ref.mu, ref.sigma), rel=1e-6)
    x = torch.randn(2, 1, 8, 8)
    assert to_images(load_teacher("digits-gmm"), x) is x


def test_hub_id_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in your Hugging Face cache"):
        load_teacher("diffusers:someone/not-cached-model", cache_dir=str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="neither a local folder"):
        load_teacher(f"diffusers:{tmp_path / 'missing' / 'folder'}")


# -- the paper's presets ------------------------------------------------------------------------------------------

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "presets").glob("*.yaml"))


def test_presets_validate_and_follow_the_reference():
    from flows.config import load_sweep

    names = {p.stem for p in PRESETS}
    assert {"cifar10", "ffhq64", "imagenet64", "lsun_bedroom", "stable-diffusion"} <= names
    for p in PRESETS:
        cfg = load_sweep(p)
        d = cfg.datasets[0]
        assert d.weights_url.startswith("${AMED_") and d.teacher in ("edm-safetensors", "diffusers"), p.name
        assert cfg.evaluation.metric != "fd_exact" and cfg.sampler.afs is True
    sd = load_sweep(PRESETS[[p.stem for p in PRESETS].index("stable-diffusion")])
    assert sd.datasets[0].options["guidance_scale"] == 7.5 and sd.sampler.schedule_type == "discrete"
    assert (sd.sampler.max_order, sd.sampler.predict_x0, sd.sampler.scale_dir, sd.sampler.scale_time) == (2, False, 0.0, 0.2)
    assert (sd.train.batch_size, sd.teacher.num_trajectories, sd.teacher.M) == (32, 5000, 2)
    c10 = load_sweep(PRESETS[[p.stem for p in PRESETS].index("cifar10")])
    assert (c10.sampler.schedule_type, c10.sampler.schedule_rho, c10.teacher.solver, c10.teacher.M) == ("time_uniform", 1.0, "heun", 1)


def _spec_for(cfg, den, solver, nfe):
    """What the pipeline builds from a preset (with the model's VP table for discrete schedules)."""
    from amed_core.amed import SamplerSpec
    from amed_core.amed.predictor import PredictorConfig
    from amed_core.schedules import ScheduleSpec

    sc = cfg.sampler_for(solver)
    schedule = ScheduleSpec(sc.schedule_type, rho=sc.schedule_rho, sigma_min=float(den.sigma_min),
                            sigma_max=float(den.sigma_max), alphas_cumprod=getattr(den, "alphas_cumprod", None)
                            if sc.schedule_type == "discrete" else None)
    plugin = {}
    if solver in ("amed+ipndm", "amed+dpmpp"):
        plugin["max_order"] = sc.max_order
    if solver == "amed+dpmpp":
        plugin.update(predict_x0=sc.predict_x0, lower_order_final=sc.lower_order_final)
    return SamplerSpec.create(solver, nfe, afs=sc.afs_for(nfe), schedule=schedule, denoiser=den,
                              predictor=PredictorConfig(scale_dir=sc.scale_dir, scale_time=sc.scale_time), **plugin)


def test_presets_resolve_small_random_networks_of_the_same_classes(edm_checkout, tmp_path, monkeypatch):
    """Each preset's teacher entry loads a small random network of its class through $AMED_* and samples with AMED."""
    from safetensors.torch import save_file

    from amed_core.amed import AMEDPredictor
    from amed_core.amed.checkpoint import Sampler
    from flows.config import load_sweep

    # EDM presets: a converted (nvlabs-arch) network; the EDM code found on sys.path, as PYTHONPATH would provide
    pkl = _edm_pickle(edm_checkout, tmp_path, "VPPrecond")
    convert_edm_pickle(pkl, tmp_path / "edm", trust_pickle=True, edm_code_dir=edm_checkout)
    # LDM preset: unet/ + vqvae/ + scheduler/; SD preset: a pipeline folder + a prompts file encoded ... by embeddings
    ldm = tmp_path / "ldm"
    _small_unet().save_pretrained(ldm / "unet")
    diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                            beta_schedule="scaled_linear").save_pretrained(ldm / "scheduler")
    diffusers.VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8,), norm_num_groups=4,
                      num_vq_embeddings=16, vq_embed_dim=3).save_pretrained(ldm / "vqvae")
    (ldm / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline"}))
    sd = tmp_path / "sd"
    _small_unet(cond=True).save_pretrained(sd / "unet")
    diffusers.PNDMScheduler(**SCHED).save_pretrained(sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    emb = tmp_path / "coco.safetensors"
    save_file({"prompt_embeds": torch.randn(3, 5, 8), "negative_prompt_embeds": torch.randn(1, 5, 8)}, str(emb))
    for var in ("CIFAR10", "FFHQ64", "IMAGENET64"):
        monkeypatch.setenv(f"AMED_{var}_WEIGHTS", str(tmp_path / "edm"))
    monkeypatch.setenv("AMED_LSUN_BEDROOM_WEIGHTS", str(ldm))
    monkeypatch.setenv("AMED_SD_WEIGHTS", str(sd))
    sys.path.insert(0, str(edm_checkout))
    noise = torch.randn(2, 1, 1, 1)
    for p in PRESETS:
        cfg = load_sweep(p)
        d = cfg.datasets[0]
        opts = d.load_kwargs()
        if p.stem == "stable-diffusion":  # prompts come from a file the test cannot ship: same bank as embeddings
            opts.pop("prompts")
            opts.pop("max_prompts")
            opts.update(prompt_embeds=str(emb), dtype="float32")
        den = load_teacher(d.teacher, **opts)
        for solver in cfg.solvers:
            spec = _spec_for(cfg, den, solver, 5)
            sampler = Sampler(spec, AMEDPredictor(spec.predictor, seed=0))
            labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), den.label_dim).float() if den.label_dim else None
            out = sampler(den, noise * torch.randn(2, *den.shape), labels)
            assert out.nfe == 5 and out.x.shape == (2, *den.shape) and torch.isfinite(out.x).all(), p.name
    monkeypatch.delenv("AMED_SD_WEIGHTS")
    with pytest.raises(ValueError, match="AMED_SD_WEIGHTS is not set"):
        load_teacher("diffusers", weights_url="${AMED_SD_WEIGHTS}")


def test_read_prompts(tmp_path):
    from amed_core.adapters.diffusers_adapter import read_prompts

    (tmp_path / "p.csv").write_text('id,text\n1,"a cat, sitting"\n2,a dog\n3,\n4,a bird\n')
    assert read_prompts(tmp_path / "p.csv") == ["a cat, sitting", "a dog", "a bird"]
    assert read_prompts(tmp_path / "p.csv", 2) == ["a cat, sitting", "a dog"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "bad.csv").write_text("id,words\n1,x\n")
    with pytest.raises(ValueError, match="caption"):
        read_prompts(tmp_path / "bad.csv")


def _tiny_sd_pipeline(transformers, root: Path):
    """A tiny random Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, CLIP text encoder + tokenizer)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (root / "tok-src").mkdir(parents=True)
    (root / "tok-src" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok-src" / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(root / "tok-src" / "vocab.json"), str(root / "tok-src" / "merges.txt"),
                                     model_max_length=5)
    torch.manual_seed(0)
    enc = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=5, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, sample_size=32)
    sched = diffusers.EulerDiscreteScheduler(**SCHED, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=_small_unet(cond=True, seed=2),
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "sd")
    return pipe, tok, enc


def test_prompts_are_encoded_by_the_pipelines_text_encoder(tmp_path):
    """prompts=[...] (or a .txt/.csv) go through the pipeline's own CLIP tokenizer + text encoder, once."""
    transformers = pytest.importorskip("transformers")
    _, tok, enc = _tiny_sd_pipeline(transformers, tmp_path)
    root = tmp_path / "sd"
    (tmp_path / "prompts.txt").write_text("a cat\nred dog\nthird one\n")
    den = load_teacher(f"diffusers:{root}", prompts=str(tmp_path / "prompts.txt"), max_prompts=2, guidance_scale=3.0)
    assert den.prompts == ("a cat", "red dog") and den.label_dim == 2
    with torch.no_grad():
        ids = tok(["a cat", "red dog", ""], padding="max_length", max_length=5, truncation=True, return_tensors="pt").input_ids
        want = enc(ids)[0]
    torch.testing.assert_close(den.prompt_embeds, want[:2])
    torch.testing.assert_close(den.negative_prompt_embeds, want[2:])
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(den(x, 1.0, torch.tensor([1, 0]))).all()
    assert den.identity()["prompts"] == ["a cat", "red dog"]


def test_stable_diffusion_pipeline_agrees_with_our_euler(tmp_path):
    """diffusers' own StableDiffusionPipeline (CFG 5, Euler, 4 steps) == our Euler on the converted denoiser."""
    transformers = pytest.importorskip("transformers")
    pipe, _, _ = _tiny_sd_pipeline(transformers, tmp_path)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        theirs = pipe(prompt="a cat", timesteps=[999, 700, 400, 100], guidance_scale=5.0, latents=noise.clone(),
                      height=32, width=32, output_type="latent").images
    den = load_teacher(f"diffusers:{tmp_path / 'sd'}", prompts=["a cat"], guidance_scale=5.0)
    assert den.is_latent and den.label_dim == 0
    sigmas = pipe.scheduler.sigmas[:-1].double()
    with torch.no_grad():
        ours = euler(den, noise * sigmas[0].float(), sigmas, denoise_to_zero=True)
    assert ours.nfe == 4
    torch.testing.assert_close(ours.x, theirs, rtol=1e-4, atol=1e-4)


def test_plan_sweep_gives_discrete_schedules_the_models_table(tmp_path):
    """A diffusers teacher with schedule_type 'discrete' plans with its own VP table (sigma range and grid)."""
    from amed_core.schedules import ScheduleSpec
    from flows.config import load_sweep
    from flows.plan import plan_sweep

    folder = tmp_path / "ddpm"
    _small_unet().save_pretrained(folder / "unet")
    diffusers.DDIMScheduler(**SCHED).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    cfg = load_sweep({
        "name": "discrete-plan",
        "datasets": [{"name": "ddpm", "teacher": "diffusers", "weights_url": str(folder)}],
        "solvers": ["amed+dpmpp"], "nfes": [5], "seeds": [0],
        "sampler": {"schedule_type": "discrete", "schedule_rho": 1.0, "afs": "auto"},
        "evaluation": {"metric": "rmse", "num_samples": 8},
        "store_url": str(tmp_path / "store"), "register_models": False, "init": {"mode": "recipe"},
    })
    plan = plan_sweep(cfg)
    den = load_teacher("diffusers", weights_url=str(folder))
    job = plan.candidates[0].model_dump()
    schedules = list(_schedules_in(job))
    assert schedules, "the planned job carries its schedule"
    expected = ScheduleSpec("discrete", den.sigma_min, den.sigma_max, 1.0,
                            alphas_cumprod=tuple(float(a) for a in den.alphas_cumprod)).grid(4)
    for sched in schedules:
        got = ScheduleSpec.from_dict(sched).grid(4)
        assert torch.allclose(got, expected, rtol=1e-12, atol=0)


def _schedules_in(obj):
    if isinstance(obj, dict):
        if obj.get("schedule_type") == "discrete" and obj.get("alphas_cumprod"):
            yield obj
        for v in obj.values():
            yield from _schedules_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _schedules_in(v)

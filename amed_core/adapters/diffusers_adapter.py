"""diffusers UNets (UNet2DModel, UNet2DConditionModel) as EDM-form denoisers, with classifier-free guidance.

(Over 400 lines on purpose: one job, diffusers models as denoisers; the class and its loader share the scheduler,
prediction-type and prompt conventions below, and splitting them would spread one model format over two files.)

A discrete VP model is trained on x_t = alpha_i x0 + sigma_i^VP eps at i = 0..T-1 with
alphas_cumprod[i] = alpha_i^2. In EDM's variables x = x_t / alpha (so x = x0 + sigma n) with
sigma = sqrt(1 - alpha^2) / alpha; the continuous VP time t(sigma) comes from
:class:`amed_core.schedules.DiscreteVP` (log alpha piecewise linear in t_i = (i+1)/T), and the UNet sees
timestep c_noise = T t(sigma) - 1 (= i exactly at the table's own sigmas) and input x / sqrt(1 + sigma^2).
With a = 1/sqrt(1+s^2) (= alpha) and b = s/sqrt(1+s^2) (= sigma^VP), each parameterization converts once:

    epsilon:       D = x - s eps
    v_prediction:  D = a^2 x - b v          (v = a eps - b x0)
    sample:        D = x0_pred

UNets with learned variance (ADM / guided-diffusion conversions, ``out_channels = 2 C``) keep the first C channels.

Classifier-free guidance (Ho & Salimans 2022): out = out_u + w (out_c - out_u), conditional and
unconditional halves in one batched call ``[uncond; cond]``; AMED (Zhou et al. 2024, arXiv 2312.00094)
reads its features from the conditional half, as the reference does. Prompts are a bank of P embeddings;
``class_labels`` (one-hot (B, P) or indices (B,)) pick a prompt per sample, so teacher shards, the
pipeline and the solvers see an ordinary label-conditional denoiser. Latent models keep their VAE unloaded
until :meth:`DiffusersDenoiser.decode` is called.

Loading never downloads: a local folder, or a hub id already in the user's cache (``local_files_only``).
diffusers (and transformers, for text prompts) are imported only here, inside the functions.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..base_denoiser import BaseDenoiser, pool_features
from ..schedules import DiscreteVP
from ._common import cached_state_dict_sha256, first_tensor, module_dtype

__all__ = ["DiffusersDenoiser", "load_diffusers", "read_prompts", "PREDICTION_TYPES", "alphas_cumprod_from_scheduler_config"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ValueError("diffusers models need the optional dependency: pip install 'amed-distill[models]'") from None
    return diffusers


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation on increasing xp, extrapolating with the end segments (torch, float64)."""
    idx = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, xp.numel() - 2)
    x0, x1, y0, y1 = xp[idx], xp[idx + 1], fp[idx], fp[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class DiffusersDenoiser(BaseDenoiser):
    """Wraps a diffusers UNet + its VP table into ``D(x, sigma, class_labels)`` (see the module docstring).

    Keyword options: ``prediction_type``, ``guidance_scale`` (w; 1 = no guidance), ``prompt_embeds``
    (P, L, E) and ``negative_prompt_embeds`` (1 or P, L, E) for UNet2DConditionModel, ``feature_layer``
    (dotted module path; ``mid_block`` as in the reference), ``vae`` / ``vae_loader`` and
    ``vae_scaling_factor`` for latent models, ``epsilon_t`` (smallest VP time, 1e-3 as in the reference).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        alphas_cumprod: Sequence[float] | np.ndarray | torch.Tensor,
        prediction_type: str = "epsilon",
        guidance_scale: float = 1.0,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        feature_layer: str = "mid_block",
        vae: torch.nn.Module | None = None,
        vae_loader: Callable[[], torch.nn.Module] | None = None,
        vae_scaling_factor: float | None = None,
        epsilon_t: float = 1e-3,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        name: str = "diffusers",
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.unet = unet
        self.name = name
        self.prediction_type = prediction_type
        self.guidance_scale = float(guidance_scale)
        self.prompts = tuple(prompts) if prompts is not None else None
        table = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
        self.table = DiscreteVP(tuple(float(a) for a in table), epsilon_t=float(epsilon_t))
        self.alphas_cumprod = self.table.alphas_cumprod
        self.num_train_timesteps = len(self.alphas_cumprod)
        tt, la = self.table._tables
        # -log alpha is increasing in t: sigma -> t inverts it piecewise linearly (float64 buffers)
        self.register_buffer("_neg_log_alpha", torch.from_numpy(-la.copy()), persistent=False)
        self.register_buffer("_t_table", torch.from_numpy(tt.copy()), persistent=False)
        self.sigma_min = float(self.table.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(self.table.sigma_max if sigma_max is None else sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be positive and below sigma_max ({self.sigma_max})")

        cfg = getattr(unet, "config", None)
        if cfg is None:
            raise ValueError(f"{type(unet).__name__} has no diffusers config: pass a UNet2DModel or UNet2DConditionModel")
        self.text_conditional = getattr(cfg, "cross_attention_dim", None) is not None and type(unet).__name__ != "UNet2DModel"
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.shape = (int(cfg.in_channels), int(size), int(size))
        # pixel UNets are trained on images in [-1, 1] (diffusers' convention); latents' range is not declared
        self.data_range = None if vae is not None or vae_loader is not None or self.text_conditional else (-1.0, 1.0)
        if self.text_conditional:
            if prompt_embeds is None:
                raise ValueError("a UNet2DConditionModel needs prompt_embeds (P, L, E) or prompts=[...] with a pipeline folder")
            prompt_embeds = torch.as_tensor(prompt_embeds)
            if prompt_embeds.ndim != 3:
                raise ValueError(f"prompt_embeds must be (P, L, E), got shape {tuple(prompt_embeds.shape)}")
            if self.guidance_scale != 1.0:
                if negative_prompt_embeds is None:
                    raise ValueError("guidance_scale != 1 needs negative_prompt_embeds (the unconditional embedding)")
                negative_prompt_embeds = torch.as_tensor(negative_prompt_embeds)
                if negative_prompt_embeds.ndim != 3 or negative_prompt_embeds.shape[0] not in (1, prompt_embeds.shape[0]) \
                        or negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
                    raise ValueError(f"negative_prompt_embeds must be (1 or P, L, E) matching prompt_embeds {tuple(prompt_embeds.shape)}, "
                                     f"got {tuple(negative_prompt_embeds.shape)}")
            self.register_buffer("prompt_embeds", prompt_embeds.detach().clone(), persistent=False)
            self.register_buffer("negative_prompt_embeds", None if negative_prompt_embeds is None
                                 else negative_prompt_embeds.detach().clone(), persistent=False)
            self.label_dim = int(prompt_embeds.shape[0]) if prompt_embeds.shape[0] > 1 else 0
        else:
            if prompt_embeds is not None or prompts is not None:
                raise ValueError(f"{type(unet).__name__} takes no prompts (prompt_embeds/prompts are for UNet2DConditionModel)")
            if self.guidance_scale != 1.0:
                raise ValueError("guidance_scale applies to text-conditional UNets only; leave it at 1.0")
            self.prompt_embeds = None
            self.negative_prompt_embeds = None
            self.label_dim = int(getattr(cfg, "num_class_embeds", None) or 0)
        self.feature_layer = feature_layer
        self._feature_module()  # fail early on a bad name
        self.feature_source = f"diffusers:{feature_layer}"
        self._vae = vae
        self._vae_loader = vae_loader
        self.vae_scaling_factor = vae_scaling_factor
        self.is_latent = vae is not None or vae_loader is not None
        self._cfg_batched: set[int] = set()  # threads inside a batched [uncond; cond] call (features: cond half)

    # -- sigma <-> VP time ----------------------------------------------------------------------------
    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous VP time t(sigma) in (0, 1] (float64): log alpha = -log(1 + sigma^2) / 2 inverted on the table."""
        s = sigma.to(torch.float64)
        target = 0.5 * torch.log1p(s * s)
        return _interp(target, self._neg_log_alpha.to(s.device), self._t_table.to(s.device))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The UNet's timestep input c_noise = T t(sigma) - 1 (the table index at the table's own sigmas)."""
        return self.num_train_timesteps * self.sigma_to_t(sigma) - 1

    # -- protocol -------------------------------------------------------------------------------------
    def _conditioning(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Per-sample prompt embeddings (B, L, E) chosen by class_labels (one-hot / probabilities or indices)."""
        P = self.prompt_embeds.shape[0]
        if class_labels is None:
            if P != 1:
                raise ValueError(f"{P} prompts are loaded: pass class_labels (B, {P}) one-hot or (B,) indices to pick one per sample")
            idx = torch.zeros(batch, dtype=torch.long, device=self.prompt_embeds.device)
        elif class_labels.is_floating_point() and class_labels.ndim == 2:
            idx = class_labels.argmax(dim=1).to(self.prompt_embeds.device)
        elif class_labels.ndim == 1 and not class_labels.is_floating_point():
            idx = class_labels.long().to(self.prompt_embeds.device)
        else:
            raise ValueError(f"class_labels must be one-hot (B, {P}) or indices (B,), got shape {tuple(class_labels.shape)}")
        if idx.numel() != batch or int(idx.max()) >= P or int(idx.min()) < 0:
            raise ValueError(f"class_labels select prompts outside 0..{P - 1} or disagree with the batch size {batch}")
        return self.prompt_embeds[idx]

    def _unconditioning(self, idx_like: torch.Tensor, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        neg = self.negative_prompt_embeds
        if neg.shape[0] == 1:
            return neg.expand(batch, *neg.shape[1:])
        if class_labels is None:
            return neg.expand(batch, *neg.shape[1:])
        idx = class_labels.argmax(dim=1) if class_labels.is_floating_point() else class_labels.long()
        return neg[idx.to(neg.device)]

    def _model_output(self, x_in: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        B = x_in.shape[0]
        if not self.text_conditional:
            idx = None
            if self.label_dim:
                if class_labels is None:
                    raise ValueError(f"this UNet is class-conditional ({self.label_dim} classes): pass class_labels")
                idx = class_labels.argmax(dim=1) if class_labels.is_floating_point() else class_labels.long()
            return self.unet(x_in, timestep, class_labels=idx).sample
        cond = self._conditioning(class_labels, B).to(x_in.dtype)
        if self.guidance_scale == 1.0:
            return self.unet(x_in, timestep, encoder_hidden_states=cond).sample
        uncond = self._unconditioning(cond, class_labels, B).to(x_in.dtype)
        self._cfg_batched.add(threading.get_ident())
        try:
            out = self.unet(torch.cat([x_in, x_in]), torch.cat([timestep, timestep]),
                            encoder_hidden_states=torch.cat([uncond, cond])).sample
        finally:
            self._cfg_batched.discard(threading.get_ident())
        out_u, out_c = out.chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_in = 1 / torch.sqrt(1 + s * s)
        dtype = module_dtype(self.unet)
        timestep = self.timestep(sigma).to(dtype=torch.float32)
        out = self._model_output((c_in * x).to(dtype), timestep, class_labels).to(x.dtype)
        if out.shape[1] == 2 * x.shape[1]:  # learned variance (ADM / guided-diffusion): the first C channels are the mean's
            out = out[:, : x.shape[1]]
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return c_in * c_in * x - s * c_in * out
        return out

    def _feature_module(self) -> torch.nn.Module:
        try:
            return self.unet.get_submodule(self.feature_layer)
        except AttributeError:
            raise ValueError(f"feature_layer {self.feature_layer!r} is not a module of {type(self.unet).__name__} "
                             "(try 'mid_block' or e.g. 'down_blocks.1')") from None

    def _emit_features(self, feature_map) -> None:  # type: ignore[override]
        if self._capturing():
            fm = first_tensor(feature_map)
            if threading.get_ident() in self._cfg_batched:  # [uncond; cond]: AMED reads the conditional half
                fm = fm[fm.shape[0] // 2:]
            value = pool_features(fm.detach().float())
            self._deliver(value)

    def identity(self) -> dict:
        ident = {
            "adapter": "diffusers",
            "name": self.name,
            "unet_class": type(self.unet).__name__,
            "prediction_type": self.prediction_type,
            "feature_layer": self.feature_layer,
            "content_sha256": cached_state_dict_sha256(self, self.unet),
            "shape": list(self.shape),
        }
        if self.text_conditional:
            ident["guidance_scale"] = self.guidance_scale
            ident["prompts"] = list(self.prompts) if self.prompts is not None else None
            import hashlib

            h = hashlib.sha256()
            for t in (self.prompt_embeds, self.negative_prompt_embeds):
                if t is not None:
                    h.update(t.detach().float().cpu().numpy().tobytes())
            ident["prompt_embeds_sha256"] = h.hexdigest()
        return ident

    # -- latent models ---------------------------------------------------------------------------------
    @property
    def vae(self) -> torch.nn.Module | None:
        if self._vae is None and self._vae_loader is not None:
            self._vae = self._vae_loader()
        return self._vae

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from denoised states (the VAE decoder for latent models; identity otherwise)."""
        vae = self.vae
        if vae is None:
            return x0
        scale = self.vae_scaling_factor if self.vae_scaling_factor is not None else getattr(vae.config, "scaling_factor", 1.0)
        vae = vae.to(x0.device)
        return vae.decode((x0 / scale).to(module_dtype(vae))).sample.to(x0.dtype)


# -- loading from folders / the user's hub cache --------------------------------------------------------------


def alphas_cumprod_from_scheduler_config(config: dict) -> tuple[np.ndarray, str]:
    """(alphas_cumprod, prediction_type) of any diffusers scheduler config (betas as DDPMScheduler computes them)."""
    diffusers = _import_diffusers()
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr")
    sched = diffusers.DDPMScheduler.from_config({k: v for k, v in config.items() if k in keys})
    ac = sched.alphas_cumprod.double().numpy()
    if ac[-1] <= 0:
        raise ValueError("the scheduler's last alphas_cumprod is 0 (zero terminal SNR): sigma_max is infinite; "
                         "set rescale_betas_zero_snr=False or pass sigma_max")
    return ac, str(config.get("prediction_type", "epsilon"))


def _resolve_root(path_or_id: str, *, local_files_only: bool, cache_dir: str | None) -> Path:
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise ValueError(f"diffusers model {path_or_id!r} is neither a local folder nor a hub id 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - diffusers depends on it
        raise ValueError("hub ids need huggingface_hub (installed with diffusers)") from None
    try:
        return Path(snapshot_download(path_or_id, local_files_only=local_files_only, cache_dir=cache_dir))
    except Exception as e:  # LocalEntryNotFoundError and friends
        raise ValueError(
            f"{path_or_id!r} is not a local folder and not in your Hugging Face cache ({type(e).__name__}); download it "
            f"yourself first (e.g. `hf download {path_or_id}`) or pass an existing folder; amed never downloads weights"
        ) from None


def _read_json(p: Path) -> dict:
    from ..io import parse_json, read_limited

    try:  # a regular file, size checked before reading, shallow UTF-8 JSON (amed_core.io)
        return parse_json(read_limited(p, 1 << 20, what=str(p)), str(p))
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e}") from None


def read_prompts(path: str | Path, max_prompts: int | None = None) -> list[str]:
    """Prompts from a text file (one per line) or a CSV with a ``caption`` / ``text`` / ``prompt`` column (e.g. the
    reference's MS-COCO_val2014_30k_captions.csv); the first ``max_prompts``, in file order."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"prompts file {path} has no rows")
        col = next((c for c in ("caption", "text", "prompt") if c in rows[0]), None)
        if col is None:
            raise ValueError(f"prompts CSV {path} needs a 'caption', 'text' or 'prompt' column (has {sorted(rows[0])})")
        prompts = [r[col].strip() for r in rows if r[col] and r[col].strip()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts[:max_prompts] if max_prompts else prompts


def _encode_prompts(root: Path, prompts: Sequence[str], negative_prompt: str, *, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP text embeddings (P, 77, E) and the negative/unconditional one (1, 77, E) from the pipeline's encoder."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise ValueError("prompts need transformers: pip install transformers (or pass prompt_embeds)") from None
    tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    enc = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True).to(device).eval()

    def embed(texts):
        ids = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return enc(ids.to(device))[0].to(dtype)

    return embed(prompts), embed([negative_prompt])


def load_diffusers(
    path_or_id: str,
    *,
    subfolder: str | None = None,
    guidance_scale: float = 1.0,
    prompts: Sequence[str] | str | None = None,
    max_prompts: int | None = 1024,
    negative_prompt: str = "",
    prompt_embeds: torch.Tensor | str | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    prediction_type: str | None = None,
    feature_layer: str = "mid_block",
    local_files_only: bool = True,
    cache_dir: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    epsilon_t: float = 1e-3,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> DiffusersDenoiser:
    """Load a diffusers pipeline folder (``model_index.json``: unet/, scheduler/, vae/, text_encoder/, tokenizer/)
    or a bare UNet folder (``config.json`` + ``scheduler_config.json`` beside it, or in ``scheduler/``).

    ``prompt_embeds`` may be a tensor or a safetensors file with ``prompt_embeds`` (P, L, E) and
    ``negative_prompt_embeds`` (1, L, E); ``prompts`` (a list, one prompt, or a .txt/.csv file, first
    ``max_prompts`` kept) needs transformers and the pipeline's text encoder. Each sample's prompt is picked by its
    class label (the teacher draws them uniformly), so P prompts act as P classes.
    """
    diffusers = _import_diffusers()
    root = _resolve_root(path_or_id, local_files_only=local_files_only, cache_dir=cache_dir)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    is_pipeline = (root / "model_index.json").is_file()
    unet_dir = root / (subfolder or ("unet" if is_pipeline else ""))
    unet_cfg_path = unet_dir / "config.json"
    if not unet_cfg_path.is_file():
        raise ValueError(f"{unet_dir} has no config.json: pass a diffusers pipeline folder or a UNet folder (subfolder=...)")
    cls_name = _read_json(unet_cfg_path).get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"{unet_dir} holds a {cls_name}; supported: UNet2DModel, UNet2DConditionModel")
    unet = getattr(diffusers, cls_name).from_pretrained(str(unet_dir), local_files_only=True, torch_dtype=dtype)
    unet.requires_grad_(False).eval()
    sched_cfg = None
    for cand in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json", root / "scheduler_config.json"):
        if cand.is_file():
            sched_cfg = _read_json(cand)
            break
    if sched_cfg is None:
        raise ValueError(f"no scheduler_config.json found for {root} (looked in scheduler/, the UNet folder and the root)")
    alphas_cumprod, pred = alphas_cumprod_from_scheduler_config(sched_cfg)
    vae_loader = None
    scaling = None
    vae_dir = next((root / n for n in ("vae", "vqvae") if (root / n / "config.json").is_file()), None) if is_pipeline else None
    if vae_dir is not None:  # latent model: AutoencoderKL (Stable Diffusion) or VQModel (LDM), loaded on first decode
        vae_cfg = _read_json(vae_dir / "config.json")
        scaling = float(vae_cfg.get("scaling_factor", 0.18215 if vae_dir.name == "vae" else 1.0))
        vae_cls = getattr(diffusers, vae_cfg.get("_class_name", "AutoencoderKL"), diffusers.AutoencoderKL)

        def vae_loader():
            return vae_cls.from_pretrained(str(vae_dir), local_files_only=True, torch_dtype=dtype).requires_grad_(False).eval()

    if isinstance(prompts, (str, Path)):
        p = Path(prompts).expanduser()
        prompts = read_prompts(p, max_prompts) if p.suffix.lower() in (".txt", ".csv") else [str(prompts)]
    elif prompts is not None:
        prompts = list(prompts)[:max_prompts] if max_prompts else list(prompts)
    if isinstance(prompt_embeds, (str, Path)):
        from safetensors.torch import load_file

        emb = load_file(str(prompt_embeds))
        if "prompt_embeds" not in emb:
            raise ValueError(f"{prompt_embeds} must hold 'prompt_embeds' (P, L, E) and optionally 'negative_prompt_embeds'")
        prompt_embeds = emb["prompt_embeds"]
        negative_prompt_embeds = emb.get("negative_prompt_embeds", negative_prompt_embeds)
    if cls_name == "UNet2DConditionModel" and prompt_embeds is None:
        if not prompts:
            raise ValueError("a text-conditional model needs prompts=[...] (or prompt_embeds)")
        if not is_pipeline:
            raise ValueError("prompts need a pipeline folder with text_encoder/ and tokenizer/ (or pass prompt_embeds)")
        prompt_embeds, negative_prompt_embeds = _encode_prompts(root, prompts, negative_prompt, device="cpu",
                                                                dtype=dtype or torch.float32)
    den = DiffusersDenoiser(
        unet, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type or pred, guidance_scale=guidance_scale,
        prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, prompts=prompts,
        feature_layer=feature_layer, vae_loader=vae_loader, vae_scaling_factor=scaling, epsilon_t=epsilon_t,
        sigma_min=sigma_min, sigma_max=sigma_max, name=str(path_or_id),
    )
    return den.to(device) if device is not None else den

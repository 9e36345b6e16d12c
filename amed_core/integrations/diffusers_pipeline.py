"""A sampler of any family inside a diffusers pipeline: :func:`sample_with`.

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder)                     # the model the champion was distilled on
    images = sample_with(pipe, load_sampler("models:/amed-sd-nfe5@champion"), prompt="a photo of a cat",
                         generator=torch.Generator().manual_seed(0)).images   # PIL images, as pipe(...) returns

It does what the pipeline's ``__call__`` does, with the pipeline's own parts, except its denoising loop: the prompt
through ``pipe.encode_prompt`` (classifier-free guidance when ``guidance_scale > 1``, as the pipeline decides), the
initial noise drawn as the pipeline draws it (``randn_tensor`` with the given ``generator``, or ``latents=``), then the
sampler on :class:`~amed_core.adapters.diffusers_adapter.DiffusersDenoiser` (the pipeline's UNet on the VP table of
its scheduler's config, eps / v / sample prediction), then the pipeline's own VAE decode, safety checker and
``image_processor.postprocess`` (Stable Diffusion 1.x/2.x) or its ``(x / 2 + 0.5).clamp(0, 1)`` and ``numpy_to_pil``
(DDPM-style unconditional pipelines: ``DDPMPipeline``, ``DDIMPipeline``, ``PNDMPipeline``). It returns what the
pipeline returns (``StableDiffusionPipelineOutput`` / ``ImagePipelineOutput``; a tuple with ``return_dict=False``).
The UNet is called once per evaluation of the sampler (guidance batches both halves into one call): its NFE.

Why not the pipeline's own loop: its timesteps are fixed before the loop and shared by the batch, while AMED picks an
intermediate time per step and per sample, and EPD evaluates K points per step; only a pure schedule (free, GITS)
fits a scheduler, which :mod:`amed_core.integrations.schedule` exports for ``pipe(..., sigmas=...)``.

Departures from the pipeline, on purpose: the final state is the one at the sampler's last time point (its
``sigma_min``, what the champion was scored on), where the pipeline's schedulers denoise to sigma 0; the sampler's
arithmetic runs in float32 (``dtype=``) even for a half-precision UNet (the UNet itself runs in its own dtype).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["sample_with", "pipeline_denoiser", "pipeline_kind", "SUPPORTED_PIPELINES"]

SUPPORTED_PIPELINES = ("StableDiffusionPipeline (1.x/2.x)", "DDPMPipeline", "DDIMPipeline", "PNDMPipeline")


def pipeline_kind(pipe) -> str:
    """``"text"`` (Stable Diffusion 1.x/2.x-style: UNet2DConditionModel, encode_prompt, VAE, image_processor) or
    ``"unconditional"`` (a UNet2DModel in pixel space); ValueError naming ``pipe`` for anything else."""
    unet = getattr(pipe, "unet", None)
    cls = type(unet).__name__
    if cls == "UNet2DConditionModel" and all(hasattr(pipe, a) for a in ("encode_prompt", "vae", "image_processor")):
        if getattr(unet.config, "addition_embed_type", None):  # SDXL and friends need added conditioning
            raise ValueError(f"pipe: {type(pipe).__name__} needs added conditioning ({unet.config.addition_embed_type}); "
                             f"supported: {', '.join(SUPPORTED_PIPELINES)}")
        return "text"
    if cls == "UNet2DModel" and not any(getattr(pipe, a, None) is not None for a in ("vae", "vqvae")):
        return "unconditional"
    raise ValueError(f"pipe: {type(pipe).__name__} (unet {cls}) is not supported; supported: "
                     f"{', '.join(SUPPORTED_PIPELINES)}")


def pipeline_denoiser(pipe, *, feature_layer: str = "mid_block", guidance_scale: float = 1.0,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      name: str | None = None):
    """The pipeline's UNet as our denoiser (:class:`DiffusersDenoiser`): the VP table and prediction type of its
    scheduler's config; for text pipelines a bank of ``prompt_embeds`` (P, L, E) picked per sample by class label."""
    from ..adapters.diffusers_adapter import DiffusersDenoiser

    alphas_cumprod, prediction = _vp_table(pipe.scheduler)
    den = DiffusersDenoiser(pipe.unet, alphas_cumprod=alphas_cumprod, prediction_type=prediction,
                            guidance_scale=guidance_scale, prompt_embeds=prompt_embeds,
                            negative_prompt_embeds=negative_prompt_embeds, feature_layer=feature_layer,
                            name=name or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__))
    cache = getattr(pipe.unet, "_amed_sha256_cache", None)  # the weights' hash an earlier call computed (see _keep_hash)
    if cache is not None:
        object.__setattr__(den, "_sha256_cache", cache)
    return den


def _keep_hash(pipe, den) -> None:
    """Keep the UNet's weight hash (what the teacher check computed) on the UNet, so the next call's new denoiser
    does not rehash gigabytes (the cache's key still notices changed weights)."""
    cache = getattr(den, "_sha256_cache", None)
    if cache is not None:
        object.__setattr__(pipe.unet, "_amed_sha256_cache", cache)


def _vp_table(scheduler):
    """(alphas_cumprod, prediction_type) of the scheduler's config, kept on the scheduler until its config changes."""
    import json

    from ..adapters.diffusers_adapter import alphas_cumprod_from_scheduler_config

    config = dict(scheduler.config)
    key = json.dumps(config, sort_keys=True, default=str)
    cached = getattr(scheduler, "_amed_vp_table", None)
    if cached is None or cached[0] != key:
        cached = (key, alphas_cumprod_from_scheduler_config(config))
        setattr(scheduler, "_amed_vp_table", cached)
    return cached[1]


def _feature_layer(sampler) -> str:
    """The UNet block an AMED sampler reads (``diffusers:<layer>``); mid_block for samplers without features."""
    source = str(getattr(sampler.spec, "feature_source", "") or "")
    if getattr(sampler, "predictor", None) is None or not source.startswith("diffusers:"):
        if getattr(sampler, "predictor", None) is not None:
            raise ValueError(f"sampler: this AMED sampler reads features from {source!r}, not from a diffusers UNet; "
                             "it was distilled on another kind of model")
        return "mid_block"
    return source.split(":", 1)[1]


def _teacher_guidance(sampler) -> float | None:
    from collections.abc import Mapping

    teacher = getattr(sampler.spec, "teacher", None) or {}
    g = teacher.get("guidance_scale") if isinstance(teacher, Mapping) else None
    return float(g) if g is not None else None


@torch.no_grad()
def sample_with(pipe, sampler, *, prompt: str | Sequence[str] | None = None,
                negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                batch_size: int = 1, guidance_scale: float | None = None, generator=None,
                latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
                prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                output_type: str = "pil", return_dict: bool = True, dtype: torch.dtype = torch.float32,
                check_teacher: bool = True, clip_skip: int | None = None) -> Any:
    """Images from ``pipe`` with ``sampler`` (any family: what ``load_sampler`` returns) as its denoising loop; the
    arguments mean what they mean in the pipeline's ``__call__`` (see the module docstring).

    ``guidance_scale``: default the scale the sampler was distilled at (recorded with its teacher), else the
    pipeline's 7.5; another scale than the recorded one is refused unless ``check_teacher=False``. ``check_teacher``
    also checks that the UNet is the one the sampler was made for (its weights' SHA-256, as ``load_sampler`` does).
    ``batch_size`` is for unconditional pipelines (text pipelines: one image per prompt x ``num_images_per_prompt``)."""
    from diffusers.utils.torch_utils import randn_tensor

    kind = pipeline_kind(pipe)
    device = getattr(pipe, "_execution_device", None) or pipe.device
    layer = _feature_layer(sampler)
    unet = pipe.unet
    if kind == "text":
        recorded = _teacher_guidance(sampler)
        w = float(guidance_scale if guidance_scale is not None else recorded if recorded is not None else 7.5)
        if check_teacher and recorded is not None and w != recorded:
            raise ValueError(f"guidance_scale: this sampler was distilled at guidance_scale={recorded:g}, not {w:g}; "
                             "pass that scale, or check_teacher=False to sample at another one anyway")
        cfg = w > 1 and getattr(unet.config, "time_cond_proj_dim", None) is None
        if prompt is None and prompt_embeds is None:
            raise ValueError("prompt: a text-to-image pipeline needs prompt=... (or prompt_embeds=...)")
        cond, uncond = pipe.encode_prompt(prompt, device, num_images_per_prompt, cfg, negative_prompt,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                          clip_skip=clip_skip)
        n = cond.shape[0]
        den = pipeline_denoiser(pipe, feature_layer=layer, guidance_scale=w if cfg else 1.0, prompt_embeds=cond,
                                negative_prompt_embeds=uncond if cfg else None)
        labels = torch.arange(n, device=device) if n > 1 else None
        scale = pipe.vae_scale_factor
        height = height or unet.config.sample_size * scale
        width = width or unet.config.sample_size * scale
        shape = (n, unet.config.in_channels, int(height) // scale, int(width) // scale)
        noise_dtype = cond.dtype
    else:
        if prompt is not None or prompt_embeds is not None:
            raise ValueError(f"prompt: {type(pipe).__name__} is unconditional; leave prompt unset")
        den = pipeline_denoiser(pipe, feature_layer=layer)
        labels = None
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(batch_size), unet.config.in_channels, *size)
        noise_dtype = unet.dtype
    if check_teacher and hasattr(sampler, "check_denoiser"):
        sampler.check_denoiser(den)
        _keep_hash(pipe, den)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=noise_dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents: shape {tuple(latents.shape)} given, the pipeline needs {shape}")
    if hasattr(sampler, "predictor"):
        sampler.predictor.to(device)
    steps = len(sampler.spec.grid()) - 1
    with pipe.progress_bar(total=steps) as bar:
        res = sampler(den, latents.to(device=device, dtype=dtype), class_labels=labels, check_teacher=False,
                      callback=lambda info: bar.update())
    x = res.x.to(unet.dtype)
    return _finish(pipe, kind, x, output_type=output_type, return_dict=return_dict, generator=generator,
                   device=device, embeds_dtype=noise_dtype)


def _finish(pipe, kind: str, x: torch.Tensor, *, output_type: str, return_dict: bool, generator, device, embeds_dtype):
    """The pipeline's own tail after its denoising loop (decode, safety checker, postprocess, output class)."""
    if kind == "text":
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        has_nsfw = None
        if output_type != "latent":
            image = pipe.vae.decode((x / pipe.vae.config.scaling_factor).to(pipe.vae.dtype), return_dict=False,
                                    generator=generator)[0]
            image, has_nsfw = pipe.run_safety_checker(image, device, embeds_dtype)
        else:
            image = x
        denorm = [True] * image.shape[0] if has_nsfw is None else [not h for h in has_nsfw]
        image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm)
        pipe.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)
    from diffusers import ImagePipelineOutput

    image = (x / 2 + 0.5).clamp(0, 1)
    image = image.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "pil":
        image = pipe.numpy_to_pil(image)
    if not return_dict:
        return (image,)
    return ImagePipelineOutput(images=image)

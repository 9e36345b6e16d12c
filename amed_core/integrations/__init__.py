"""A sampler of any family where people sample: diffusers pipelines, k-diffusion-style sampler functions (what
ComfyUI's custom samplers, Forge and A1111 call) and sigma lists.

- :func:`sample_with` (``diffusers_pipeline.py``): ``sample_with(pipe, sampler, prompt=..., generator=...)`` runs the
  sampler as the denoising loop of a diffusers pipeline (Stable Diffusion 1.x/2.x with classifier-free guidance, eps
  or v prediction; DDPM-style unconditional pipelines) and returns what the pipeline returns.
- :func:`to_k_diffusion` (``kdiffusion.py``): ``sample(model, x, sigmas, extra_args, callback, disable)`` on any
  k-diffusion-style denoiser wrapper; :func:`sampler_sigmas` its time points.
- :func:`export_schedule` (``schedule.py``): a pure-schedule sampler (free, GITS) as a sigmas.json, a k-diffusion
  sampler + sigmas, or a diffusers scheduler + ``sigmas=`` (``amed export``); :func:`from_export` reads one back.

No new dependency: diffusers is imported only inside :func:`sample_with` (``pip install 'amed-distill[models]'``);
k-diffusion is never imported (the signature is all it takes). A ComfyUI node wrapping these:
``docs/examples/comfyui_amed_sampler.py``.
"""

from .diffusers_pipeline import SUPPORTED_PIPELINES, pipeline_denoiser, pipeline_kind, sample_with
from .kdiffusion import KDiffusionModel, sampler_sigmas, to_k_diffusion
from .schedule import (DIFFUSERS_SCHEDULERS, EXPORT_TARGETS, K_DIFFUSION_SAMPLERS, export_json, export_schedule,
                       grid_schedule_of,
                       from_export, schedule_of, timestep_gap)

__all__ = ["sample_with", "pipeline_denoiser", "pipeline_kind", "SUPPORTED_PIPELINES", "to_k_diffusion",
           "sampler_sigmas", "KDiffusionModel", "export_schedule", "export_json", "schedule_of", "timestep_gap",
           "EXPORT_TARGETS", "K_DIFFUSION_SAMPLERS", "DIFFUSERS_SCHEDULERS", "from_export", "grid_schedule_of"]

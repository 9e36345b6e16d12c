"""A ComfyUI custom sampler node around an amed-distill champion (an example: ComfyUI is not a dependency).

Copy this file into ``ComfyUI/custom_nodes/`` in an environment where ``amed-distill`` is installed. The node
"AMED champion" outputs a SAMPLER and its SIGMAS; connect both to ComfyUI's SamplerCustom (or SamplerCustomAdvanced)
node, with your MODEL. ComfyUI then calls the sampler function as k-diffusion's samplers are called,
``fn(model_k, noise * sigmas[0], sigmas, extra_args=..., callback=..., disable=...)``; that function is
:func:`amed_core.integrations.to_k_diffusion`'s.

What to know (the module docstring of ``amed_core/integrations/kdiffusion.py`` has the details):

- The SIGMAS are the champion's own time points: its NFE and score were measured there; other sigmas are refused.
- An AMED champion reads the UNet's middle block at each step. ComfyUI's wrapper is not a torch module that names it,
  so the node takes it from the MODEL (``model.model.diffusion_model.middle_block``, ComfyUI's name for diffusers'
  ``mid_block``). ComfyUI batches the conditional and unconditional passes of classifier-free guidance together:
  ``cfg_features`` says which half is the conditional one; check the order your ComfyUI version uses.
- For a full denoise ComfyUI scales the initial noise by sqrt(1 + sigma_max^2) instead of sigma_max (its EPS
  ``noise_scaling`` with ``max_denoise``); the champion then starts from noise * sqrt(1 + sigma_max^2) / sigma_max
  (x 1.0023 for SD 1.x's sigma_max 14.6) rather than the noise it was measured with.
- ComfyUI maps a sigma to the nearest table timestep, where amed's diffusers adapter interpolates between timesteps:
  AMED's intermediate times can land between table entries, so results differ slightly from ``amed sample`` there.
- Free and GITS champions are plain schedules: ``amed export URI --to sigmas.json`` gives SIGMAS for ComfyUI's own
  samplers too (``--to k-diffusion`` names the k-diffusion sampler that computes the same, where one exists).

Tested without ComfyUI (``tests/test_integrations.py``): :func:`champion_sampler` on a k-diffusion wrapper gives
``load_sampler``'s samples; the node class below only adds ComfyUI's types.
"""

from __future__ import annotations


def champion_sampler(uri: str, *, feature_module=None, cfg_features=None, tracking_uri=None):
    """(sampler function in k-diffusion's signature, its sigmas as a float32 tensor) for a champion
    (``models:/NAME@champion``, a folder or an fsspec URL)."""
    from amed_core.integrations import sampler_sigmas, to_k_diffusion
    from flows.registry import load_sampler

    sampler = load_sampler(uri, tracking_uri=tracking_uri)
    fn = to_k_diffusion(sampler, feature_module=feature_module, cfg_features=cfg_features)
    return fn, sampler_sigmas(sampler).float()


class AMEDChampionSampler:
    """ComfyUI node: MODEL + champion URI -> SAMPLER, SIGMAS."""

    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER", "SIGMAS")
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "champion": ("STRING", {"default": "models:/amed-sd15-nfe5@champion"}),
            "tracking_uri": ("STRING", {"default": "http://127.0.0.1:5000"}),
            "cfg_features": (["second", "first"],),
        }}

    def get_sampler(self, model, champion, tracking_uri, cfg_features):
        import comfy.samplers  # ComfyUI's own module: only imported inside ComfyUI

        unet = model.model.diffusion_model                   # ComfyUI's UNet under its ModelPatcher
        fn, sigmas = champion_sampler(champion, feature_module=getattr(unet, "middle_block", None),
                                      cfg_features=cfg_features, tracking_uri=tracking_uri or None)
        return (comfy.samplers.KSAMPLER(fn), sigmas)


NODE_CLASS_MAPPINGS = {"AMEDChampionSampler": AMEDChampionSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"AMEDChampionSampler": "AMED champion"}

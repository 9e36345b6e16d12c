"""The registered AMED sampler as an MLflow pyfunc, logged as *models-from-code* (no pickle anywhere).

MLflow stores this file itself as the model's code, next to the artifact ``checkpoint/``
(``predictor.safetensors`` + ``sampler.json``); loading runs this file and rebuilds the sampler with
``amed_core.amed.load_sampler`` (safetensors + JSON). ``predict`` takes seeds and returns samples:

    model = mlflow.pyfunc.load_model("models:/amed-digits-nfe5@champion")
    x = model.predict(pd.DataFrame({"seed": [0, 1, 2]}))     # (3, C, H, W) float64, x0 of each seed's noise

The output is a numpy array of shape (number of seeds, C, H, W) (the teacher's ``shape``; digits: (n, 1, 8, 8)),
in the model's data space (pixels in about [-1, 1] for image models; latents for latent models, undecoded), recorded
in the logged signature as a tensor of that shape. (Versions registered before issue 19 returned (n, C*H*W): their
own code is stored with them and keeps doing so.)

Sample j is drawn from ``amed_core.teacher.trajectory_inputs([seed_j], shape)`` - the per-sample noise
(and class label, for conditional teachers) the evaluate stage uses - so a registered sampler reproduces
the candidate's evaluation samples exactly. The teacher denoiser comes from the model config
(``teacher``, ``teacher_options``: what ``amed_core.denoisers.load_teacher`` takes), overridable at load:
``mlflow.pyfunc.load_model(uri, model_config={"teacher_options": {"weights_url": ...}})``.
"""

from __future__ import annotations

import warnings

import mlflow
from mlflow.pyfunc import PythonModel


def _seeds(model_input) -> list[int]:
    if hasattr(model_input, "columns"):  # pandas DataFrame
        if "seed" not in model_input.columns:
            raise ValueError(f"model input needs a 'seed' column (got columns {list(model_input.columns)})")
        return [int(s) for s in model_input["seed"].tolist()]
    if isinstance(model_input, dict):
        return [int(s) for s in model_input["seed"]]
    return [int(s) for s in list(model_input)]


class _AMEDSamplerModel:
    """pyfunc: seeds -> samples of the learned sampler on its teacher."""

    def load_context(self, context):
        from amed_core.families import load_sampler  # any family: free / gits (JSON), amed, epd

        self.sampler = load_sampler(context.artifacts["checkpoint"])
        cfg = dict(context.model_config or {})
        self.teacher = cfg.get("teacher") or self.sampler.spec.teacher.get("name")
        self.teacher_options = dict(cfg.get("teacher_options") or {})
        self._denoiser = None

    def denoiser(self):
        if self._denoiser is None:
            from amed_core.denoisers import load_teacher

            if not self.teacher:
                raise ValueError("model_config 'teacher' is not set: pass model_config={'teacher': NAME} at load")
            self._denoiser = load_teacher(self.teacher, **self.teacher_options)
        return self._denoiser

    def predict(self, context, model_input, params=None):
        import torch

        from amed_core.teacher import trajectory_inputs

        params = dict(params or {})
        dtype = {"float64": torch.float64, "float32": torch.float32}.get(str(params.get("dtype", "float64")))
        if dtype is None:
            raise ValueError(f"params.dtype must be float64 or float32, got {params.get('dtype')!r}")
        den = self.denoiser()
        seeds = _seeds(model_input)
        label_dim = int(getattr(den, "label_dim", 0) or 0)
        noise, labels = trajectory_inputs(seeds, den.shape, label_policy="uniform" if label_dim else "none",
                                          label_dim=label_dim)
        onehot = torch.nn.functional.one_hot(labels, label_dim).to(dtype) if labels is not None else None
        x = self.sampler(den, noise.to(dtype), class_labels=onehot).x
        return x.detach().cpu().numpy()  # (len(seeds), C, H, W): see the module docstring


# MLflow inspects predict() when a PythonModel subclass is created and advises type hints; the signature
# (seed column in, float array out) is logged explicitly instead, so that advice is silenced here.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)

    class AMEDSamplerModel(_AMEDSamplerModel, PythonModel):
        """The pyfunc MLflow loads (the methods live in _AMEDSamplerModel)."""


mlflow.models.set_model(AMEDSamplerModel())

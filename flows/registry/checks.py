"""The teacher-dependent parts of logging a candidate, kept out of the flow process when a Ray cluster is at hand.

Logging a candidate needs its sampler run on the teacher twice: once for the reference samples (and the learned
schedule plot) before its pyfunc is logged, and once through the logged pyfunc, which must reproduce them before the
version is registered. For a Stable Diffusion teacher that is the UNet's weights and minutes of sampling per candidate;
done in the flow process it would load the model there (what planning avoids: ``flows.cluster.probe``). So the flow
asks a :class:`Checks` for both steps: :class:`LocalChecks` runs them here (the default, e.g. ``amed register`` or
tests without Ray), :class:`RayChecks` as Ray tasks on the workers, which cache the teacher per process. The MLflow
logging itself (runs, artifacts, versions, aliases) stays in the flow.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger("flows.registry")

__all__ = ["Checks", "LocalChecks", "RayChecks", "reference_samples", "reproduces", "teacher_for"]


def teacher_for(config, dataset: str):
    """(DatasetConfig, loaded teacher) of ``dataset`` in this sweep, from the process's teacher cache
    (:func:`flows.cluster.worker.load_dataset_teacher`: the one the worker's train and evaluate jobs use)."""
    from flows.cluster.worker import load_dataset_teacher

    ds = next((d for d in config.datasets if d.name == dataset), None)
    if ds is None:
        raise ValueError(f"candidate dataset {dataset!r} is not in the sweep's datasets {[d.name for d in config.datasets]}")
    return ds, load_dataset_teacher(ds)


def reference_samples(config_json: dict, dataset: str, checkpoint_url: str, seeds: list[int],
                      plot_seeds: Optional[list[int]] = None, title: str = "", baseline_url: Optional[str] = None,
                      titles: Optional[list[str]] = None) -> dict:
    """The candidate's samples for ``seeds`` (float64, one row per seed) and, for a sampler with a learned per-step
    policy, its schedule plot on ``plot_seeds`` (PNG bytes, else None); with ``baseline_url`` (the panel best's
    checkpoint) also ``side_by_side``: both samplers' pictures of the ``plot_seeds`` noise next to each other under
    ``titles`` (PNG bytes, the champion's story on the model page)."""
    import torch

    from amed_core.families import sampler_from_files
    from amed_core.teacher import trajectory_inputs
    from flows.config import SweepConfig
    from flows.registry.loading import read_checkpoint

    config = SweepConfig.model_validate(config_json)
    sampler = sampler_from_files(read_checkpoint(checkpoint_url, config.storage_options))
    _, denoiser = teacher_for(config, dataset)
    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)

    def inputs(ss: list[int]):
        noise, labels = trajectory_inputs(ss, denoiser.shape, label_policy="uniform" if label_dim else "none",
                                          label_dim=label_dim)
        onehot = torch.nn.functional.one_hot(labels, label_dim).double() if labels is not None else None
        return noise.double(), onehot

    noise, onehot = inputs(seeds)
    expected = sampler(denoiser, noise, class_labels=onehot).x.detach().cpu().numpy()  # (seeds, C, H, W): the pyfunc's
    png = None
    if plot_seeds and hasattr(sampler, "predictor"):  # free, gits, epd samplers: their sigmas are in the params
        from amed_core.amed.evaluation import policy_plot_png

        try:
            noise, onehot = inputs(plot_seeds)
            png = policy_plot_png(sampler, denoiser, noise, class_labels=onehot, title=title)
        except Exception as e:  # noqa: BLE001 - a plot must never lose a candidate
            log.warning("schedule plot for %s not made: %s", title, e)
    side = None
    if plot_seeds and baseline_url:
        try:
            side = _side_by_side(sampler, sampler_from_files(read_checkpoint(baseline_url, config.storage_options)),
                                 denoiser, *inputs(plot_seeds), titles or ["candidate", "best training-free"])
        except Exception as e:  # noqa: BLE001 - a picture must never lose a candidate
            log.warning("side-by-side picture for %s not made: %s", title, e)
    return {"expected": expected, "png": png, "side_by_side": side}


def _side_by_side(sampler, baseline, denoiser, noise, onehot, titles: list[str]) -> bytes:
    """PNG bytes: the two samplers' images (decoded for latent models) of the same noise, side by side."""
    import tempfile
    from pathlib import Path

    from amed_core.evaluate import save_side_by_side_png
    from amed_core.evaluate.score import to_images

    panels = {t: to_images(denoiser, s(denoiser, noise, class_labels=onehot).x).float().cpu()
              for t, s in zip(titles, (sampler, baseline))}
    with tempfile.TemporaryDirectory(prefix="amed-side-") as tmp:
        return save_side_by_side_png(panels, Path(tmp, "side_by_side.png")).read_bytes()


def reproduces(tracking_uri: str, model_uri: str, seeds: list[int], expected) -> bool:
    """Load the logged pyfunc back from the registry's artifact store and run it: exactly the reference samples?"""
    import warnings

    import mlflow
    import numpy as np
    import pandas as pd

    from flows.registry.tracking import tracking

    with tracking(tracking_uri), warnings.catch_warnings():  # advisory hints (integer schema, type hints) only
        warnings.simplefilter("ignore", UserWarning)
        got = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"seed": seeds})))
    return got.shape == expected.shape and bool(np.array_equal(got, expected))


class Checks:
    """Where :func:`reference_samples` and :func:`reproduces` run (see the module docstring)."""

    where = "?"

    def reference(self, config_json: dict, dataset: str, checkpoint_url: str, seeds: list[int],
                  plot_seeds: Optional[list[int]] = None, title: str = "") -> dict:
        raise NotImplementedError

    def reproduces(self, tracking_uri: str, model_uri: str, seeds: list[int], expected) -> bool:
        raise NotImplementedError


class LocalChecks(Checks):
    """In this process (loads the teacher here)."""

    where = "this process"

    def reference(self, *args, **kwargs) -> dict:
        return reference_samples(*args, **kwargs)

    def reproduces(self, *args, **kwargs) -> bool:
        return reproduces(*args, **kwargs)


class RayChecks(Checks):
    """As Ray tasks with the sweep's task options (GPU where the cluster has one); callable from several threads."""

    where = "Ray workers"

    def __init__(self, compute):
        import ray

        from flows.cluster.session import task_options

        opts = task_options(compute)
        self._reference = ray.remote(reference_samples).options(**opts)
        self._reproduces = ray.remote(reproduces).options(**{k: v for k, v in opts.items() if k != "num_gpus"})

    def reference(self, *args, **kwargs) -> dict:
        import ray

        return ray.get(self._reference.remote(*args, **kwargs))

    def reproduces(self, *args, **kwargs) -> bool:
        import ray

        return ray.get(self._reproduces.remote(*args, **kwargs))

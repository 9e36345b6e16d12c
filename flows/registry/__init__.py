"""MLflow tracking and model registry for distilled samplers; ``load_sampler`` for any checkpoint address.

- Tracking: one parent run per sweep (experiment = the sweep's name), one nested child run per candidate.
  Child params = the full sweep config flattened (``train.lr``, ...) + the candidate (``candidate.solver``,
  ``spec.num_steps``, ...); metrics = the protocol's metric and the base solver's at the same NFE
  (``fd_exact``, ``base_fd_exact``, ``improvement``), ``rmse``, ``train_seconds``, ``teacher_nfe``, the
  training loss curve (``train_loss`` by step); artifacts = ``checkpoint/`` (predictor.safetensors,
  sampler.json), the sample grids and a learned-schedule plot (PNGs).
- Model: the checkpoint logged as a pyfunc from code (``flows/mlflow_model.py``; safetensors + JSON, no
  pickle) with explicit pip requirements; it is loaded back and run once (it must reproduce the local
  checkpoint's samples bit for bit) before it is registered.
- Registry: one registered model per (dataset, NFE) (``CandidateResult.registered_name``); every candidate
  is a version (tags: solver, seed, metric, protocol_hash, value, ...). The alias ``champion`` moves to a
  version only when it is strictly better (lower) than the current champion *under the same protocol
  hash*; otherwise it stays. ``best-<solver>`` aliases (``best-amed-ipndm``) follow the same rule per solver.
- ``load_sampler(uri)``: a local folder, any fsspec URL (``s3://...``), or ``models:/NAME@ALIAS``,
  ``models:/NAME/VERSION``, ``models:/m-<id>``.

Modules: :mod:`~flows.registry.tracking` (tracking URI, runs, params, metrics), :mod:`~flows.registry.loading`
(checkpoints from folders, URLs and the registry), :mod:`~flows.registry.registration` (logged models, versions,
aliases), :mod:`~flows.registry.sweep` (a sweep's runs). The names below are the package's public API.

The tracking URI: an explicit argument, else the sweep's ``mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///<cwd>/amed-runs/<sweep>/mlflow.db`` (artifacts in ``amed-runs/<sweep>/mlartifacts``).
"""

from flows.registry.loading import checkpoint_bytes, fetch, load_sampler
from flows.registry.registration import CHAMPION, champion_uri, promote, solver_alias
from flows.registry.sweep import SweepLog, log_sweep, register_sweep
from flows.registry.tracking import QUICKSTART_TRACKING_URI, default_tracking_uri, resolve_tracking_uri

__all__ = ["register_sweep", "log_sweep", "load_sampler", "fetch", "checkpoint_bytes", "promote", "resolve_tracking_uri",
           "default_tracking_uri", "champion_uri", "solver_alias", "CHAMPION", "QUICKSTART_TRACKING_URI", "SweepLog"]

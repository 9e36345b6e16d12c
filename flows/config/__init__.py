"""The sweep configuration: one typed, validated schema for YAML files and deployment parameters.

A sweep is ``datasets x solvers x NFEs x seeds``; each combination trains one AMED predictor
(Zhou et al., "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps", arXiv 2312.00094)
against a teacher shared by every student of its dataset. Defaults follow the paper's recipe
(lr 5e-3, batch 128, 10k teacher trajectories, M = 1 inserted teacher step, AFS on,
scale_dir 0.01, scale_time 0); ``configs/quickstart.yaml`` shrinks it for a 2-core laptop.

Bad configs fail before any work starts: :func:`load_sweep` raises ``ValueError`` whose lines each
name a field's path (``evaluation.metric``) and what is allowed there.

The package: ``schema`` (the sweep's sections and ``SweepConfig``), ``families`` (``panel`` and ``families``:
the training-free panel, GITS, EPD and GS candidates), ``base`` (the strict model base, names, bounds) and ``loading``
(``load_sweep``: a sweep file read safely, YAML without alias bombs, errors one line per field; ``quickstart_path``).
"""

from flows.config.base import MAX_NFE, MAX_OPTION_DEPTH, MAX_SEED, Name, StrictModel
from flows.config.families import (EPDFamilyConfig, FamiliesConfig, GITSFamilyConfig, GSFamilyConfig, InitConfig,
                                   PanelConfig, PanelEntry)
from flows.config.loading import MAX_SWEEP_BYTES, MAX_YAML_ALIASES, MAX_YAML_NODES, load_sweep, quickstart_path
from flows.config.schema import (
    AMED_SOLVERS,
    ComputeConfig,
    DatasetConfig,
    EvalConfig,
    SamplerConfig,
    SweepConfig,
    TeacherConfig,
    TrainingConfig,
)

__all__ = [
    "AMED_SOLVERS",
    "DatasetConfig",
    "TeacherConfig",
    "SamplerConfig",
    "TrainingConfig",
    "EvalConfig",
    "ComputeConfig",
    "PanelEntry",
    "PanelConfig",
    "FamiliesConfig",
    "SweepConfig",
    "load_sweep",
    "quickstart_path",
    # also public (imported elsewhere or part of the schema): the bounds, the name type, the strict base, the families
    "MAX_NFE",
    "MAX_SEED",
    "MAX_OPTION_DEPTH",
    "MAX_SWEEP_BYTES",
    "MAX_YAML_ALIASES",
    "MAX_YAML_NODES",
    "Name",
    "StrictModel",
    "GITSFamilyConfig",
    "EPDFamilyConfig",
    "GSFamilyConfig",
    "InitConfig",
]

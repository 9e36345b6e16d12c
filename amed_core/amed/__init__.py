"""AMED (Zhou et al., arXiv 2312.00094): predictor, AMED-Solver / AMED-Plugins, training, checkpoints.

    spec = SamplerSpec.create("amed", nfe=5, afs=True, denoiser=teacher)
    result = train_amed(teacher, spec, TrainConfig())          # on-the-fly teacher (reference recipe)
    save_checkpoint("out", result.predictor, spec)
    x = load_sampler("out")(teacher, noise).x
"""

from .checkpoint import Sampler, checkpoint_files, load_sampler, sampler_from_files, save_checkpoint
from .predictor import AMEDPredictor, FixedPolicy, Policy, PredictorConfig, init_from_steps
from .solvers import AMED_SOLVERS, BASE_SOLVER, amed, amed_deis, amed_dpm, amed_dpmpp, amed_euler, amed_ipndm, amed_unipc
from .evaluation import AmedRun, Scores, compare_with_base, policy_trace, sample_amed, save_policy_plot
from .spec import SamplerSpec, nfe_for, num_steps_for
from .train import TrainConfig, TrainProgress, TrainResult, teacher_batches, teacher_states, train_amed

__all__ = ["AMEDPredictor", "FixedPolicy", "Policy", "PredictorConfig", "init_from_steps", "AMED_SOLVERS", "BASE_SOLVER",
           "amed", "amed_deis", "amed_dpm", "amed_dpmpp", "amed_euler", "amed_ipndm", "amed_unipc", "SamplerSpec", "nfe_for", "num_steps_for",
           "Sampler", "checkpoint_files", "load_sampler", "sampler_from_files", "save_checkpoint",
           "TrainConfig", "TrainProgress", "TrainResult", "teacher_batches", "teacher_states", "train_amed",
           "AmedRun", "Scores", "compare_with_base", "policy_trace", "sample_amed", "save_policy_plot"]

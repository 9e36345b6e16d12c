"""The denoiser API in one import: the protocol (:mod:`amed_core.base_denoiser`), the exact Gaussian mixture
(:mod:`amed_core.adapters.gmm`) and the teacher registry ``load_teacher`` (:mod:`amed_core.adapters`).

Nothing is defined here: the names live where their code does, and this module only gathers them (it imports
the adapters; nothing in amed_core imports it).
"""

from .adapters import BUILTIN_TEACHERS, GaussianMixtureDenoiser, load_teacher
from .base_denoiser import FEATURE_SIZE, BaseDenoiser, FeatureTap, as_sigma, pool_features

__all__ = ["BaseDenoiser", "FeatureTap", "GaussianMixtureDenoiser", "as_sigma", "pool_features", "load_teacher",
           "BUILTIN_TEACHERS", "FEATURE_SIZE"]

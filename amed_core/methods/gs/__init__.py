"""GS, the Generalized Solver (Oganov et al., arXiv 2510.17699): the sampler (:mod:`.sampler`: the VP re-mapping, the
grid parameterisation, the linear multistep update) and its training on the teacher's final samples (:mod:`.train`).
Every public name of both is importable from here."""

from .sampler import *  # noqa: F401,F403
from .sampler import __all__ as _sampler_all
from .train import *  # noqa: F401,F403
from .train import __all__ as _train_all

__all__ = list(_sampler_all) + list(_train_all)

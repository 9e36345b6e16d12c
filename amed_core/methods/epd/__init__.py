"""EPD-Solver and EPD-Plugin (Zhu et al., ICCV 2025): the sampler (:mod:`.sampler`: parameters, steps, NFE counts)
and its fitting and checkpoint files (:mod:`.train`). Every public name of both is importable from here."""

from .sampler import *  # noqa: F401,F403
from .sampler import __all__ as _sampler_all
from .train import *  # noqa: F401,F403
from .train import __all__ as _train_all

__all__ = list(_sampler_all) + list(_train_all)

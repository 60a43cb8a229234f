"""Compatibility alias of ``lopt.baselines``."""
from lopt.baselines import *  # noqa: F401,F403
from lopt.baselines import BASELINES, GRIDS, LEARNING_RATES, build, grid  # noqa: F401

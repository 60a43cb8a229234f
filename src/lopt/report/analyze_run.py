"""Compatibility module: ``lopt analyze`` lives in ``lopt.pipeline.analyze``."""

from lopt.pipeline.analyze import *  # noqa: F401,F403
from lopt.pipeline.analyze import (ANALYSIS_SEED, FIGURES, NUM_PROBLEMS, analyze_directory,  # noqa: F401
                                   analyze_optimizer, heavy_ball_reference, resolve)

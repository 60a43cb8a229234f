"""Reverse-engineering toolkit for any recurrent map h' = F(h, x) with a readout y = R(h) (SPEC §5).

Functions take plain callables ``step(h, x) -> h'`` and ``readout(h) -> y`` with their parameters bound, e.g.
``functools.partial(optimizer.cell, theta)`` and ``functools.partial(optimizer.readout, theta)``; never an optimizer
class (only ``collect_states`` runs an optimizer, to produce the arrays the rest works on).
"""

from lopt.dynamics.adaptation import adaptation_curve, fit_rmsprop, gradient_sweep, rmsprop_reference
from lopt.dynamics.analysis import analyze
from lopt.dynamics.clipping import clipping_profile
from lopt.dynamics.collect import Collected, collect_states
from lopt.dynamics.fixed_points import (FixedPoints, adam_minimize, deduplicate, find_fixed_points, newton_polish,
                                        speed, speeds)
from lopt.dynamics.linearize import Eigen, eig_sorted, linearize, time_constants
from lopt.dynamics.momentum import (MomentumModes, compare_with_heavy_ball, dominant_mode, impulse_response,
                                    momentum_modes, momentum_modes_at)
from lopt.dynamics.pca import PCA, pca
from lopt.dynamics.schedule import autonomous_trajectory, learning_rate_schedule, schedule_shape
from lopt.dynamics.summary import summarize
from lopt.dynamics.update_functions import effective_learning_rate, offset, update_function, update_slope

__all__ = [
    "adaptation_curve", "fit_rmsprop", "gradient_sweep", "rmsprop_reference", "analyze", "clipping_profile",
    "Collected", "collect_states", "FixedPoints", "adam_minimize", "deduplicate", "find_fixed_points",
    "newton_polish", "speed", "speeds", "Eigen", "eig_sorted", "linearize", "time_constants", "MomentumModes",
    "compare_with_heavy_ball", "dominant_mode", "impulse_response", "momentum_modes", "momentum_modes_at", "PCA",
    "pca", "autonomous_trajectory", "learning_rate_schedule", "schedule_shape", "summarize",
    "effective_learning_rate", "offset", "update_function", "update_slope",
]

"""Compatibility alias of ``lopt.optax_adapter``."""
from lopt.optax_adapter import *  # noqa: F401,F403
from lopt.optax_adapter import as_optax, loss_from_extra_args  # noqa: F401

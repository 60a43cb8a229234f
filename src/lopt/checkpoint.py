"""Compatibility alias: the file format lives in ``lopt.io.checkpoint`` (this name is the same module object)."""

import sys

from lopt.io import checkpoint as _checkpoint

sys.modules[__name__] = _checkpoint

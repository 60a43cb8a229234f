"""The per-parameter MLP optimizer: ``spec`` (fields, shapes; JAX-free), ``optimizer`` (JAX), ``torch``."""

from lopt.architectures.mlp.spec import SPEC

__all__ = ["SPEC"]

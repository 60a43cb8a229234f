"""The component-wise GRU optimizer: ``spec`` (fields, shapes; JAX-free), ``optimizer`` (JAX), ``torch``."""

from lopt.architectures.gru.spec import SPEC

__all__ = ["SPEC"]

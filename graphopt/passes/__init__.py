"""Graph passes: one module per pass, each registered by name (see base.register)."""
from .base import Option, Pass, register, registry

DEFAULT_PIPELINE = "remove-noops,fold-constants,dce"

__all__ = ["Option", "Pass", "register", "registry", "DEFAULT_PIPELINE"]

"""graphopt: an inference compiler for PyTorch (torch.export -> passes -> ONNX Runtime / torch bundles)."""
__version__ = "0.1.0"

from .errors import GraphoptError  # noqa: E402


def compile(*args, **kwargs):
    from .api import compile as _compile
    return _compile(*args, **kwargs)


def load(*args, **kwargs):
    from .runtime import load as _load
    return _load(*args, **kwargs)


compile.__doc__ = "See graphopt.api.compile."
load.__doc__ = "See graphopt.runtime.load."

__all__ = ["compile", "load", "GraphoptError", "__version__"]

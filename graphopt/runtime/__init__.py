"""Runtime: load bundles and run them (ONNX Runtime by default, or torch)."""
from .engine import BACKENDS, Engine, Method, load

__all__ = ["BACKENDS", "Engine", "Method", "load"]

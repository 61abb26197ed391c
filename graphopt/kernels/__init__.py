"""Custom ops (torch.library) with their reference, Triton and ONNX implementations.

Importing this package registers every op and its ONNX translation; the ONNX lowerer imports it before exporting.
"""
from . import dq_linear, dq_onnx  # noqa: F401  (registration side effects)

"""Compiler core: capture, the Program object, graph editing, the pass pipeline, guards and lowering."""

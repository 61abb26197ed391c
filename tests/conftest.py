import os
import sys
from pathlib import Path

import pytest
import torch

from graphopt.testing import tiny_hf_lm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples.* factories resolve like `optimize` run from the repo root

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return tiny_hf_lm("gpt2", tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny_hf_lm("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `optimize ...` in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(ROOT)

    def run(*argv):
        from graphopt.cli import main
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def temp_pass():
    """Register throwaway passes for a test, and remove them afterwards."""
    from graphopt.passes import base
    added = []

    def add(cls):
        base.registry()
        base.register(cls)
        added.append(cls.name)
        return cls
    yield add
    for name in added:
        base._REGISTRY.pop(name, None)

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # examples.* factories resolve like `optimize` run from the repo root

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _tiny_hf(kind: str, path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=256, n_embd=32, n_layer=2, n_head=4))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256))
    model.eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return _tiny_hf("gpt2", tmp_path_factory.mktemp("hf") / "gpt2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return _tiny_hf("llama", tmp_path_factory.mktemp("hf") / "llama")


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

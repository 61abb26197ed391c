import pytest
import torch
from torch import nn
from torch.export import Dim

from graphopt.compiler.capture import capture, parse_dynamic, parse_input
from graphopt.errors import GraphoptError


def test_parse_input_forms():
    s = parse_input("input_ids:1xS:int64")
    assert (s.name, s.shape, s.dtype) == ("input_ids", [1, "S"], "int64")
    s = parse_input("ids:2x16:int32:5..9")
    assert (s.shape, s.low, s.high) == ([2, 16], 5, 9)
    assert parse_dynamic("S=1..512") == ("S", 1, 512)


@pytest.mark.parametrize("text, msg", [
    ("x:1x16", "expected NAME:SHAPE:DTYPE"),
    ("x:1x16:float99", "unknown dtype 'float99'"),
    ("x:1x-3:float32", "bad dimension '-3'"),
    ("x:1x2:int64:5..5", "value range 5..5 is empty"),
])
def test_parse_input_errors(text, msg):
    with pytest.raises(GraphoptError, match=msg):
        parse_input(text)


@pytest.mark.parametrize("text", ["S", "S=5", "S=1-5", "S=9..3", "S=0..4"])
def test_parse_dynamic_errors(text):
    with pytest.raises(GraphoptError, match="--dynamic"):
        parse_dynamic(text)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, scale):
        return self.fc(x) * scale, x.sum(-1)


def test_module_capture_names_inputs_and_outputs():
    p = capture(Mlp(), example_inputs=(torch.randn(2, 6), torch.tensor(2.0)))
    assert [s.name for s in p.inputs["forward"]] == ["x", "scale"]
    assert [s.shape for s in p.output_specs("forward")] == [[2, 3], [2]]
    assert p.plan == {"kind": "single", "entry": "forward"}


def test_symbolic_dims_need_a_range():
    with pytest.raises(GraphoptError, match="add --dynamic B=MIN..MAX"):
        capture(Mlp(), inputs=["x:Bx6:float32", "scale:scalar:float32"])
    with pytest.raises(GraphoptError, match="no --input uses dim 'T'"):
        capture(Mlp(), inputs=["x:Bx6:float32", "scale:scalar:float32"], dynamic=["B=1..8", "T=1..4"])


def test_dynamic_capture_accepts_every_size_in_range():
    p = capture(Mlp(), inputs=["x:Bx6:float32", "scale:scalar:float32"], dynamic=["B=1..8"])
    assert p.inputs["forward"][0].shape == ["B", 6]
    assert p.output_specs("forward")[0].shape == ["B", 3]
    for b in (1, 3, 8):
        out = p.run("forward", torch.randn(b, 6), torch.tensor(1.0))
        assert out[0].shape == (b, 3)


def test_pt2_source_keeps_examples_and_dynamic_shapes(tmp_path):
    ep = torch.export.export(Mlp(), (torch.randn(4, 6), torch.tensor(1.0)),
                             dynamic_shapes=({0: Dim("batch", min=1, max=32)}, None))
    torch.export.save(ep, tmp_path / "m.pt2")
    p = capture(str(tmp_path / "m.pt2"))
    assert p.source["kind"] == "pt2" and len(p.source["sha256"]) == 64
    spec = p.inputs["forward"][0]
    assert isinstance(spec.shape[0], str) and p.dims[spec.shape[0]] == [1, 32]
    with pytest.raises(GraphoptError, match="already exported"):
        capture(str(tmp_path / "m.pt2"), inputs=["x:1x6:float32"])


def test_hf_directory_loads_without_remote_code(gpt2_dir):
    p = capture(str(gpt2_dir), task="single")
    assert p.inputs["forward"][0].shape == [1, 16]
    assert p.output_specs("forward")[0].name == "logits"
    assert p.output_specs("forward")[0].shape == [1, 16, 128]


@pytest.mark.parametrize("make, msg", [
    (lambda d: (d / "x.pt2").write_bytes(b"PK\x03\x04garbage"), "truncated or corrupt"),
    (lambda d: (d / "x.pt2").write_text("hello"), "is not a model file"),
])
def test_bad_files(tmp_path, make, msg):
    make(tmp_path)
    with pytest.raises(GraphoptError, match=msg):
        capture(str(tmp_path / "x.pt2"))


def test_truncated_pt2(tmp_path):
    ep = torch.export.export(Mlp(), (torch.randn(4, 6), torch.tensor(1.0)))
    torch.export.save(ep, tmp_path / "m.pt2")
    data = (tmp_path / "m.pt2").read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(GraphoptError, match="truncated or corrupt"):
        capture(str(tmp_path / "cut.pt2"))


def test_pickles_need_unsafe_load(tmp_path):
    torch.save(Mlp(), tmp_path / "m.pt")
    with pytest.raises(GraphoptError, match="pass --unsafe-load if you trust the file"):
        capture(str(tmp_path / "m.pt"))
    p = capture(str(tmp_path / "m.pt"), unsafe_load=True, inputs=["x:2x6:float32", "scale:scalar:float32"])
    assert p.source["kind"] == "pickle"
    torch.save(Mlp().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(GraphoptError, match="not an nn.Module"):
        capture(str(tmp_path / "sd.pt"), unsafe_load=True)


def test_factory_spec_errors():
    with pytest.raises(GraphoptError, match="cannot import module 'no_such_mod'"):
        capture("no_such_mod:build")
    with pytest.raises(GraphoptError, match="has no callable 'nope'"):
        capture("examples.tiny_cnn:nope")
    with pytest.raises(GraphoptError, match="not found"):
        capture("missing/model.pt2")


def test_tasks_that_do_not_fit_the_model_are_refused():
    with pytest.raises(GraphoptError, match="--task causal-lm needs a transformers decoder model"):
        capture("examples.tiny_cnn:build", task="causal-lm")
    with pytest.raises(GraphoptError, match="--task diffusion needs a denoiser with a timestep input"):
        capture("examples.tiny_cnn:build", task="diffusion")
    with pytest.raises(GraphoptError, match="--task 'nope'"):
        capture("examples.tiny_cnn:build", task="nope")


class BranchOnBatch(nn.Module):
    def forward(self, x):
        if x.shape[0] >= 8:  # code that only holds for part of the declared range
            return x.contiguous() * 2
        return x * 2


def test_dynamic_range_the_model_cannot_hold_names_the_fix():
    with pytest.raises(GraphoptError, match=r"cannot keep dim B dynamic .* use --dynamic B=8\.\.64"):
        capture(BranchOnBatch(), inputs=["x:Bx4:float32"], dynamic=["B=2..64"])

import re

import pytest
import torch

import graphopt
from graphopt.errors import GraphoptError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from torch import nn

    class Two(nn.Module):
        def forward(self, x, ids):
            return x * 2, ids + 1

    out = tmp_path_factory.mktemp("rt") / "b"
    graphopt.compile(Two(), inputs=["x:Bx4:float32", "ids:Bx4:int64"], dynamic=["B=1..8"]).save(out)
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_runs_and_checks_inputs(bundle, backend):
    eng = graphopt.load(bundle, backend=backend)
    y, i = eng(torch.ones(3, 4), ids=torch.zeros(3, 4, dtype=torch.int64))
    assert torch.equal(y, torch.full((3, 4), 2.0)) and torch.equal(i, torch.ones(3, 4, dtype=torch.int64))
    y, _ = eng(torch.ones(2, 4).numpy(), torch.zeros(2, 4, dtype=torch.int64).numpy())
    assert y.shape == (2, 4)
    bad = [
        ((torch.ones(3, 4),), {}, "missing input(s) ids"),
        ((torch.ones(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.int64)), {}, "dtype float64"),
        ((torch.ones(3), torch.zeros(3, 4, dtype=torch.int64)), {}, "expected rank 2"),
        ((torch.ones(3, 5), torch.zeros(3, 5, dtype=torch.int64)), {}, "axis 1 is fixed at 4"),
        ((torch.ones(9, 4), torch.zeros(9, 4, dtype=torch.int64)), {}, "outside the compiled range 1..8"),
        ((torch.ones(3, 4), torch.zeros(2, 4, dtype=torch.int64)), {}, "inputs disagree on dim B"),
        ((torch.ones(3, 4),), {"idz": 1}, "has no input 'idz'"),
        (([1, 2], torch.zeros(3, 4, dtype=torch.int64)), {}, "must be a tensor"),
    ]
    for args, kwargs, msg in bad:
        with pytest.raises(GraphoptError, match=re.escape(msg)):
            eng(*args, **kwargs)
    with pytest.raises(GraphoptError, match="no method 'decode'"):
        eng.method("decode")


def test_load_errors(tmp_path, bundle):
    with pytest.raises(GraphoptError, match="not found"):
        graphopt.load(tmp_path / "none")
    with pytest.raises(GraphoptError, match="not a graphopt bundle"):
        graphopt.load(tmp_path)
    with pytest.raises(GraphoptError, match="backend 'tensorflow'"):
        graphopt.load(bundle, backend="tensorflow")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(GraphoptError, match="is corrupt"):
        graphopt.load(tmp_path)


def test_compile_api_matches_model():
    from examples.tiny_cnn import build
    model, (x,) = build()
    compiled = graphopt.compile(model, example_inputs=(x,))
    torch.testing.assert_close(compiled(x), model(x).detach(), rtol=1e-4, atol=1e-5)
    assert [r["status"] for r in compiled.reports] == ["ok", "ok", "ok"]
    assert set(compiled.timings) >= {"capture_s", "passes_s", "guard_s", "lowering_s", "ort_check_s", "total_s"}


def test_load_failure_names_the_opset_fix(tmp_path):
    """A bundle file at opset 23 (the default) rejected by an older ONNX Runtime: the error says to upgrade or to
    re-run optimize with --opset 21; other failures say to re-run optimize."""
    import onnx
    from onnx import TensorProto, helper

    from graphopt.runtime.engine import _load_fix
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "m.onnx"
    for opset, version, fix in [(23, "1.22.1", "--opset 21"), (23, "1.32.0", "re-run optimize"),
                                (21, "1.20.0", "re-run optimize")]:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
        msg = _load_fix(path, version)
        assert fix in msg and (("1.23" in msg) == (fix == "--opset 21"))

"""--backend tensorrt: what runs without TensorRT (install check, plugin coverage, the plugin kernels' PTX) and the
engine build/run path, which runs only where `tensorrt` and `torch_tensorrt` import and a CUDA GPU is present."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import graphopt
from graphopt.compiler.capture import capture
from graphopt.compiler.pipeline import PassContext, parse_pipeline, run_pipeline
from graphopt.compiler.tensorrt_lower import check_plugins, custom_ops
from graphopt.errors import GraphoptError

HAVE_TRT = all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "torch_tensorrt"))


@torch.library.custom_op("graphopt_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


class UsesForeignOp(nn.Module):
    def forward(self, x):
        return torch.ops.graphopt_test.twice(x) + 1


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt_is_one_line_error(cli, tmp_path):
    code, out, err = cli("examples.tiny_cnn:build", "-o", tmp_path / "b", "--backend", "tensorrt")
    assert code != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "graphopt[tensorrt]" in line and "--backend tensorrt" in line
    assert not (tmp_path / "b").exists()
    with pytest.raises(GraphoptError, match=r"pip install 'graphopt\[tensorrt\]'"):
        graphopt.load(tmp_path, backend="tensorrt")


def test_plugin_coverage_names_ops_without_a_tensorrt_plugin():
    p = capture(UsesForeignOp(), example_inputs=(torch.randn(2, 4),))
    assert custom_ops(p.methods["forward"]) == {"graphopt_test::twice"}
    with pytest.raises(GraphoptError, match="method 'forward' uses graphopt_test::twice, which has no TensorRT plugin"):
        check_plugins(p.methods)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 64, generator=g),) for _ in range(8)]
    q = capture(Small().eval(), example_inputs=(torch.randn(4, 64),))
    q, _, _ = run_pipeline(q, parse_pipeline("rtn{bits=4,group=32}"), PassContext(calibration=calib))
    assert custom_ops(q.methods["forward"]) == {"graphopt::dq_linear"}
    check_plugins(q.methods)  # dq_linear has its plugin


def test_plugin_kernels_use_tensorrt_argument_order(tmp_path):
    """TensorRT's AOT plugins pass input pointers, then scalars, then outputs, and nothing else."""
    import os
    import subprocess
    import sys
    import textwrap
    pytest.importorskip("triton.backends.nvidia")
    code = textwrap.dedent("""
        import json
        from graphopt.kernels.aot import dq_linear_plugin_kernels
        out = []
        for k in dq_linear_plugin_kernels(2, 64, "fp16", has_bias=True, archs=(90,), convention="tensorrt"):
            entry = k.ptx.split(".entry " + k.entry + "(")[1].split(")")[0]
            out.append({"params": k.params, "scratch": k.scratch_params, "n_ptx": entry.count(".param"),
                        "last": entry.strip().splitlines()[-1]})
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    for k in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert k["params"] == ["x_ptr", "packed_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "M", "N", "K",
                               "stride_xm", "stride_pn", "stride_sn", "stride_zn", "stride_ym", "y_ptr"]
        assert k["scratch"] == [] and k["n_ptx"] == 14 and ".u64" in k["last"]  # y_ptr last, no scratch


@pytest.mark.skipif(not (HAVE_TRT and torch.cuda.is_available()),
                    reason="tensorrt / torch_tensorrt are not installed (pip install 'graphopt[tensorrt]' on a "
                           "machine with an NVIDIA GPU)" if not HAVE_TRT else "TensorRT engines need a CUDA GPU")
def test_tensorrt_engine_with_dq_linear_plugin_matches_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 64, generator=g),) for _ in range(8)]
    c = graphopt.compile(Small().eval(), "rtn{bits=4,group=32}", example_inputs=(torch.randn(4, 64),),
                         calibration=calib, backend="tensorrt")
    c.save(tmp_path / "trt")
    assert (tmp_path / "trt" / "forward.engine").is_file()
    x = torch.randn(4, 64)
    engine = graphopt.load(tmp_path / "trt", backend="tensorrt")
    ref = c.program.run("forward", x)[0]
    torch.testing.assert_close(engine(x).cpu().float(), ref, rtol=2e-2, atol=2e-2)


def test_plugin_inputs_get_an_explicit_zero_bias():
    """The TensorRT plugin always takes a bias: bias-free dq_linear nodes get a zero constant, same numerics."""
    from graphopt.compiler.tensorrt_lower import with_explicit_bias
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8)).eval()  # the last one is the output layer: kept in float
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 64, generator=g),) for _ in range(8)]
    q = capture(model, example_inputs=(torch.randn(4, 64),))
    q, _, _ = run_pipeline(q, parse_pipeline("rtn{bits=4,group=32}"), PassContext(calibration=calib))
    ep = q.methods["forward"]
    dq = [n for n in ep.graph.nodes if n.target is torch.ops.graphopt.dq_linear.default]
    assert [n.args[4] is None for n in dq] == [True, False]
    new = with_explicit_bias(ep)
    dq = [n for n in new.graph.nodes if n.target is torch.ops.graphopt.dq_linear.default]
    assert all(n.args[4] is not None for n in dq)
    x = torch.randn(4, 64)
    q2 = q.copy()
    q2.methods = {"forward": new}
    torch.testing.assert_close(q2.run("forward", x)[0], q.run("forward", x)[0])

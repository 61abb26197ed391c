"""Ahead-of-time plugin kernels (graphopt.kernels.aot): PTX for sm_80/sm_90 and launch parameters, without a GPU.

Compilation runs in a subprocess: other test modules set TRITON_INTERPRET=1, under which kernels cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import importlib.util

import pytest

# Not importorskip: importing triton here, at collection, would precede test_dq_triton's TRITON_INTERPRET=1 and break
# its interpreted kernels. The compiles below run in subprocesses.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", code] if code else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("aot")
    out = tmp / "plugins"
    code = textwrap.dedent(f"""
        from graphopt.kernels.aot import dq_linear_plugin_kernels, write_plugin_dir
        ks = dq_linear_plugin_kernels(2, 64, "bf16", has_bias=True, archs=(80, 90))
        ks += dq_linear_plugin_kernels(3, -1, "fp16", archs=(90,), in_features=512)
        write_plugin_dir(ks, {str(out)!r})
    """)
    proc = run_python(code, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_aot_plugin_kernels_compile_to_ptx_per_arch(plugin_dir: Path) -> None:
    from graphopt.kernels.aot import PTX_VERSION, read_plugin_dir
    kernels = read_plugin_dir(plugin_dir)
    assert [(k.variant, k.arch) for k in kernels] == [("gemv", 80), ("gemm", 80), ("gemv", 90), ("gemm", 90),
                                                      ("gemv", 90), ("gemm", 90)]
    for k in kernels:
        target = "sm_90a" if k.arch == 90 else f"sm_{k.arch}"
        assert f".target {target}" in k.ptx and f".version {PTX_VERSION // 10}.{PTX_VERSION % 10}" in k.ptx
        assert f".entry {k.entry}(" in k.ptx
        n_params = k.ptx.split(f".entry {k.entry}(")[1].split(")")[0].count(".param")
        assert n_params == len(k.params) + len(k.scratch_params)
        assert k.params[:6] == ["x_ptr", "packed_ptr", "scale_ptr", "zero_ptr", "bias_ptr", "y_ptr"]
        assert k.param_types == ["ptr"] * 6 + ["i32"] * 8
        assert k.num_warps * 32 <= 1024 and 0 < k.shared_bytes <= 227 * 1024
        if k.variant == "gemm":
            assert "mma" in k.ptx  # tensor-core tiles
            assert k.entry.startswith("_dq_gemm_kernel")  # the dequant GEMM: any row alignment
    first = kernels[0]
    assert first.constexprs["HAS_BIAS"] is True and first.constexprs["BITS"] == 2 and first.constexprs["GROUP"] == 64
    assert kernels[4].constexprs["GROUP"] == 0  # per channel
    assert (plugin_dir / f"{first.file_stem}.ptx").read_text() == first.ptx
    index = json.loads((plugin_dir / "kernels.json").read_text())
    assert "ptx" not in index[0] and index[0]["ptx_file"].endswith(".ptx")


def test_plugin_launch_parameters_cover_the_problem(plugin_dir: Path) -> None:
    from graphopt.kernels.aot import read_plugin_dir
    gemv, gemm = read_plugin_dir(plugin_dir)[2:4]
    g = gemv.launch(3, 4100)
    assert g["grid"] == (-(-4100 // gemv.block_n), 1, 1) and g["block"] == (32 * gemv.num_warps, 1, 1)
    assert g["grid"][0] * gemv.block_n >= 4100 > (g["grid"][0] - 1) * gemv.block_n
    big = gemm.launch(130, 4096)
    assert big["grid"][0] * gemm.block_m >= 130 and big["grid"][1] * gemm.block_n >= 4096
    assert big["shared_bytes"] == gemm.shared_bytes
    with pytest.raises(ValueError, match="at most 4 rows"):
        gemv.launch(5, 64)


def test_aot_plugin_cli_writes_kernels_and_rejects_bad_options(tmp_path: Path) -> None:
    out = tmp_path / "k"
    proc = run_python("", tmp_path, "-m", "graphopt.kernels.aot", "-o", str(out), "--bits", "4", "--group", "128",
                      "--dtype", "fp16", "--arch", "90")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads((out / "kernels.json").read_text())) == 2 and len(list(out.glob("*.ptx"))) == 2
    bad = run_python("", tmp_path, "-m", "graphopt.kernels.aot", "-o", str(tmp_path / "x"), "--bits", "5")
    assert bad.returncode != 0 and "bits must be one of" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()


def test_aot_refuses_interpreted_kernels(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        from graphopt.errors import GraphoptError
        from graphopt.kernels.aot import dq_linear_plugin_kernels
        try:
            dq_linear_plugin_kernels(4, 128, "fp16")
        except GraphoptError as e:
            print(e)
    """)
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0 and "unset TRITON_INTERPRET" in proc.stdout, proc.stderr[-2000:]

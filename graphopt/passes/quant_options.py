"""Options shared by the weight-quantization passes (rtn, gptq, decoupleq). Not a pass itself."""
from .base import Option

QUANT_OPTIONS = {
    "bits": Option(int, 4, "weight bits", choices=(2, 3, 4, 8)),
    "group": Option(int, 128, "input columns per scale/zero; -1 = per output channel", choices=(-1, 32, 64, 128)),
    "exclude": Option(str, "", "more layers to keep in float: '|'-separated globs over weight names, e.g. "
                               "'*down_proj*|*layers.0.*' (the LM head and tied embeddings are always kept)"),
    "zero": Option(str, "float", "float: any offset per group; int: an integer multiple of the scale (an integer "
                                 "zero point: ONNX Runtime's fast MatMulNBits path, no side product; see README)",
                   choices=("float", "int")),
    "device": Option(str, "cpu", "where layers are calibrated and solved (block-wise stage included); cuda: on a "
                                 "GPU copy of the program, the same results up to rounding (not yet run on a GPU)",
                     choices=("cpu", "cuda")),
    "ort_accuracy": Option(int, 4, "ONNX Runtime MatMulNBits accuracy_level: 0 = fp32 compute, "
                                   "4 = int8 activations (faster on CPU); below 4, 2-bit weights are stored "
                                   "on the 4-bit layout (ORT has no fast fp32 2-bit kernel)", choices=(0, 1, 2, 3, 4)),
    "onnx_ops": Option(str, "contrib", "contrib: each linear is one ONNX Runtime com.microsoft::MatMulNBits; "
                                       "standard: standard ONNX only (blocked DequantizeLinear + MatMul, which ONNX "
                                       "Runtime fuses into MatMulNBits at load; 2-bit weights are INT4 below "
                                       "--opset 25 or ort_accuracy=4), for other runtimes", choices=("contrib", "standard")),
}

# the column order of GPTQ-style sweeps (gptq: off by default, as in GPTQ's paper; decoupleq: on; rtn has none)
ACT_ORDER_DOC = "round the columns by descending calibration energy (H's diagonal) instead of in stored order"

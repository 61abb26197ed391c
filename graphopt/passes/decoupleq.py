from __future__ import annotations

from ..compiler import quantize as q
from ..compiler.weight_quant import WeightQuantPass
from .base import Option, Pass, register
from .quant_options import ACT_ORDER_DOC, QUANT_OPTIONS


@register
class DecoupleQ(WeightQuantPass, Pass):
    """decoupleQ: integer and float parts solved by alternating optimisation of each layer's output error."""
    name = "decoupleq"
    options = {
        **QUANT_OPTIONS,
        "bits": Option(int, 2, "weight bits", choices=(2, 3, 4, 8)),
        "group": Option(int, 64, "input columns per scale/zero; -1 = per output channel",
                        choices=(-1, 32, 64, 128)),
        "iters": Option(int, 4, "alternations of the float and integer steps", min=0, max=50),
        "integer": Option(str, "gptq", "integer step: GPTQ sweep, or projected gradient then rounding",
                          choices=("gptq", "pgd")),
        "act_order": Option(bool, True, ACT_ORDER_DOC),
        "blockwise": Option(bool, False, "then tune each repeated block's scales, zeros and norm weights to match "
                                         "its full-precision output"),
        "blockwise_steps": Option(int, 64, "Adam steps per block in the block-wise stage (one calibration "
                                           "sequence each)", min=1, max=10000),
    }

    def quantize(self, w0, H):
        c = self.config
        return q.decoupleq(w0, H, c["bits"], c["group"], iters=c["iters"], integer=c["integer"], zero=c["zero"],
                           act_order=c["act_order"])

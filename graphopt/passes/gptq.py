from __future__ import annotations

from ..compiler import quantize as q
from ..compiler.weight_quant import WeightQuantPass
from .base import Option, Pass, register
from .quant_options import ACT_ORDER_DOC, QUANT_OPTIONS


@register
class GPTQ(WeightQuantPass, Pass):
    """Baseline: GPTQ column sweep with H-weighted error compensation, min/max grids per group."""
    name = "gptq"
    options = {**QUANT_OPTIONS, "act_order": Option(bool, False, ACT_ORDER_DOC)}

    def quantize(self, w0, H):
        return q.gptq(w0, H, self.config["bits"], self.config["group"], zero=self.config["zero"],
                      act_order=self.config["act_order"])

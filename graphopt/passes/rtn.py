from __future__ import annotations

from ..compiler import quantize as q
from ..compiler.weight_quant import WeightQuantPass
from .base import Pass, register
from .quant_options import QUANT_OPTIONS


@register
class RoundToNearest(WeightQuantPass, Pass):
    """Baseline: min/max round-to-nearest weights; data-free (calibration data, when given, only measures losses)."""
    name = "rtn"
    needs = frozenset()
    options = QUANT_OPTIONS

    def quantize(self, w0, H):
        return q.rtn(w0, self.config["bits"], self.config["group"], H=H, zero=self.config["zero"])

"""The CPU weight layout TransformerLM decodes with: Linear layers whose weights oneDNN packed once.

`prepare_for_decode` is what `TextEngine` runs on a loaded model. On the CPU it swaps every Linear of
the Transformer blocks for a `PackedLinear`, which keeps the same Parameter (state_dict keys and values
are unchanged) and multiplies with a copy that oneDNN has reordered into its blocked layout, once.

Why (measured on the `small` preset, one thread, an AMD EPYC Zen 5 core; benchmarks/engine_decode.py):
torch's default CPU matmul is MKL's, which takes its AVX2 code path on AMD processors (~95 GFLOP/s at
32 rows), while oneDNN runs AVX-512 (~215 GFLOP/s); at one row (batch-1 decode) the packed layout
streams the weights from memory ~1.5x faster than MKL's matrix-vector product. End to end: batch-1
decode +26-36% and batch-32 decode +38% tokens/s, with the same tokens.

Anything else (training, autograd, another device or dtype, a torch built without oneDNN) goes through
the plain `F.linear` on the same Parameter, so a prepared model stays a normal model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc_dist.models.lm import TransformerLM


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (x86 and Arm CPU wheels do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _version(weight: Tensor) -> int:
    # Inference tensors (made under inference_mode) cannot change in place and track no version.
    return -1 if weight.is_inference() else weight._version


class PackedLinear(nn.Module):
    """`nn.Linear` for CPU inference: the same Parameters, multiplied through a oneDNN-packed copy.

    The packed copy is rebuilt when the weight changes in place (load_state_dict, an optimizer step),
    so it never goes stale. It costs one extra copy of the weight in memory.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: state_dict keys and values do not change
        self.bias = linear.bias
        self._packed: Tensor | None = None
        self._packed_version = -2

    def _packed_weight(self) -> Tensor:
        version = _version(self.weight)
        if self._packed is None or version != self._packed_version:
            # The row count is only a hint for the blocked layout; any row count works with it.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 32)
            self._packed_version = version
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not x.is_cpu or x.dtype != torch.float32 or self.weight.dtype != x.dtype:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's blocked tensor has no storage to pickle; it is rebuilt on first use.
        return {**super().__getstate__(), "_packed": None, "_packed_version": -2}


def prepare_for_decode(model: TransformerLM) -> TransformerLM:
    """Put the model in eval mode and, on a CPU with oneDNN, its block Linears in the packed layout.

    Returns the same model. Outputs are those of the plain model up to float rounding (oneDNN sums in
    another order); the tests hold greedy decoding of a prepared model to the plain full-recompute
    reference. The tied embedding / lm_head keeps its rows (the vocabulary is small, and the embedding
    lookup needs them). No-op on other devices and dtypes, and when called twice.
    """
    model.eval()
    weight = model.wte.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_linear_available():
        return model
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child))
    return model

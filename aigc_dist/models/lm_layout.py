"""The CPU weight layout TransformerLM decodes with: Linear layers whose weights oneDNN packed once.

`prepare_for_decode` is what `TextEngine` runs on a loaded model. On the CPU it swaps the Linears of
the Transformer blocks for `PackedLinear`s, which keep the same Parameters (state_dict keys and values
are unchanged) and multiply through a copy that oneDNN has reordered into its blocked layout, once.

Why, and when (measured with one thread on this machine's AMD EPYC Zen 5 core, 32 MB L3):
- Many rows (batched decode, prefill): torch's default CPU matmul is MKL's, which takes its AVX2
  code path on AMD processors (~95 GFLOP/s at 32 rows), while oneDNN runs AVX-512 (~215 GFLOP/s).
  From 16 rows on, the packed product wins for every weight of 32k elements or more.
- One row (batch-1 decode) of a model larger than the cache: every step reads all weights from
  memory, and the packed layout streams them ~1.5x faster than MKL's matrix-vector product.
- But oneDNN costs ~10 us more per call. A model whose weights stay in the cache (the demo's `mini`)
  decodes few rows faster with MKL, and small matrices always do, so those keep `F.linear`.
End to end on `small` (42.9 MB): batch-1 decode +26-36%, batch-32 decode +38% tokens/s, the same
greedy tokens; fusing the MLP's GELU into the first product adds 3% at batch 1. Training,
autograd, other devices and dtypes take the plain `F.linear` too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc_dist.models.lm import TransformerLM


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (the pinned x86 CPU wheel does).

    `torch.ops.mkldnn._linear_pointwise` / `_reorder_linear_weight` are the ops Inductor's CPU
    freezing pass emits: internal, so checked here, and a torch without them keeps the plain path.
    """
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _version(weight: Tensor) -> int:
    # Inference tensors (made under inference_mode) cannot change in place and track no version.
    return -1 if weight.is_inference() else weight._version


# oneDNN's extra ~10 us per call outweighs what it saves on smaller weights (measured, see above).
MIN_PACKED_ELEMENTS = 32 * 1024
# From this many rows, the AVX-512 GEMM wins even on weights that sit in the cache.
BATCHED_ROWS = 16
# Linear weights larger than this (a typical L3 cache) are read from memory at every decode step.
STREAMED_BYTES = 32 * 2**20


class PackedLinear(nn.Module):
    """`nn.Linear` for CPU inference: the same Parameters, multiplied through a oneDNN-packed copy
    for inputs of at least `min_rows` rows (fewer rows take the plain `F.linear`).

    The packed copy is made on first use and rebuilt when the weight changes in place
    (load_state_dict, an optimizer step), so it never goes stale. It costs one more copy of the weight.
    """

    def __init__(self, linear: nn.Linear, min_rows: int = 1, gelu: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: state_dict keys and values do not change
        self.bias = linear.bias
        self.min_rows = min_rows
        self.gelu = gelu  # apply GELU (erf) to the output: fused into oneDNN's product
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
        plain = torch.is_grad_enabled() or not x.is_cpu or x.dtype != torch.float32 or self.weight.dtype != x.dtype
        if plain or x.numel() < self.min_rows * self.in_features:
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y) if self.gelu else y
        activation = ("gelu", [], "none") if self.gelu else ("none", [], "")  # "none": erf, as nn.GELU()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, *activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, min_rows={self.min_rows}, gelu={self.gelu}")  # fmt: skip

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's blocked tensor has no storage to pickle; it is rebuilt on first use.
        return {**super().__getstate__(), "_packed": None, "_packed_version": -2}


def prepare_for_decode(
    model: TransformerLM, min_elements: int = MIN_PACKED_ELEMENTS, streamed_bytes: int = STREAMED_BYTES
) -> TransformerLM:
    """Put the model in eval mode and, on a CPU with oneDNN, its block Linears in the packed layout.

    A Linear of at least `min_elements` weights is packed; it uses the packed copy from one row on
    when the blocks' Linear weights total more than `streamed_bytes` (they stream from memory at
    every step), otherwise from BATCHED_ROWS rows on. Returns the same model. Outputs are those of the
    plain model up to float rounding (oneDNN sums in another order); the tests hold greedy decoding of
    a prepared model to the plain full-recompute reference. The tied embedding / lm_head keeps its
    rows. No-op on other devices and dtypes, and when called twice.
    """
    model.eval()
    weight = model.wte.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_linear_available():
        return model
    linears = [(module, name) for block in model.blocks
               for module, name in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                                    (block.mlp, "c_proj"))
               if type(getattr(module, name)) is nn.Linear]  # not yet prepared  # fmt: skip
    total_bytes = sum(getattr(m, name).weight.nbytes for m, name in linears)
    min_rows = 1 if total_bytes > streamed_bytes else BATCHED_ROWS
    for module, name in linears:
        linear = getattr(module, name)
        if linear.weight.numel() < min_elements:
            continue
        # The MLP's GELU runs inside its first product (one call less per block and step: +3% at batch 1).
        fuse = name == "c_fc"
        setattr(module, name, PackedLinear(linear, min_rows, gelu=fuse))
        if fuse:
            module.act = nn.Identity()
    return model

"""The weight layout Llama-family models decode with on the CPU: fused, oneDNN-packed products.

`prepare_for_decode` is what `TextEngine` runs on a loaded model. Per decoder layer it gives the
attention one q|k|v product and the MLP one gate|up product (`FusedLinear`: one call instead of
three or two, on a concatenated copy of the weights), and on a CPU with oneDNN multiplies large
products through a copy that oneDNN reordered once into its blocked layout. Parameters and the
state dict are untouched: the fused copies are derived, and rebuilt when a weight changes in place.

Why, and when (measured with one thread on this machine's AMD EPYC Zen 5 core, 32 MB L3):
- Many rows (batched decode, prefill): torch's default CPU matmul is MKL's, which takes its AVX2
  code path on AMD processors (~95 GFLOP/s at 32 rows), while oneDNN runs AVX-512 (~215 GFLOP/s).
  From 16 rows on, the packed product wins for every weight of 32k elements or more.
- One row (batch-1 decode) of a model larger than the cache: every step reads all weights from
  memory, and the packed layout streams them ~1.5x faster than MKL's matrix-vector product.
- But oneDNN costs ~10 us more per call. A model whose weights stay in the cache (the demo's `mini`)
  decodes few rows faster with MKL, and small matrices always do, so those keep `F.linear`.
Training, autograd, other devices and dtypes take the plain three-product path (no fused copy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aigc_dist.models.llama import LlamaLM


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (the pinned x86 CPU wheel does).

    `torch.ops.mkldnn._linear_pointwise` / `_reorder_linear_weight` are the ops Inductor's CPU
    freezing pass emits: internal, so checked here, and a torch without them keeps the plain path.
    """
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# oneDNN's extra ~10 us per call outweighs what it saves on smaller weights (measured, see above).
MIN_PACKED_ELEMENTS = 32 * 1024
# From this many rows, the AVX-512 GEMM wins even on weights that sit in the cache.
BATCHED_ROWS = 16
# Linear weights larger than this (a typical L3 cache) are read from memory at every decode step.
STREAMED_BYTES = 32 * 2**20


class FusedLinear(nn.Module):
    """Several `nn.Linear`s of one input as one product: y = x @ cat(W_i).T + cat(b_i).

    Inference only (the engine's decode path): it holds no Parameters of its own, only references to
    the source Linears (so it must not be registered as a submodule: the state dict stays the same),
    and a concatenated copy of their weights, rebuilt when any of them changes in place. With
    `packed` the copy is in oneDNN's blocked layout and used for inputs of at least `min_rows` rows.
    """

    def __init__(self, linears: list[nn.Linear], packed: bool = False, min_rows: int = 1) -> None:
        super().__init__()
        self._sources = linears  # a plain list: not submodules, so not in state_dict or parameters()
        # Their Parameters, whose version counters say when a copy is stale. Held here because reading
        # `linear.weight` goes through nn.Module's attribute lookup, ~0.6 us each: the check cost ~5 us
        # per product call (24 calls a step for `small`), now ~1 us. Inference tensors (made under
        # inference_mode) cannot change in place outside it and track no version: not checked.
        self._tracked = [t for lin in linears for t in (lin.weight, lin.bias) if t is not None and not t.is_inference()]
        self.packed, self.min_rows = packed, min_rows
        self.in_features = linears[0].in_features
        self._weight: Tensor | None = None
        self._bias: Tensor | None = None
        self._packed: Tensor | None = None
        self._versions: list[int] = []

    def _refresh(self) -> None:
        versions = [t._version for t in self._tracked]
        if self._weight is not None and versions == self._versions:
            return
        with torch.no_grad():
            self._weight = torch.cat([lin.weight.detach() for lin in self._sources]).contiguous()
            biases = [lin.bias for lin in self._sources]
            self._bias = None if all(b is None for b in biases) else torch.cat([
                b.detach() if b is not None else lin.weight.new_zeros(lin.out_features)
                for lin, b in zip(self._sources, biases, strict=True)])  # fmt: skip
            # The row count is only a hint for the blocked layout; any row count works with it.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self._weight, 32) if self.packed else None
        self._versions = versions

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # training through a prepared model: the source Parameters, with autograd
            return torch.cat([lin(x) for lin in self._sources], dim=-1)
        self._refresh()
        rows = x.numel() // self.in_features
        if self._packed is not None and x.is_cpu and x.dtype == torch.float32 and rows >= self.min_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self._bias, "none", [], "")
        return F.linear(x, self._weight, self._bias)

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's blocked tensor has no storage to pickle; everything derived is rebuilt on first use.
        return {**super().__getstate__(), "_weight": None, "_bias": None, "_packed": None, "_versions": []}


class PackedLinear(nn.Module):
    """`nn.Linear` for CPU inference: the same Parameters, multiplied through a oneDNN-packed copy
    for inputs of at least `min_rows` rows (fewer rows take the plain `F.linear`)."""

    def __init__(self, linear: nn.Linear, min_rows: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: state_dict keys and values do not change
        self.bias = linear.bias
        self.fused = FusedLinear([linear], packed=True, min_rows=min_rows)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or not x.is_cpu or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        return self.fused(x)


def prepare_for_decode(
    model: LlamaLM, min_elements: int = MIN_PACKED_ELEMENTS, streamed_bytes: int = STREAMED_BYTES
) -> LlamaLM:
    """Put the model in eval mode and give every layer its fused q|k|v and gate|up products; on a CPU
    with oneDNN and float32 weights, the large ones (and o_proj / down_proj) packed.

    A product of at least `min_elements` weights is packed; it uses the packed copy from one row on
    when the layers' weights total more than `streamed_bytes` (they stream from memory at every
    step), otherwise from BATCHED_ROWS rows on. Returns the same model. Outputs are the plain model's
    up to float rounding (sums in another order); the tests hold greedy decoding of a prepared model to
    the plain full recompute and to transformers' generate(). Calling it twice changes nothing.
    """
    model.eval()
    weight = model.embed_tokens.weight
    can_pack = weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_linear_available()
    linears = [lin for layer in model.layers for lin in layer.modules() if isinstance(lin, nn.Linear)]
    total_bytes = sum(lin.weight.nbytes for lin in linears)
    min_rows = 1 if total_bytes > streamed_bytes else BATCHED_ROWS

    def pack(lins: list[nn.Linear]) -> bool:
        return can_pack and sum(lin.weight.numel() for lin in lins) >= min_elements

    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_fused is None:
            sources = [attn.q_proj, attn.k_proj, attn.v_proj]
            attn.qkv_fused = FusedLinear(sources, packed=pack(sources), min_rows=min_rows)
        if mlp.gate_up_fused is None:
            sources = [mlp.gate_proj, mlp.up_proj]
            mlp.gate_up_fused = FusedLinear(sources, packed=pack(sources), min_rows=min_rows)
        for module, name in ((attn, "o_proj"), (mlp, "down_proj")):
            linear = getattr(module, name)
            if type(linear) is nn.Linear and pack([linear]):
                setattr(module, name, PackedLinear(linear, min_rows))
    return model

"""Training-free long context at inference (paper §2.5, docs/paper.md §5), as Qwen v1 does it.

Three options, all off by default (``base.long_context_config.LongContextConfig`` holds them), each
hooked into megatron-core without touching its code:

* **dynamic NTK RoPE** — ``DynamicNTKRotaryEmbedding``, a subclass of megatron's
  ``RotaryEmbedding`` swapped into ``GPTModel.rotary_pos_emb`` after construction. The RoPE base
  grows with the sequence length ``L`` over the training length ``S`` exactly as in Qwen v1's
  ``modeling_qwen.py``::

      context_value = log2(L / S) + 1
      alpha = max(2 ** ceil(context_value) - 1, 1)        # 1 while L <= S; 3 up to 2S; 7 up to 4S
      base' = base * alpha ** (dim / (dim - 2))
      inv_freq = 1 / base' ** (arange(0, dim, 2) / dim)    # FP32, as megatron computes it

  ``L`` is the length of the whole sequence in a plain forward. With megatron's KV cache
  (``StaticInferenceContext``) ``L`` is the prompt length at the prefill and that alpha is kept for
  every decoding step of the same context, as Qwen does (its cache holds keys rotated with the
  prefill alpha; megatron caches un-rotated keys and rotates them all with the kept alpha, which is
  the same thing). Like Qwen, training mode always uses alpha 1. ``rope_alpha`` fixes alpha instead.
* **LogN attention** — a core-attention mixin that multiplies the query at absolute position ``n``
  (1-indexed) by ``log(n) / log(S)`` when ``n > S`` and by 1 otherwise (Qwen v1's ``logn_list``),
  in eval mode only (as Qwen). The query's absolute positions are ``sk - sq + 1 .. sk``: the core
  attention receives every cached key, so in KV-cache decoding this is ``sequence_len_offset + 1``.
* **layer-wise window attention** — per-layer sliding windows through megatron's own
  ``TransformerConfig.window_size``: layer ``i`` (0-indexed) with window ``w`` gets
  ``window_size = (w - 1, 0)``, i.e. the token at position ``p`` attends to keys ``p - w + 1 .. p``
  (itself and the ``w - 1`` before it; at most ``w`` tokens). ``None``/0 is full causal attention.
  The local path masks with ``get_sliding_window_causal_mask`` in ``FusedScaleMaskSoftmax``; the TE
  path passes the same ``window_size`` to TE's ``DotProductAttention``. Windows apply in training
  and inference alike (they are part of the attention pattern, not a length extrapolation).

Every option leaves the model bit-identical at or below the training length (windows: at or below
the window), so the same checkpoint serves short and long prompts.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

# ----------------------------------------------------------------------------- dynamic NTK RoPE


def ntk_alpha(seq_len: int, train_seq_length: int) -> int:
    """Qwen v1's ``get_ntk_alpha``: 1 up to the training length, then 3, 7, 15... per doubling."""
    context_value = math.log(seq_len / train_seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_inv_freq(rotary_base: float, dim: int, alpha: float) -> torch.Tensor:
    """RoPE inverse frequencies (FP32) for an NTK alpha: the base becomes
    ``base * alpha ** (dim / (dim - 2))`` (Qwen v1 ``update_rotary_pos_emb_cache``)."""
    base = rotary_base * alpha ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


_ALPHA_ATTR = "_qwen_ntk_alpha"  # kept on the inference context from prefill to decode


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """megatron's ``RotaryEmbedding`` whose base grows with the sequence length (module docstring).

    ``GPTModel`` asks ``get_rotary_seq_len`` and then calls ``forward`` in the same preprocessing
    step; the first sees the inference context and the true input length, so it chooses alpha and
    the second builds the table with it. Alpha 1 goes through megatron's own (cached) forward, so
    outputs are bit-identical to the plain model up to the training length.
    """

    def __init__(
        self,
        *args: Any,
        train_seq_length: int,
        rotary_base: float = 10000,
        fixed_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, rotary_base=rotary_base, **kwargs)
        self.rotary_base = rotary_base
        self.dim = self.inv_freq.numel() * 2
        self.train_seq_length = train_seq_length
        self.fixed_alpha = fixed_alpha
        self.current_alpha: float = 1

    def alpha_for(self, seq_len: int, inference_context: Any = None, step_len: int = 0) -> float:
        """Alpha for a forward over ``seq_len`` positions (``step_len`` new ones with a context)."""
        if self.training:
            return 1  # Qwen v1: dynamic NTK is inference-only
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        if inference_context is None:
            return ntk_alpha(seq_len, self.train_seq_length)
        if not inference_context.is_static_batching():
            raise NotImplementedError("dynamic-ntk RoPE supports megatron's static KV cache only")
        offset = inference_context.sequence_len_offset
        if offset == 0 or not hasattr(inference_context, _ALPHA_ATTR):  # prefill: from the prompt
            setattr(
                inference_context, _ALPHA_ATTR, ntk_alpha(offset + step_len, self.train_seq_length)
            )
        return getattr(inference_context, _ALPHA_ATTR)

    def get_rotary_seq_len(
        self,
        inference_context: Any,
        transformer: Any,
        transformer_input: torch.Tensor,
        transformer_config: Any,
        packed_seq_params: Any = None,
        *,
        inference_params: Any = None,
    ) -> int:
        seq_len = super().get_rotary_seq_len(
            inference_context,
            transformer,
            transformer_input,
            transformer_config,
            packed_seq_params,
            inference_params=inference_params,
        )
        context = inference_context if inference_context is not None else inference_params
        step_len = 0
        if context is not None:
            held = getattr(transformer, "input_tensor", None)  # a later pipeline stage's input
            source = held if held is not None else transformer_input
            step_len = source.size(0)
            if transformer_config.sequence_parallel:
                step_len *= transformer_config.tensor_model_parallel_size
        self.current_alpha = self.alpha_for(seq_len, context, step_len)
        return seq_len

    def forward(
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> torch.Tensor:
        if self.current_alpha == 1:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        plain = self.inv_freq
        self.inv_freq = ntk_inv_freq(self.rotary_base, self.dim, self.current_alpha).to(
            plain.device
        )
        try:
            emb = self.get_emb(max_seq_len, offset)
        finally:
            self.inv_freq = plain
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb


def install_dynamic_ntk(
    model: torch.nn.Module, rotary_base: float, train_seq_length: int, alpha: float | None
) -> None:
    """Swap a built ``GPTModel``'s RoPE for the dynamic-NTK one (same kv_channels, base, device)."""
    old = model.rotary_pos_emb
    config = model.config
    new = DynamicNTKRotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=model.rotary_percent,
        rotary_interleaved=config.rotary_interleaved,
        rotary_base=rotary_base,
        use_cpu_initialization=old.inv_freq.device.type == "cpu",
        cp_group=old.cp_group,
        train_seq_length=train_seq_length,
        fixed_alpha=alpha,
    )
    new.inv_freq = old.inv_freq  # the very tensor megatron computed: alpha 1 stays bit-identical
    model.rotary_pos_emb = new


# ----------------------------------------------------------------------------- LogN attention


def logn_factors(start: int, length: int, train_seq_length: int) -> torch.Tensor:
    """Qwen v1's ``logn_list`` for absolute positions ``start+1 .. start+length`` (1-indexed):
    ``log(n) / log(S)`` past the training length ``S``, exactly 1 at or before it (FP32)."""
    n = torch.arange(start + 1, start + length + 1, dtype=torch.float64)
    factors = torch.where(n > train_seq_length, n.log() / math.log(train_seq_length), 1.0)
    return factors.float()


def scale_query_logn(query: torch.Tensor, key_len: int, train_seq_length: int) -> torch.Tensor:
    """``query`` [sq, b, np, hn] scaled for its absolute positions ``key_len - sq + 1 .. key_len``
    (the last ``sq`` of the ``key_len`` keys attended to); unchanged when none is past ``S``."""
    if key_len <= train_seq_length:
        return query
    sq = query.size(0)
    factors = logn_factors(key_len - sq, sq, train_seq_length).to(query.device, query.dtype)
    return query * factors.view(sq, 1, 1, 1)


class LogNQueryScaling:
    """Mixin for a megatron core attention (``DotProductAttention``, ``TEDotProductAttention``):
    scale the query by the LogN factors of its positions before attending (eval mode only)."""

    logn_train_length: int

    def forward(self, query, key, value, attention_mask, *args, **kwargs):  # noqa: ANN001, ANN201
        if not self.training:
            packed = kwargs.get("packed_seq_params") or (args[2] if len(args) > 2 else None)
            if packed is not None:
                raise NotImplementedError("logn_attention does not support packed (thd) sequences")
            if self.config.context_parallel_size > 1:
                raise NotImplementedError("logn_attention does not support context parallelism")
            query = scale_query_logn(query, key.size(0), self.logn_train_length)
        return super().forward(query, key, value, attention_mask, *args, **kwargs)


class LogNDotProductAttention(LogNQueryScaling, DotProductAttention):
    """megatron's local ``DotProductAttention`` with LogN query scaling."""


@functools.cache
def _logn_class(base: type) -> type:
    if base is DotProductAttention:
        return LogNDotProductAttention
    return type(f"LogN{base.__name__}", (LogNQueryScaling, base), {})


# ----------------------------------------------------------------------------- layer spec


class LongContextCoreAttention:
    """A ``CoreAttentionBuilder`` (what ``SelfAttentionSubmodules.core_attention`` holds): builds
    ``base`` with this layer's window in its config, and LogN query scaling when asked.

    ``Attention`` calls it with the global 1-indexed ``layer_number``, so one layer spec serves every
    layer and pipeline stage. The window is set through megatron's ``TransformerConfig.window_size``
    on a copy of the config (``window_attn_skip_freq`` cleared), which both the local
    ``DotProductAttention`` and ``TEDotProductAttention`` honour.
    """

    def __init__(
        self,
        base: Any,
        layer_windows: Sequence[int | None] | None = None,
        logn_train_length: int | None = None,
    ) -> None:
        self.base = base
        self.layer_windows = tuple(layer_windows) if layer_windows else None
        self.logn_train_length = logn_train_length

    def window(self, layer_number: int) -> int | None:
        if self.layer_windows is None:
            return None
        return self.layer_windows[layer_number - 1] or None

    def __call__(self, config: Any, layer_number: int, **kwargs: Any) -> torch.nn.Module:
        window = self.window(layer_number)
        if window is not None:
            config = copy.copy(config)
            config.window_size = window_size(window)
            config.window_attn_skip_freq = None
        cls = self.base
        if self.logn_train_length is not None:
            cls = _logn_class(cls)
        module = cls(config=config, layer_number=layer_number, **kwargs)
        if self.logn_train_length is not None:
            module.logn_train_length = self.logn_train_length
        return module


def window_size(window: int) -> tuple[int, int]:
    """megatron/TE ``(left, right)`` for a causal window of ``window`` tokens including itself."""
    return (window - 1, 0)


def with_long_context(
    spec: ModuleSpec,
    layer_windows: Sequence[int | None] | None,
    logn_train_length: int | None,
) -> ModuleSpec:
    """A copy of a GPT layer spec whose core attention is a ``LongContextCoreAttention``."""
    if not any(layer_windows or ()) and logn_train_length is None:
        return spec
    attention = spec.submodules.self_attention
    core = attention.submodules.core_attention
    builder = LongContextCoreAttention(core, layer_windows, logn_train_length)
    return replace(
        spec,
        submodules=replace(
            spec.submodules,
            self_attention=replace(
                attention, submodules=replace(attention.submodules, core_attention=builder)
            ),
        ),
    )

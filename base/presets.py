"""Qwen base-model sizes.

The paper rows take hidden size, heads and layers from Table 1 of the Qwen technical report
(arXiv 2309.16609, §2.3), the SwiGLU FFN width and the padded vocabulary from the released
checkpoints (docs/paper.md §2). Qwen v1 uses full multi-head attention, so
``num_query_groups == num_attention_heads``. The tiny presets keep the architecture and the real
151,936-entry vocabulary so that tokenizer, data and checkpoints are the real ones on a laptop CPU;
their embedding tables dominate their size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QwenPreset:
    name: str
    hidden_size: int
    num_attention_heads: int
    num_layers: int
    ffn_hidden_size: int
    padded_vocab_size: int
    num_query_groups: int | None = None  # None: full MHA (Qwen v1)
    max_position_embeddings: int = 8192
    rotary_base: float = 10000.0  # released checkpoints' rotary_emb_base (docs/paper.md §2)
    norm_epsilon: float = 1e-6  # released checkpoints' layer_norm_epsilon (docs/paper.md §2)

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def num_params(self) -> int:
        """Parameter count: untied embedding and output, Q/K/V biases, two RMSNorms per layer."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        kv = self.query_groups * self.kv_channels
        attention = h * (h + 2 * kv) + (h + 2 * kv) + h * h
        mlp = 3 * h * f
        return self.num_layers * (attention + mlp + 2 * h) + 2 * v * h + h


PRESETS: dict[str, QwenPreset] = {
    p.name: p
    for p in (
        # Paper Table 1; FFN width and padded vocabulary of the released checkpoints.
        QwenPreset("qwen-1.8b", 2048, 16, 24, 5504, 151936),
        QwenPreset("qwen-7b", 4096, 32, 32, 11008, 151936),
        QwenPreset("qwen-14b", 5120, 40, 40, 13696, 152064),
        # CPU presets: the real vocabulary, a small trunk. Heads, FFN and layers are even so that
        # TP=2 and PP=2 divide them.
        QwenPreset("qwen-tiny", 128, 4, 4, 352, 151936, max_position_embeddings=2048),
        QwenPreset("qwen-nano", 32, 4, 2, 96, 151936, max_position_embeddings=2048),
    )
}


def get_preset(name: str) -> QwenPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None

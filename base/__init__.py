"""The Qwen base model: presets, megatron-core builder, tokenizer, checkpoint conversion."""

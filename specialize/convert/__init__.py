"""Hugging Face checkpoints in and out (hf) and the parity gate against transformers (parity)."""

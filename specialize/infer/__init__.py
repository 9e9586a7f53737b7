"""Inference on a checkpoint at any TP/PP: its model (model), full logits across pipeline stages
(logits), token likelihoods over windows (likelihood) and generation (generate)."""

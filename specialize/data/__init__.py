"""Pretraining data: preparation of indexed shards and the datasets that read them."""

"""Offline command-line tools (embed_text, make_shards); they may use models and data."""

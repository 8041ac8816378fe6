"""Data: local text files -> tokenizer -> token cache on disk -> batches deterministic in (seed, step, rank)."""

from fp8train.data.loader import TokenData, build_data

__all__ = ["TokenData", "build_data"]

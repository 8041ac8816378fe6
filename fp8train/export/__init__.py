"""Exports of fp8train checkpoints to other formats."""

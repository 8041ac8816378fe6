"""Shared test setup: nothing writes outside tmp dirs, nothing reaches the network."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """One tokenizer/token cache for the whole session (tokenizers train once) and wandb kept in tmp."""
    base = tmp_path_factory.mktemp("env")
    env = {
        "FP8TRAIN_CACHE_DIR": str(base / "cache"),
        "WANDB_DIR": str(base / "wandb"),
        "WANDB_CACHE_DIR": str(base / "wandb"),
        "WANDB_CONFIG_DIR": str(base / "wandb"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

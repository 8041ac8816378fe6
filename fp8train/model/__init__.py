"""The Llama model: plain PyTorch, Hugging Face parameter names, no precision logic."""

from fp8train.model.llama import Llama, RMSNorm, build_model, empty_model
from fp8train.model.mlp import SwiGLU

__all__ = ["Llama", "RMSNorm", "SwiGLU", "build_model", "empty_model"]

"""fp8train: FP8 training of Llama-style models with Smooth-SwiGLU, on Gaudi2, CUDA and CPU."""

__version__ = "0.1.0"

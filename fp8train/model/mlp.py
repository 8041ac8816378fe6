"""The SwiGLU MLP of a Llama block.

Notation used everywhere in fp8train (x is the normed residual stream, one row per token):

    g = x @ W_gate.T        gate_proj  (d_model -> ffn_dim), the gated branch
    u = x @ W_up.T          up_proj    (d_model -> ffn_dim), the linear branch
    h = silu(g) * u         the input of the down projection, where SwiGLU's outliers appear
    y = h @ W_down.T        down_proj  (ffn_dim -> d_model)

Fishman et al. 2025 ("Scaling FP8 training to trillion-token LLMs") call W_up w1, W_gate w2 and W_down w3.
Once weight decay aligns w_up_j with ±w_gate_j, neuron j of h grows quadratically in x; that is what the
Smooth-SwiGLU variants in fp8train/precision rescale. They replace this module in place, so they keep its
attribute names (gate_proj, up_proj, down_proj) and its forward signature: keep this class that simple.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """y = down_proj(silu(gate_proj(x)) * up_proj(x)), bias-free, named as in Hugging Face's LlamaMLP."""

    same_input = ("gate_proj", "up_proj")  # linears applied to one tensor (a converter may share its cast)

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.up_proj = nn.Linear(d_model, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

"""A Llama-style decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Shape legend (suffixes on tensor names, e.g. x_BTD):
    B batch    T time (sequence position)    D d_model    H query heads    K key/value heads
    E head_dim (D / H)    F ffn_dim    V vocab_size

Module and parameter names are those of Hugging Face's LlamaForCausalLM (embed_tokens, layers.{i}.self_attn.q_proj,
..., norm, lm_head), so this state_dict is HF's with the leading "model." dropped: export is a straight copy.
The arithmetic follows HF's as well (RMSNorm in float32, RoPE tables in float32, rotate_half convention), so the
logits of an exported model equal these. Nothing here knows about FP8, devices or distribution: the precision
converter (fp8train/precision) swaps modules after build_model, keeping these names.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fp8train.config import ModelConfig
from fp8train.model.mlp import SwiGLU


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim, computed as HF's LlamaRMSNorm computes it."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        # float32: the mean of squares overflows float16 once |x| > 256, and bfloat16's 8-bit mantissa makes it coarse.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight multiply, as HF does, so an exported model rounds at the same place.
        return self.weight * x32.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings for positions 0..max_seq_len-1, in HF's convention."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        # Not persistent: the tables are a function of the config, so checkpoints and HF exports leave them out.
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)  # (T, E)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)  # (T, E)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the tables, e.g. after the model was materialised from the meta device."""
        # float32 throughout, as HF computes them: angles up to max_seq_len radians need float32's 24-bit mantissa
        # (in bfloat16 the angle at position 4000 would be off by up to 8 radians).
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        pos = torch.arange(self.max_seq_len, dtype=torch.float32)
        freqs_TE2 = pos[:, None] * inv_freq[None, :]
        # HF pairs dim i with dim i + E/2 (rotate_half), not adjacent dims as in Meta's original complex form;
        # the two differ by a permutation of q/k rows, so matching HF keeps its checkpoints loadable as is.
        emb_TE = torch.cat((freqs_TE2, freqs_TE2), dim=-1)
        self.cos.copy_(emb_TE.cos())
        self.sin.copy_(emb_TE.sin())


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + E/2) pair of x at position t by angle t * inv_freq_i."""
    return x_BHTE * cos_TE + rotate_half(x_BHTE) * sin_TE


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE; H query heads share K key/value heads."""

    same_input = ("q_proj", "k_proj", "v_proj")  # linears applied to one tensor (a converter may share its cast)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # The attention kernel: PyTorch's SDPA; a device backend may put its fused kernel here (same signature).
        self.sdpa = F.scaled_dot_product_attention

    def forward(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
        q_BHTE = self.q_proj(x_BTD).view(B, T, H, E).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(B, T, K, E).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(B, T, K, E).transpose(1, 2)
        q_BHTE = apply_rope(q_BHTE, cos_TE, sin_TE)
        k_BKTE = apply_rope(k_BKTE, cos_TE, sin_TE)
        # Scale 1/sqrt(E) keeps the logits of the softmax O(1) at init; enable_gqa lets query head h read kv head
        # h // (H / K) without materialising the repeated k/v.
        y_BHTE = self.sdpa(q_BHTE, k_BKTE, v_BKTE, is_causal=True, enable_gqa=K != H)
        y_BTD = y_BHTE.transpose(1, 2).reshape(B, T, H * E)
        return self.o_proj(y_BTD)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TE, sin_TE)
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD


class Llama(nn.Module):
    """Token embedding, n_layers blocks, final RMSNorm, lm_head: tokens (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problems = cfg.check("model")
        if cfg.vocab_size is None:
            problems.append("model.vocab_size=null: the model needs a vocabulary size (the tokenizer's, or set it)")
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        # Same order as HF's LlamaForCausalLM, so state_dict keys come out in HF's order too.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, scaled-down residual projections, unit norms; uses the caller's RNG."""
        std = self.cfg.init_std
        # o_proj and down_proj write into the residual stream, which sums 2 * n_layers of them: scaling their std
        # by 1/sqrt(2 * n_layers) (GPT-2, Megatron) keeps the stream's variance at init independent of depth.
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("self_attn.o_proj", "mlp.down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.rotary_emb.reset_tables()

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T); position t sees tokens 0..t only. No loss here."""
        T = tokens_BT.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len} (the RoPE tables end there); "
                "shorten the sequences (data.seq_len) or raise model.max_seq_len"
            )
        x_BTD = self.embed_tokens(tokens_BT)
        # Tables in the residual stream's dtype, as HF does: float32 rotation under autocast, the model's dtype else.
        cos_TE = self.rotary_emb.cos[:T].to(x_BTD.dtype)
        sin_TE = self.rotary_emb.sin[:T].to(x_BTD.dtype)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_TE, sin_TE)
        return self.lm_head(self.norm(x_BTD))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, a tied weight once. exclude_embeddings drops the input lookup table only: lm_head is a
        matmul and stays, also when tied (nanoGPT's convention; the N in FLOPs ~ 6 * N * tokens)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            n -= self.embed_tokens.weight.numel()
        return n


def build_model(cfg: ModelConfig) -> Llama:
    """A freshly initialised Llama on the default device and dtype, seeded by the caller's torch RNG."""
    return Llama(cfg)


def empty_model(cfg: ModelConfig) -> Llama:
    """A Llama on the meta device, for weights to be loaded into (fp8train.export.hf.load_weights): no memory and no
    time go to random weights that would be overwritten (for a 7B model, 27 GB and minutes of init)."""
    with torch.device("meta"):
        return build_model(cfg)

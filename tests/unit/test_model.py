"""The Llama model: equality with transformers' LlamaForCausalLM, causality, GQA, RMSNorm, RoPE, init, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from fp8train.config import ModelConfig
from fp8train.model import Llama, RMSNorm, SwiGLU, build_model
from fp8train.model.llama import RotaryEmbedding, apply_rope


def tiny(**overrides) -> ModelConfig:
    sizes = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=24, init_std=0.1)
    return ModelConfig(**{**sizes, **overrides})


def tokens(cfg: ModelConfig, B: int = 2, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_llama(cfg: ModelConfig, model: Llama):
    """transformers' LlamaForCausalLM with the same config, holding a copy of model's weights."""
    from transformers import LlamaForCausalLM

    from fp8train.export.hf import hf_config, hf_state_dict

    # sdpa: eager attention's softmax runs in float32, which would cap a float64 comparison.
    hf_cfg = hf_config(cfg, attn_implementation="sdpa")
    assert hf_cfg.rope_parameters["rope_theta"] == cfg.rope_theta
    hf = LlamaForCausalLM(hf_cfg).eval()
    renamed = hf_state_dict(model)
    assert set(renamed) == set(hf.state_dict()), "parameter names must equal HF's, minus the 'model.' prefix"
    hf.load_state_dict(renamed, strict=True)
    return hf


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # multi-head attention, untied, default theta
        dict(n_kv_heads=2, tie_embeddings=True, rope_theta=500000.0),  # grouped-query, tied, Llama-3 theta
    ],
    ids=["mha_untied", "gqa_tied_theta5e5"],
)
def test_logits_equal_transformers_llama(overrides):
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    model = build_model(cfg).double().eval()
    hf = hf_llama(cfg, model).double()
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = tokens(cfg, T=cfg.max_seq_len)
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)

    # The comparison is sensitive to theta: the same weights with another theta give visibly different logits.
    other = build_model(tiny(**{**overrides, "rope_theta": 1000.0})).double().eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (other(x) - theirs).abs().max() > 1e-3


def test_logits_equal_transformers_llama_float32():
    torch.manual_seed(1)
    cfg = tiny(n_kv_heads=1)
    model = build_model(cfg).eval()
    hf = hf_llama(cfg, model)
    x = tokens(cfg, T=cfg.max_seq_len)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_bit_equal_transformers_from_pretrained(tmp_path):
    """The export path: save in float32, load in bfloat16, and the logits equal ours in bfloat16 bit for bit."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    cfg = tiny(n_kv_heads=2)
    model = build_model(cfg).eval()
    hf_llama(cfg, model).save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    # from_pretrained keeps HF's inv_freq in float32; a plain .to(bfloat16) on HF's module would round it
    # (and shift its logits), while our cos/sin tables are rounded after the float32 trigonometry either way.
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32
    model = model.to(torch.bfloat16)
    x = tokens(cfg, T=cfg.max_seq_len)
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


def test_state_dict_keys_are_hf_names():
    keys = set(build_model(tiny(n_layers=1)).state_dict())
    assert keys == {
        "embed_tokens.weight",
        "layers.0.input_layernorm.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight",
        "layers.0.self_attn.o_proj.weight",
        "layers.0.post_attention_layernorm.weight",
        "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight",
        "layers.0.mlp.down_proj.weight",
        "norm.weight",
        "lm_head.weight",
    }


def test_causal_changing_token_t_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg).eval()
    x = tokens(cfg, B=1, T=16)
    for t in (0, 5, 15):
        y = x.clone()
        y[0, t] = (x[0, t] + 1) % cfg.vocab_size
        with torch.no_grad():
            a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
        assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees the change


def test_gqa_equals_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa_cfg = tiny(n_heads=8, n_kv_heads=2)
    gqa = build_model(gqa_cfg).eval()
    mha = build_model(tiny(n_heads=8)).eval()
    group, E = gqa_cfg.n_heads // gqa_cfg.kv_heads, gqa_cfg.head_dim
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w_KED = state[name].view(gqa_cfg.kv_heads, E, gqa_cfg.d_model)
            # query head h reads kv head h // group
            state[name] = w_KED.repeat_interleave(group, dim=0).reshape(gqa_cfg.n_heads * E, gqa_cfg.d_model)
    mha.load_state_dict(state)
    x = tokens(gqa_cfg)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_rmsnorm_float32_matches_float64_formula():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 64) * 3.0
    y = norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), rms_norm_float64(x, norm.weight, 1e-5), rtol=1e-6, atol=1e-6)


def test_rmsnorm_bfloat16_input_computes_in_float32_and_returns_bfloat16():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 64) * 3.0).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    # Two bfloat16 roundings (after normalising, after the weight multiply): ~2 * 2^-9 relative.
    torch.testing.assert_close(y.double(), rms_norm_float64(x, norm.weight, 1e-5), rtol=8e-3, atol=1e-3)
    # HF's order exactly: normalise in float32, round to bf16, then multiply by the bf16 weight.
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(y, expected)


def test_rmsnorm_float16_large_values_do_not_overflow():
    norm = RMSNorm(16).half()
    x = torch.full((2, 16), 1000.0, dtype=torch.float16)  # x^2 = 1e6 > float16 max 65504
    y = norm(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.ones(2, 16), rtol=1e-3, atol=1e-3)


def test_rope_score_depends_only_on_relative_position():
    torch.manual_seed(0)
    E, theta = 16, 10000.0
    rope = RotaryEmbedding(E, max_seq_len=64, theta=theta)
    q, k = torch.randn(E), torch.randn(E)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, rope.cos[m], rope.sin[m])
        kn = apply_rope(k, rope.cos[n], rope.sin[n])
        return float(qm @ kn)

    by_offset = {}
    for d in (0, 1, 3, 7, 20):
        scores = torch.tensor([score(m, m - d) for m in range(d, 60, 7)])
        torch.testing.assert_close(scores, scores[:1].expand_as(scores), rtol=0, atol=1e-4)
        by_offset[d] = float(scores[0])
    assert by_offset[0] == pytest.approx(float(q @ k), abs=1e-5)  # no rotation between equal positions
    assert len({round(s, 3) for s in by_offset.values()}) == len(by_offset)  # and the offset does matter
    # HF's frequencies: dim pair (i, i + E/2) turns by theta^(-2i/E) per position.
    i = 3
    assert math.atan2(float(rope.sin[1, i]), float(rope.cos[1, i])) == pytest.approx(theta ** (-2 * i / E), rel=1e-5)
    assert torch.equal(rope.cos[:, :i], rope.cos[:, E // 2 : E // 2 + i])


@torch.no_grad()
def test_init_stds_and_norms():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, ffn_dim=1024, init_std=0.02)
    model = build_model(cfg)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    layer = model.layers[-1]
    for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.mlp.gate_proj.weight,
              layer.mlp.up_proj.weight, model.embed_tokens.weight, model.lm_head.weight):  # fmt: skip
        assert float(w.std()) == pytest.approx(0.02, rel=0.02)
        assert abs(float(w.mean())) < 1e-3
    for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
        assert float(w.std()) == pytest.approx(residual_std, rel=0.02)
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * cfg.n_layers + 1
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)


def test_init_uses_callers_rng():
    cfg = tiny()
    torch.manual_seed(7)
    a = build_model(cfg).state_dict()
    torch.manual_seed(7)
    b = build_model(cfg).state_dict()
    torch.manual_seed(8)
    c = build_model(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"])


def closed_form_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, embedding table) for a Llama of cfg."""
    D, F_, V, E = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    attn = D * cfg.n_heads * E * 2 + D * cfg.kv_heads * E * 2  # q, o + k, v
    per_layer = attn + 3 * D * F_ + 2 * D
    total = cfg.n_layers * per_layer + D + V * D + (0 if cfg.tie_embeddings else V * D)
    return total, V * D


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_closed_form(tie):
    cfg = tiny(n_kv_heads=2, tie_embeddings=tie)
    model = build_model(cfg)
    total, embedding = closed_form_params(cfg)
    assert model.num_params() == total
    # The lookup table is excluded; lm_head stays (a matmul), so a tied model's count does not change.
    assert model.num_params(exclude_embeddings=True) == (total if tie else total - embedding)


def test_tied_embeddings_share_one_tensor():
    model = build_model(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    with torch.no_grad():
        model.embed_tokens.weight[3, 0] = 123.0
    assert float(model.lm_head.weight.detach()[3, 0]) == 123.0
    untied = build_model(tiny())
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_sequence_longer_than_max_seq_len_raises():
    cfg = tiny()
    model = build_model(cfg)
    model(tokens(cfg, T=cfg.max_seq_len))  # the limit itself is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(cfg, T=cfg.max_seq_len + 1))


def test_missing_vocab_size_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(tiny(vocab_size=None))


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="n_kv_heads"):
        build_model(tiny(n_kv_heads=3))


def test_swiglu_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 12)
    x = torch.randn(2, 3, 8)
    g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    expected = (g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_forward_backward_finite(tie):
    torch.manual_seed(0)
    cfg = tiny(n_kv_heads=2, tie_embeddings=tie)
    model = build_model(cfg)
    x = tokens(cfg, B=3, T=cfg.max_seq_len)
    logits = model(x)
    assert logits.shape == (3, cfg.max_seq_len, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
    # Small init: logits near zero, so the loss starts near log(V).
    assert loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.1)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

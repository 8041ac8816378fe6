"""Export an fp8train checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

fp8train's Llama uses Hugging Face's parameter names and arithmetic (fp8train/model/llama.py), so the export is
a rename (``model.`` prefix, ``lm_head`` as is) plus a config. What a precision recipe added is left out: FP8
scaling state (``*_scaler.*`` buffers) is training state, not weights, and Smooth-SwiGLU is exact, so it needs
no extra weights: the exported model is a plain Llama whose logits equal fp8train's forward.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tokenizers import Tokenizer

from fp8train.config import ModelConfig
from fp8train.errors import CheckpointError
from fp8train.model import Llama, build_model

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def hf_config(cfg: ModelConfig, eos_id: int | None = None, dtype: torch.dtype = torch.float32, **extra):
    """transformers' LlamaConfig describing the same model as ``cfg`` (``extra``: more LlamaConfig fields)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        # transformers >= 5 keeps theta inside rope_parameters (a top-level rope_theta is moved there).
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype=dtype,
        **extra,
    )


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face's names."""
    return {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in model.state_dict().items()}


def load_checkpoint_model(ckpt: Path) -> Llama:
    """The plain (unconverted) Llama of an fp8train checkpoint folder, in fp32."""
    ckpt = Path(ckpt)
    if not (ckpt / "model.safetensors").is_file() or not (ckpt / "config.yaml").is_file():
        raise CheckpointError(f"{ckpt}: not an fp8train checkpoint (needs model.safetensors and config.yaml).")
    raw = OmegaConf.load(ckpt / "config.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.model))
    model = build_model(cfg)
    saved = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if "_scaler." not in k}
    missing, unexpected = model.load_state_dict(saved, strict=False)
    # safetensors stores a tied weight once, under one of its two names.
    tied = {"lm_head.weight", "embed_tokens.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - tied or len(missing) > 1:
        raise CheckpointError(
            f"{ckpt}: weights do not match its config.yaml (missing {missing}, unexpected {unexpected})."
        )
    if cfg.tie_embeddings:  # load_state_dict may have filled only one side of the tie; re-tie to be sure
        model.lm_head.weight = model.embed_tokens.weight
    return model


def export_hf(ckpt: Path, out: Path, dtype: str = "bf16") -> Path:
    """Write ``out/`` (config.json, model.safetensors, tokenizer files) from checkpoint folder ``ckpt``."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from fp8train.data.tokenizer import find_eos_id

    ckpt, out = Path(ckpt), Path(out)
    tokenizer_file = ckpt.parent.parent / "tokenizer.json"  # the run dir's copy: RUN_DIR/checkpoints/step_N
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json in its run directory ({tokenizer_file.parent}).")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose a new output folder.")
    model = load_checkpoint_model(ckpt)

    eos_id = find_eos_id(Tokenizer.from_file(str(tokenizer_file)), None, f"{tokenizer_file}")
    hf = LlamaForCausalLM(hf_config(model.cfg, eos_id, DTYPES[dtype]))
    hf.load_state_dict(hf_state_dict(model), strict=True)
    hf.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    eos = tok.convert_ids_to_tokens(eos_id)
    tok.eos_token = tok.bos_token = tok.pad_token = eos
    tok.save_pretrained(out)
    log.info("exported %s -> %s (%s, %d parameters)", ckpt, out, dtype, model.num_params())
    return out

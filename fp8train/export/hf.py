"""Export an fp8train checkpoint as a Hugging Face ``LlamaForCausalLM`` folder.

fp8train's Llama uses Hugging Face's parameter names and arithmetic (fp8train/model/llama.py), so the export is
a rename (``model.`` prefix, ``lm_head`` as is) plus a config. What a precision recipe added is left out: FP8
scaling state (``*_scaler.*`` buffers) is training state, not weights, and Smooth-SwiGLU is exact, so it needs
no extra weights: the exported model is a plain Llama whose logits equal fp8train's forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from fp8train import checkpoint
from fp8train.config import ModelConfig, first_line
from fp8train.errors import CheckpointError
from fp8train.model import Llama, empty_model

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ModelConfig field -> LlamaConfig field, used both ways (rope_theta lives in rope_parameters: handled apart).
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "ffn_dim": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}


def hf_config(cfg: ModelConfig, eos_id: int | None = None, dtype: torch.dtype = torch.float32, **extra):
    """transformers' LlamaConfig describing the same model as ``cfg`` (``extra``: more LlamaConfig fields)."""
    from transformers import LlamaConfig

    fields = {hf: getattr(cfg, ours) for ours, hf in HF_FIELDS.items()}
    fields["num_key_value_heads"] = cfg.kv_heads  # n_kv_heads=null means one kv head per query head
    # rope_theta and torch_dtype as transformers 4.x names them; 5.x moves them into rope_parameters and dtype.
    return LlamaConfig(
        **fields,
        rope_theta=cfg.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        torch_dtype=dtype,
        **extra,
    )


def write_portable_files(out: Path, cfg: ModelConfig) -> None:
    """Make ``out``'s config and tokenizer files readable by transformers 4.x as well as 5.x (the Gaudi image
    pins a 4.x for optimum-habana): 5.x writes rope_theta only inside rope_parameters, which 4.x ignores (it
    would silently fall back to 10000), and names its tokenizer class TokenizersBackend, unknown to 4.x."""
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_theta"] = cfg.rope_theta
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_file = out / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text())
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=cfg.max_seq_len)
    tok_file.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face's names."""
    return {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in model.state_dict().items()}


def saved_model_config(folder: Path) -> ModelConfig:
    """The model settings stored with a checkpoint (config.yaml) or an import-hf folder (model.yaml)."""
    for name, pick in (("config.yaml", lambda raw: raw.model), ("model.yaml", lambda raw: raw)):
        if (folder / name).is_file():
            try:
                raw = pick(OmegaConf.load(folder / name))
                cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))
                problems = cfg.check("model") + (["no vocab_size"] if cfg.vocab_size is None else [])
            except OmegaConfBaseException as e:  # an unknown key, a value of another type
                problems = [f"{e.full_key}: {first_line(e)}" if getattr(e, "full_key", None) else first_line(e)]
            except yaml.YAMLError as e:  # not YAML: its first line names no place, the lines after it do
                problems = [" ".join(str(e).split())]
            if problems:  # edited by hand, or written by a version of fp8train with other model settings
                fix = {
                    "model.yaml": "Write the folder again with fp8train import-hf from the Hugging Face folder.",
                    "config.yaml": "Read the checkpoint with the version of fp8train that wrote it.",
                }[name]
                raise CheckpointError(
                    f"{folder / name}: {'; '.join(problems)}; not model settings this version of fp8train can "
                    f"build. {fix}"
                )
            return dataclasses.replace(cfg, init_from=None)
    raise CheckpointError(f"{folder}: no config.yaml or model.yaml saying which model its weights belong to.")


def take_weights(model: Llama, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``weights`` (fp8train's names) into ``model``. A model from empty_model takes the tensors themselves as
    its weights (no copy, in their dtype); any other model copies them into its own."""
    cfg = model.cfg
    empty = model.embed_tokens.weight.is_meta
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=empty)
    # safetensors stores a tied weight once, under one of its two names.
    tied = {"lm_head.weight", "embed_tokens.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - tied or len(missing) > 1:
        raise CheckpointError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected}).")
    if cfg.tie_embeddings:  # one side of the tie may have been filled only, and assign=True unties: re-tie
        if "embed_tokens.weight" in missing:
            model.embed_tokens.weight = model.lm_head.weight
        else:
            model.lm_head.weight = model.embed_tokens.weight
    if empty:  # the RoPE tables are no weights (not saved): compute them where the weights now are
        model.rotary_emb.to_empty(device=model.embed_tokens.weight.device).reset_tables()


def load_weights(model: Llama, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Load a folder's model.safetensors into ``model`` (FP8 scaling state in it is skipped). A model from
    empty_model gets them in ``dtype`` (default: its own, float32), converted a tensor at a time as they are read,
    so that memory holds one copy of the weights in that dtype."""
    dtype = dtype or model.embed_tokens.weight.dtype
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            # FP8 scaling state is training state, not weights: our scalers' buffers, Transformer Engine's extra state.
            # A copy of each tensor: safetensors maps the file, and a weight left mapped would keep the disk space of a
            # checkpoint rotated away during training in use until the process ends.
            weights = {
                k: f.get_tensor(k).to(dtype, copy=True)
                for k in f.keys()
                if "_scaler." not in k and not k.endswith("._extra_state")
            }
    except SafetensorError as e:  # truncated or overwritten: safetensors' own words name no file
        raise CheckpointError(
            f"{folder}/model.safetensors cannot be read ({e}); the file is damaged. Use another checkpoint."
        ) from None
    take_weights(model, weights, folder)


def check_output_folder(out: Path) -> None:
    """Refuse an output path that is a file, a folder with something in it (never overwrite), or one in a run's
    checkpoints folder."""
    absolute = Path(os.path.abspath(out))  # RUN/checkpoints/../hf is RUN/hf
    for folder in (absolute, *absolute.parents):
        # A run directory holds config.yaml and tokenizer.json from its start, before its first checkpoint.
        run_files = all((folder.parent / name).is_file() for name in ("config.yaml", "tokenizer.json"))
        if folder.name == "checkpoints" and (run_files or checkpoint.complete_checkpoints(folder)):
            # Training replaces a step_N folder when it reaches step N, a resume moves later ones into superseded/,
            # keep_last deletes a checkpoint with whatever lies in it: the files written there would be lost.
            raise CheckpointError(
                f"{out} lies in the run's checkpoints folder {folder}, whose folders training replaces, sets aside "
                f"and deletes (trainer.keep_last); write it outside, e.g. {folder.parent / 'hf'}."
            )
    if out.is_symlink() and not out.exists():
        raise CheckpointError(
            f"{out} is a link to {os.readlink(out)}, which does not exist (a disk that is not mounted?); mount it or "
            f"create that folder, or choose another output folder."
        )
    if out.is_dir() and all(re.fullmatch(r"\.tmp-\d+", p.name) for p in out.iterdir()):
        checkpoint.remove_stale_tmp(out)  # nothing but the temporary folder of a write that was killed (see writing)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty folder; choose a new output folder.")


@contextlib.contextmanager
def writing(out: Path) -> Iterator[Path]:
    """A temporary folder inside ``out`` (checked by check_output_folder) whose files move up into ``out`` once all
    are written: a full disk or a Ctrl-C mid-write leaves ``out`` absent or empty, never half written so as to pass
    for a model. Inside rather than beside ``out``: it may be a mount point or a link to another disk."""
    created, folder = [], out  # out and the parents mkdir makes, innermost first: a failed write removes them alone
    while not folder.exists() and folder.parent != folder:
        created.append(folder)
        folder = folder.parent
    tmp = out / f".tmp-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        remove_empty(created)
        raise CheckpointError(
            f"{out}: cannot create the output folder ({e.strerror or e}); choose a folder in a writable location."
        ) from None
    done, moved = False, []
    try:
        yield tmp
        files = [file for file in tmp.iterdir() if file.is_file()]
        checkpoint.readable_as_umask(files)
        # The file that makes a folder a model (transformers' config.json, init_from's model.yaml) moves last: a kill
        # between two renames leaves a folder that is refused, not one that passes for a model without its tokenizer.
        for file in sorted(tmp.iterdir(), key=lambda file: file.name in ("config.json", "model.yaml")):
            os.replace(file, out / file.name)
            moved.append(out / file.name)
        done = True
    except (OSError, SafetensorError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise CheckpointError(
            f"{out}: writing it failed ({cause}), so nothing was written there; free some space or choose a "
            f"writable location, and run it again."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for file in moved if not done else ():  # a Ctrl-C or an error between two renames: out was empty before
            file.unlink(missing_ok=True)
        if not done:
            remove_empty(created)


def remove_empty(folders: list[Path]) -> None:
    """rmdir each of ``folders`` (innermost first) that exists, stopping at one that cannot be removed (something
    else wrote there meanwhile): never a folder with anything in it."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:  # mkdir failed before making it
            continue
        except OSError:
            return


def checkpoint_to_export(path: Path) -> Path:
    """The checkpoint export-hf reads for ``path``: a run directory's newest intact checkpoint, or ``path``
    itself, a checkpoint folder checked against its manifest."""
    path = Path(os.path.abspath(path))  # "." or "..", whose name says nothing, as the folder they are
    if path.name == "checkpoints" and not (path / "checkpoints").is_dir() and (path.parent / "config.yaml").is_file():
        path = path.parent  # RUN_DIR/checkpoints, the folder listing the step_N folders, means the run
    root = path / "checkpoints"
    if root.is_dir():
        try:
            newest = checkpoint.latest_intact(root)
        except CheckpointError:  # its message is about resuming; this is about exporting
            raise CheckpointError(
                f"{path}: every checkpoint in {root} is damaged (see the warnings above), so there is nothing to "
                f"export; export a checkpoint restored from a backup."
            ) from None
        if newest is None:
            aside = checkpoint.superseded_checkpoints(root)
            raise CheckpointError(
                f"{path}: a run directory without a complete checkpoint in {root}; "
                + (
                    f"a resume set {len(aside)} aside in {root / checkpoint.SUPERSEDED}: pass one by its path to "
                    f"export it, e.g. the one set aside last, {aside[-1]}."
                    if aside
                    else "export it once training has written one (trainer.checkpoint_every, or the checkpoint at "
                    "the end of a run)."
                )
            )
        return newest
    if (path / "model.yaml").is_file() and not (path / checkpoint.MANIFEST).is_file():
        raise CheckpointError(
            f"{path}: written by fp8train import-hf (weights to start a run from, with model.init_from), not a "
            f"checkpoint; the Hugging Face folder it came from is that model already. Export a run's checkpoint "
            f"(RUN_DIR/checkpoints/step_N), or the run directory."
        )
    if (path / "model.safetensors").is_file() or (path / checkpoint.MANIFEST).is_file():
        if problem := checkpoint.damage(path):
            raise CheckpointError(
                f"{path}: {problem}; the checkpoint is damaged. Export an older one (RUN_DIR/checkpoints/step_N), or "
                f"pass the run directory to take its newest intact checkpoint."
            )
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder or run directory.")
    raise CheckpointError(
        f"{path} is neither a checkpoint folder (RUN_DIR/checkpoints/step_N, with model.safetensors) nor a run "
        f"directory with checkpoints (RUN_DIR, with a checkpoints/ folder)."
    )


def load_checkpoint_model(ckpt: Path, dtype: torch.dtype = torch.float32) -> Llama:
    """The plain (unconverted) Llama of an fp8train checkpoint folder, its weights in ``dtype`` (its RoPE tables in
    float32)."""
    ckpt = Path(ckpt)
    if not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: not an fp8train checkpoint (no model.safetensors).")
    model = empty_model(saved_model_config(ckpt))
    load_weights(model, ckpt, dtype)
    return model


def export_hf(ckpt: Path, out: Path, dtype: str = "bf16") -> Path:
    """Write ``out/`` (config.json, model.safetensors, tokenizer files) from checkpoint folder ``ckpt``."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from fp8train.data.tokenizer import declared_eos, find_eos_id, read_tokenizer_file

    ckpt, out = Path(os.path.abspath(ckpt)), Path(out)  # run_dir_of goes by the names of its parents
    run_dir = checkpoint.run_dir_of(ckpt) or ckpt.parent.parent
    tokenizer_file = run_dir / "tokenizer.json"  # the run dir's copy
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json in its run directory ({tokenizer_file.parent}).")
    # The tokenizer before the weights, which take minutes to read for a large model.
    fix = "Copy the tokenizer.json the run was started with (its data.tokenizer.path) into the run directory."
    tokenizer = read_tokenizer_file(tokenizer_file, f"{ckpt}", fix)
    eos_id = find_eos_id(tokenizer, declared_eos(run_dir), f"{tokenizer_file}")
    check_output_folder(out)
    model = load_checkpoint_model(ckpt, DTYPES[dtype])  # in the export's dtype: one copy of the weights

    if tokenizer.post_processor is not None and tokenizer.post_processor.num_special_tokens_to_add(False):
        # The run encoded its text without special tokens (documents end in EOS, nothing marks their start): a
        # post-processor that adds a BOS (Llama's tokenizers) would feed the exported model a token it never saw
        # first. Dropping it leaves the ids of the text as they were.
        tokenizer.post_processor = None
        log.info("the exported tokenizer adds no special tokens when encoding, as in training")
    with torch.device("meta"):  # transformers' model holds our model's tensors: no second copy, no random init
        hf = LlamaForCausalLM(hf_config(model.cfg, eos_id, DTYPES[dtype]))
    hf.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    hf.tie_weights()
    with writing(out) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        eos = tok.convert_ids_to_tokens(eos_id)
        tok.eos_token = tok.bos_token = tok.pad_token = eos
        tok.save_pretrained(tmp)
        write_portable_files(tmp, model.cfg)
    log.info("exported %s -> %s (%s, %d parameters)", ckpt, out, dtype, model.num_params())
    return out


# config.json's values fp8train reads, by the JSON type they must have (null: transformers' default).
JSON_TYPES = {
    **dict.fromkeys(("attention_bias", "mlp_bias", "tie_word_embeddings"), (bool, "true or false")),
    **dict.fromkeys(
        ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
        (int, "an integer"),
    ),
    "max_position_embeddings": (int, "an integer"),
    **dict.fromkeys(("num_key_value_heads", "head_dim"), ((int, type(None)), "an integer or null")),
    **dict.fromkeys(("rms_norm_eps", "rope_theta"), ((int, float), "a number")),
}


def value_type_problems(config: dict) -> list[str]:
    """config.json values fp8train reads that are of another JSON type than they must be (``"false"`` in quotes): a
    string is true to Python, transformers 4.x takes such values as they are (and builds biases for "false"), and
    5.x fails deep in torch on a string rope_theta."""
    rope = [
        (f"{key}.", config[key]) for key in ("rope_scaling", "rope_parameters") if isinstance(config.get(key), dict)
    ]
    problems = []
    for where, values in [("", config), *rope]:
        for key, (wanted, what) in JSON_TYPES.items():
            value = values.get(key)
            # JSON's true and false are ints to Python too: a bool only where one is wanted
            if key in values and (isinstance(value, bool) != (wanted is bool) or not isinstance(value, wanted)):
                problems.append(f"{where}{key} is {json.dumps(value)}, not {what}")  # as config.json has it
    return problems


def unsupported_features(config: dict) -> list[str]:
    """What in a Hugging Face Llama config.json fp8train's Llama cannot compute (empty: importable exactly)."""
    problems = []
    if quantization := config.get("quantization_config"):  # weights stored quantized, not the model's own
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        problems.append(f"quantization_config has quant_method {method!r} (import the unquantized model)")
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4.x and 5.x names
        rope = config.get(key) or {}
        if not isinstance(rope, dict):  # transformers would refuse it too, in words of its own
            problems.append(f"{key} is {rope!r}, not an object of RoPE settings")
            continue
        rope_type = rope.get("rope_type") or rope.get("type")
        if rope_type not in (None, "default"):
            problems.append(f"{key} has rope_type {rope_type!r} (only the default RoPE is supported)")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers: "swish" is the same SiLU
        problems.append(f"hidden_act is {config['hidden_act']!r} (SwiGLU needs 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key} is true (fp8train's linears have no bias)")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if not (isinstance(heads, int) and isinstance(hidden, int) and heads > 0):
        pass  # values of another type or range: transformers' own check of config.json names them
    elif hidden % heads:
        # transformers 4.x builds such a model (head_dim rounded down, o_proj from heads * head_dim); ours cannot
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    elif isinstance(config.get("head_dim"), int) and config["head_dim"] != hidden // heads:
        problems.append(f"head_dim is {config['head_dim']}, not hidden_size / num_attention_heads = {hidden // heads}")
    return problems


def weight_problems(loading_info: dict) -> list[str]:
    """What from_pretrained's loading report says is wrong with a folder's weights: weights the file lacks (left at
    their random init), weights of another shape (likewise), weights the model has no place for (dropped)."""
    # Older checkpoints store RoPE's inv_freq, a table transformers recomputes: not a weight.
    unexpected = [k for k in loading_info.get("unexpected_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    mismatched = sorted(
        f"{key} {tuple(saved)} (the config gives {tuple(wanted)})"
        for key, saved, wanted in loading_info.get("mismatched_keys", [])
    )
    problems = []
    if missing := sorted(loading_info.get("missing_keys", [])):
        problems.append(f"{', '.join(missing)} missing")
        if missing == ["lm_head.weight"]:  # reported missing only where config.json leaves the embeddings untied
            problems[-1] += " (if the model ties it to model.embed_tokens.weight, set tie_word_embeddings: true)"
    if mismatched:
        problems.append(f"of another shape: {', '.join(mismatched)}")
    if unexpected:
        problems.append(f"{', '.join(sorted(unexpected))} not part of the model the config describes")
    return problems


def unreadable_weights(hf_dir: Path, cause: str) -> CheckpointError:
    """The error for a folder whose weights file is missing or damaged (``cause``: what the reader said)."""
    return CheckpointError(
        f"{hf_dir}: transformers cannot load its weights ({cause.rstrip('.')}). import-hf reads a "
        f"folder as save_pretrained writes it: config.json and model.safetensors (or its sharded index, or "
        f"pytorch_model.bin)."
    )


def header_weight_problems(hf_dir: Path, llama_config) -> list[str]:
    """weight_problems for a folder's safetensors weights, found from their headers (names and shapes) before the
    weights are read: a large model takes minutes to read. Empty for pytorch_model.bin, which has no header
    (from_pretrained's report checks it after reading)."""
    from transformers import LlamaForCausalLM

    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():  # the file from_pretrained prefers
        files = [hf_dir / "model.safetensors"]
    elif index.is_file():
        try:
            files = sorted({hf_dir / shard for shard in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, or no {"weight_map": {...}}
            raise unreadable_weights(hf_dir, f"{index.name} is not a shard index: {first_line(e)}") from None
    else:
        return []
    saved = {}
    try:
        for file in files:  # from_pretrained reads every tensor of the files the index names
            with safe_open(str(file), framework="pt") as f:
                saved.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    except (OSError, SafetensorError) as e:
        raise unreadable_weights(hf_dir, first_line(e)) from None
    if not any(k.startswith("model.") for k in saved):  # a LlamaModel's weights: from_pretrained adds the prefix
        saved = {f"model.{k}": shape for k, shape in saved.items()}
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in LlamaForCausalLM(llama_config).state_dict().items()}
    tied = {"lm_head.weight", "model.embed_tokens.weight"} if llama_config.tie_word_embeddings else set()
    missing = set(wanted) - set(saved)
    if tied & set(saved):  # a tied weight is stored once, under either name
        missing -= tied
    return weight_problems(
        {
            "missing_keys": missing,
            "unexpected_keys": set(saved) - set(wanted),
            "mismatched_keys": [
                (k, saved[k], wanted[k]) for k in saved.keys() & wanted.keys() if saved[k] != wanted[k]
            ],
        }
    )


def read_hf_config(hf_dir: Path) -> dict:
    """A Hugging Face folder's config.json, or a CheckpointError saying why there is none to read."""
    if hf_dir.is_file():  # its config.json or model.safetensors
        raise CheckpointError(
            f"{hf_dir} is a file, not a folder; pass the folder that holds it, {hf_dir.parent}, if that is the "
            f"Hugging Face Llama folder (config.json, model.safetensors, tokenizer files)."
        )
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such folder; import-hf reads a local Hugging Face Llama folder.")
    file = hf_dir / "config.json"
    if not file.is_file() and any((hf_dir / name).is_file() for name in (checkpoint.MANIFEST, "model.yaml")):
        raise CheckpointError(
            f"{hf_dir}: written by fp8train (a checkpoint, or import-hf's output), not a Hugging Face folder; there "
            f"is nothing to import: start a run from it with model.init_from={hf_dir}."
        )
    if not file.is_file():
        raise CheckpointError(
            f"{hf_dir}: no config.json, so not a Hugging Face model folder; import-hf reads a folder as "
            f"save_pretrained writes it (config.json, model.safetensors, tokenizer files)."
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); restore it from the model's source.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds a JSON {type(config).__name__}, not a Hugging Face config (an object).")
    return config


def imported_model_config(c, name: str) -> ModelConfig:
    """The model settings of transformers' LlamaConfig ``c`` (rope_theta where 4.x or 5.x keeps it)."""
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    return ModelConfig(name=name, rope_theta=float(rope), **{ours: getattr(c, hf) for ours, hf in HF_FIELDS.items()})


def mismatched_weights(hf_dir: Path, problems: list[str]) -> CheckpointError:
    """The error for a folder whose weights do not match its config.json (``problems``: from weight_problems)."""
    return CheckpointError(
        f"{hf_dir}: its weights do not match its config.json: {'; '.join(problems)}. Imported anyway, the "
        f"model would hold random values in their place or lose them, so nothing is written; check that "
        f"config.json belongs to these weights."
    )


def import_tokenizer(hf_dir: Path, vocab_size: int) -> tuple[Tokenizer | None, str | None]:
    """A Hugging Face folder's fast tokenizer and EOS token, (None, None) if it has none; refused if it is damaged
    or has ids past ``vocab_size``."""
    from transformers import AutoTokenizer

    from fp8train.data.tokens import id_space

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        tokenizer, eos_token = hf_tokenizer.backend_tokenizer, hf_tokenizer.eos_token
    except Exception as e:  # no tokenizer files, a slow one only (sentencepiece), or damaged ones
        if (hf_dir / "tokenizer.json").is_file():  # there but unreadable: imported without it, nothing checks it
            raise CheckpointError(
                f"{hf_dir}: its tokenizer cannot be loaded ({first_line(e).rstrip('.')}); restore its tokenizer files "
                f"from the model's source, or move tokenizer.json away to import the weights alone (then name the "
                f"tokenizer they were trained with in data.tokenizer.path)."
            ) from None
        log.warning("%s has no fast tokenizer; pass data.tokenizer.path=... yourself", hf_dir)
        return None, None
    # By ids, not tokens, as the run's data loader counts them: the ids of a tokenizer.json may have gaps.
    if (ids := id_space(tokenizer)) > vocab_size:
        count = tokenizer.get_vocab_size(with_added_tokens=True)
        raise CheckpointError(
            f"{hf_dir}: its tokenizer has {count} tokens{f' with ids up to {ids - 1}' if ids > count else ''}, but "
            f"the model's vocab_size is {vocab_size}: the ids past it have no embedding. Import a folder whose "
            f"tokenizer belongs to these weights."
        )
    return tokenizer, eos_token


def import_hf(hf_dir: Path, out: Path) -> Path:
    """Write ``out/`` (model.safetensors under fp8train's names, model.yaml, tokenizer.json and a
    tokenizer_config.json naming its EOS if the folder has a tokenizer) from a local Hugging Face Llama folder;
    train from it with ``model.init_from=OUT``."""
    from safetensors.torch import save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from fp8train.data.tokenizer import eos_declaration

    hf_dir, out = Path(hf_dir), Path(out)
    config = read_hf_config(hf_dir)
    if config.get("model_type") != "llama":
        raise CheckpointError(
            f"{hf_dir}: not a Hugging Face Llama folder (config.json model_type is "
            f"{config.get('model_type')!r}, expected 'llama')."
        )
    if problems := value_type_problems(config):
        raise CheckpointError(
            f"{hf_dir}/config.json: {'; '.join(problems)}. Correct these values (true, false and numbers without "
            f"quotes, integers without a decimal point), or restore config.json from the model's source."
        )
    rope = config.get("rope_parameters")
    top, nested = config.get("rope_theta"), rope.get("rope_theta") if isinstance(rope, dict) else None
    if None not in (top, nested) and top != nested:  # 4.x reads the first, 5.x the second and ignores the first
        raise CheckpointError(
            f"{hf_dir}/config.json: rope_theta is {top} but rope_parameters.rope_theta is {nested}; transformers "
            f"4.x uses the first, 5.x the second, so which one the model was trained with is unclear. Set both to "
            f"the model's value."
        )
    if problems := unsupported_features(config):
        raise CheckpointError(
            f"{hf_dir}: this Llama computes something fp8train's Llama does not, so its logits would change: "
            + "; ".join(problems)
            + ". fp8train imports plain Llama models (SwiGLU, no biases, default RoPE, unquantized weights)."
        )
    check_output_folder(out)
    try:
        llama_config = LlamaConfig.from_pretrained(hf_dir, local_files_only=True)
    except Exception as e:  # transformers' checks of the values raise ValueError, TypeError, its own error classes
        cause = " ".join(str(e).split())[:300].rstrip(".") or type(e).__name__  # 5.x puts the reason on line 2
        raise CheckpointError(
            f"{hf_dir}/config.json: transformers cannot read it ({cause}); correct that value, or restore "
            f"config.json from the model's source."
        ) from None
    # Everything that can be checked without the weights first: reading a large model's takes minutes.
    # Named by the folder, also when given as "." or "..", whose Path.name is "" or "..".
    cfg = imported_model_config(llama_config, Path(os.path.abspath(hf_dir)).name)
    if problems := cfg.check("model"):  # in config.json's names: model.n_kv_heads is its num_key_value_heads
        named = [re.sub(r"model\.(\w+)", lambda m: HF_FIELDS.get(m[1], m[0]), problem) for problem in problems]
        raise CheckpointError(
            f"{hf_dir}/config.json describes a model fp8train's Llama cannot be: {'; '.join(named)}. Correct "
            f"config.json, or restore it from the model's source."
        )
    tokenizer, eos_token = import_tokenizer(hf_dir, llama_config.vocab_size)
    if problems := header_weight_problems(hf_dir, llama_config):
        raise mismatched_weights(hf_dir, problems)
    try:
        # Mismatched shapes are reported in loading_info below rather than raised (5.x's error names no weight).
        # In float32 whatever config.json's dtype says: 5.x loads in that dtype by default, and many configs say
        # bfloat16 over float32 weights. torch_dtype, the name 4.x knows too (5.x's dtype=).
        hf, loading_info = LlamaForCausalLM.from_pretrained(
            hf_dir,
            config=llama_config,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            torch_dtype=torch.float32,
        )
    except (OSError, SafetensorError) as e:  # no weights file, or one that is damaged
        raise unreadable_weights(hf_dir, first_line(e)) from None
    except Exception as e:  # a damaged pytorch_model.bin: torch.load raises RuntimeError, UnpicklingError, KeyError
        raise unreadable_weights(hf_dir, f"{type(e).__name__}: {first_line(e)}") from None
    if problems := weight_problems(loading_info):  # pytorch_model.bin, whose names only reading it gives
        raise mismatched_weights(hf_dir, problems)
    if llama_config.tie_word_embeddings and hf.lm_head.weight is not hf.model.embed_tokens.weight:
        # transformers 5.x leaves a tie whose two weights differ in the file undone (4.x ties them): either way,
        # one of the two would be dropped unnoticed.
        raise CheckpointError(
            f"{hf_dir}: config.json's tie_word_embeddings is true, but its weights hold an lm_head.weight that "
            f"differs from model.embed_tokens.weight, so which of the two the model uses is unclear; set "
            f"tie_word_embeddings to false in config.json if lm_head.weight is the model's output layer."
        )
    model = empty_model(cfg)  # holding transformers' float32 tensors: one copy of the weights
    take_weights(model, {k.removeprefix("model."): v for k, v in hf.state_dict().items()}, hf_dir)
    with writing(out) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "model.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            if eos_token:  # the folder's own EOS, which data.tokenizer.path=OUT/tokenizer.json splits documents with
                (tmp / "tokenizer_config.json").write_text(eos_declaration(eos_token))
    log.info("imported %s -> %s (%d parameters)", hf_dir, out, model.num_params())
    return out

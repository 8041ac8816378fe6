"""import-hf: a local Hugging Face Llama becomes weights fp8train trains from (model.init_from)."""

from __future__ import annotations

import json
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from fp8train.config import compose
from fp8train.data.tokenizer import train_bpe
from fp8train.errors import CheckpointError, ConfigError
from fp8train.export.hf import import_hf, load_checkpoint_model
from fp8train.trainer import Trainer
from tests.helpers import ROOT, SMALL

SHAPE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small HF Llama (GQA, tied, theta 5e5) with a fast tokenizer, saved as a user would have it."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("hf_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    LlamaForCausalLM(cfg).save_pretrained(folder)
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe([text], vocab_size=300), eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return folder


def test_imported_weights_give_the_hf_logits(hf_folder, tmp_path):
    from transformers import LlamaForCausalLM

    out = import_hf(hf_folder, tmp_path / "imported")
    ours = load_checkpoint_model(out).eval()
    hf = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32, local_files_only=True).eval()
    assert ours.cfg.rope_theta == 5e5 and ours.cfg.kv_heads == 2 and ours.cfg.tie_embeddings
    x = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


def test_import_draws_no_random_weights(hf_folder, tmp_path, monkeypatch):
    """fp8train's model is built on the meta device and takes transformers' weights: a random init of a 7B model,
    to be overwritten, would cost minutes and a second 27 GB copy."""
    from safetensors.torch import load_file

    from tests.unit.test_export import no_random_init

    no_random_init(monkeypatch)
    out = import_hf(hf_folder, tmp_path / "imported")
    monkeypatch.undo()
    saved = load_file(str(hf_folder / "model.safetensors"))
    imported = load_file(str(out / "model.safetensors"))
    assert imported.keys() == {k.removeprefix("model.") for k in saved}
    assert all(torch.equal(imported[k.removeprefix("model.")], v) for k, v in saved.items())


def test_training_starts_from_the_imported_weights_in_fp8(hf_folder, tmp_path):
    out = import_hf(hf_folder, tmp_path / "imported")
    shape = ["model.vocab_size=320", "model.max_seq_len=256", "model.rope_theta=500000.0"]
    cfg = compose(
        [
            *SMALL,
            *shape,
            "precision=fp8_smooth",
            f"model.init_from={out}",
            f"data.tokenizer.path={out / 'tokenizer.json'}",
            "trainer.max_steps=2",
        ]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    imported = load_checkpoint_model(out).state_dict()
    for k, v in trainer.model.state_dict().items():
        if "_scaler." not in k:
            assert torch.equal(v, imported[k]), k
    trainer.fit()
    with pytest.raises(ConfigError, match=r"model.d_model=128 \(the weights have 64\)"):
        Trainer(
            compose(
                [
                    *SMALL,
                    *shape,
                    "model.d_model=128",
                    f"model.init_from={out}",
                    f"data.tokenizer.path={out / 'tokenizer.json'}",
                ]
            ),
            tmp_path / "run2",
        )


def test_settings_that_do_not_touch_the_weights_may_differ_from_the_saved_ones(hf_folder, tmp_path):
    """init_std only draws initial weights and max_seq_len only sizes the RoPE tables (not saved): a run that starts
    from weights may set them as it likes, e.g. to continue pretraining at a longer context."""
    out = import_hf(hf_folder, tmp_path / "imported")
    shape = ["model.vocab_size=320", "model.rope_theta=500000.0", "model.max_seq_len=512", "model.init_std=0.01"]
    cfg = compose([*SMALL, *shape, f"model.init_from={out}", f"data.tokenizer.path={out / 'tokenizer.json'}"])
    trainer = Trainer(cfg, tmp_path / "run")
    imported = load_checkpoint_model(out).state_dict()
    assert trainer.model.cfg.max_seq_len == 512
    assert all(torch.equal(v, imported[k]) for k, v in trainer.model.state_dict().items() if "_scaler." not in k)


def test_a_run_from_weights_draws_no_random_weights_first(hf_folder, tmp_path, monkeypatch):
    """The model a run starts from weights is built on the meta device and filled from the folder: a random init
    first would cost a 7B model minutes and a second copy."""
    from tests.unit.test_export import no_random_init

    out = import_hf(hf_folder, tmp_path / "imported")
    shape = ["model.vocab_size=320", "model.rope_theta=500000.0"]
    cfg = compose([*SMALL, *shape, f"model.init_from={out}", f"data.tokenizer.path={out / 'tokenizer.json'}"])
    Trainer(cfg, tmp_path / "warm")  # tokenizer and token cache, which are not the point here
    no_random_init(monkeypatch)
    trainer = Trainer(cfg, tmp_path / "run")
    imported = load_checkpoint_model(out).state_dict()
    assert all(torch.equal(v, imported[k]) for k, v in trainer.model.state_dict().items() if "_scaler." not in k)
    tied = trainer.model.lm_head.weight is trainer.model.embed_tokens.weight
    assert tied == cfg.model.tie_embeddings  # one parameter, as build_model makes it


def test_swish_is_imported_as_the_silu_it_is(hf_folder, tmp_path):
    """transformers maps hidden_act "swish" to the same SiLU as "silu": the logits are those of the folder."""
    from transformers import LlamaForCausalLM

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    ours = load_checkpoint_model(import_hf(folder, tmp_path / "imported")).eval()
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_a_folder_that_is_not_a_llama_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="not a Hugging Face Llama folder"):
        import_hf(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": "linear"}, "rope_scaling is 'linear'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_a_llama_fp8train_cannot_compute_is_refused_by_name(hf_folder, tmp_path, change, field):
    """Imported silently, these would give other logits (RoPE scaling, another activation) or fail deep in torch."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=field):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_starting_from_weights_with_another_tokenizer_is_refused(hf_folder, tmp_path):
    """A BPE trained anew on this run's data numbers its tokens differently: the imported embeddings would mean
    other tokens and training would start from chance, so the run names the tokenizer to use instead."""
    out = import_hf(hf_folder, tmp_path / "imported")
    shape = ["model.vocab_size=320", "model.max_seq_len=256", "model.rope_theta=500000.0"]
    cfg = compose([*SMALL, *shape, f"model.init_from={out}", "data.tokenizer.vocab_size=300"])
    with pytest.raises(ConfigError, match=rf"set data.tokenizer.path={out / 'tokenizer.json'}"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(
    "config_json, expected",
    [(None, "no config.json"), ('{"model_type": "llama",', "config.json is not valid JSON"), ("[1]", "a JSON list")],
)
def test_a_folder_without_a_readable_config_is_named(tmp_path, config_json, expected):
    folder = tmp_path / "hf"
    folder.mkdir()
    if config_json is not None:
        (folder / "config.json").write_text(config_json)
    with pytest.raises(CheckpointError, match=expected):
        import_hf(folder, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such folder"):
        import_hf(tmp_path / "missing", tmp_path / "out")


def test_a_config_without_weights_is_refused_and_writes_nothing(hf_folder, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="transformers cannot load its weights"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_created_is_refused(hf_folder, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(CheckpointError, match="file/out: cannot create the output folder"):
        import_hf(hf_folder, tmp_path / "file" / "out")


def _with_weights(hf_folder, folder, change):
    """A copy of hf_folder whose model.safetensors ``change`` edits (a dict of tensors, edited in place)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_folder, folder)
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_weights_missing_from_the_folder_are_refused_not_initialised_at_random(hf_folder, tmp_path):
    """transformers fills a weight the file lacks with a fresh random init and only logs it: imported so, a layer
    of the model would be noise and training would start from a broken network."""
    folder = _with_weights(hf_folder, tmp_path / "hf", lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.down_proj.weight.*missing"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_the_config_does_not_describe_are_refused(hf_folder, tmp_path):
    """A bias the config says is absent would be dropped: the logits would change."""
    folder = _with_weights(
        hf_folder, tmp_path / "hf", lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(64)})
    )
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.q_proj.bias"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_of_another_shape_than_the_config_says_are_refused(hf_folder, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 384}))
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_more_tokens_than_the_model_has_embeddings_is_refused(hf_folder, tmp_path):
    """Token ids past vocab_size have no embedding: training could only refuse later, with advice (raise
    model.vocab_size) that the imported weights then refuse in turn."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe([text], vocab_size=400), eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"tokenizer has 400 tokens.*vocab_size is 320"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_imported_tokenizer_keeps_its_declared_eos(hf_folder, tmp_path):
    """The HF folder names its EOS in tokenizer_config.json; training from the imported tokenizer.json must split
    documents with that token, not refuse the tokenizer for lacking one it recognises."""
    from fp8train.data.tokenizer import load_tokenizer
    from tests.unit.test_export import custom_eos_tokenizer

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    custom_eos_tokenizer(folder)
    out = import_hf(folder, tmp_path / "imported")
    assert load_tokenizer(str(out / "tokenizer.json"), tmp_path / "cache").eos_id == 1


def test_a_failed_write_leaves_no_half_written_folder(hf_folder, tmp_path, monkeypatch):
    """The disk fills at the last file, after the weights: no folder that passes for an import is left behind."""
    from tests.unit.test_export import disk_full

    monkeypatch.setattr("fp8train.data.tokenizer.eos_declaration", disk_full)
    with pytest.raises(CheckpointError, match=r"imported: writing it failed \(No space left on device\)"):
        import_hf(hf_folder, tmp_path / "imported")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"num_attention_heads": 0}, "transformers cannot read it"),
        ({"num_attention_heads": "4", "head_dim": 16}, 'num_attention_heads is "4", not an integer'),
        ({"hidden_size": 66, "head_dim": 16}, "hidden_size 66 is not a multiple of num_attention_heads 4"),
    ],
)
def test_a_config_transformers_or_fp8train_cannot_build_is_refused_by_name(hf_folder, tmp_path, change, expected):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=expected):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imported_weights_are_as_readable_as_the_other_files(hf_folder, tmp_path):
    from tests.unit.test_export import current_umask

    out = import_hf(hf_folder, tmp_path / "imported")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["model.yaml"] == 0o666 & ~current_umask(), modes


def test_exporting_an_import_folder_says_what_it_is(hf_folder, tmp_path, capsys):
    """An import-hf folder has weights but no manifest: it is not a damaged checkpoint, and the message says so."""
    from tests.unit.test_export import run_cli

    out = import_hf(hf_folder, tmp_path / "imported")
    assert run_cli("export-hf", out, tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "written by fp8train import-hf" in err and "damaged" not in err
    assert not (tmp_path / "hf").exists()


def test_a_damaged_tokenizer_is_refused_not_left_out(hf_folder, tmp_path):
    """Imported without its tokenizer, the weights would train with whatever tokenizer the run is given, unchecked:
    a tokenizer.json that is there but cannot be read is named, like damaged weights."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match=r"hf: its tokenizer cannot be loaded \(.+\)"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_tokenizer_imports_the_weights_alone(hf_folder, tmp_path, caplog):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    out = import_hf(folder, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model.yaml"]
    assert "pass data.tokenizer.path=" in caplog.text


def test_one_kv_head_per_query_head_matches_n_kv_heads_null(hf_folder, tmp_path):
    """model.n_kv_heads=null means one key/value head per query head (model=llama_125m), which is what an imported
    folder with num_key_value_heads == num_attention_heads saves as a number: the same model, not a difference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_key_value_heads": 4}, tie_word_embeddings=True)).save_pretrained(
        folder
    )
    out = import_hf(folder, tmp_path / "imported")
    shape = ["model.vocab_size=320", "model.max_seq_len=256", "model.n_kv_heads=null"]
    cfg = compose([*SMALL, *shape, f"model.init_from={out}", f"data.tokenizer.path={out / 'tokenizer.json'}"])
    trainer = Trainer(cfg, tmp_path / "run")
    imported = load_checkpoint_model(out).state_dict()
    assert all(torch.equal(v, imported[k]) for k, v in trainer.model.state_dict().items() if "_scaler." not in k)


def _no_weight_reading(monkeypatch):
    """Make reading the weights fail loudly: what is refused before it is refused without waiting for them."""
    from transformers import LlamaForCausalLM

    def read(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", read)


def _unreadable_tokenizer(folder):
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def _big_tokenizer(folder):
    from transformers import PreTrainedTokenizerFast

    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe([text], vocab_size=400), eos_token="<|endoftext|>")
    tok.save_pretrained(folder)


def _drop_weight(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights.pop("model.layers.1.mlp.down_proj.weight")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _wider_vocab(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 384}))


def _add_bias(folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.ones(64)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, expected",
    [
        (_unreadable_tokenizer, "its tokenizer cannot be loaded"),
        (_big_tokenizer, "tokenizer has 400 tokens"),
        (_drop_weight, r"model.layers.1.mlp.down_proj.weight missing"),
        (_wider_vocab, r"of another shape: model.embed_tokens.weight \(320, 64\) \(the config gives \(384, 64\)\)"),
        (_add_bias, r"model.layers.0.self_attn.q_proj.bias not part of the model"),
    ],
)
def test_what_can_be_checked_without_the_weights_is_refused_before_reading_them(
    hf_folder, tmp_path, monkeypatch, change, expected
):
    """Reading a large model's weights takes minutes: a broken tokenizer, or weights whose names and shapes (in the
    safetensors headers) do not match config.json, are refused before that, not after."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    change(folder)
    _no_weight_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=expected):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_weights_are_checked_from_their_headers_before_reading(hf_folder, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "model.safetensors").unlink()
    LlamaForCausalLM.from_pretrained(hf_folder, local_files_only=True).save_pretrained(folder, max_shard_size="50KB")
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    _wider_vocab(folder)
    _no_weight_reading(monkeypatch)
    with pytest.raises(
        CheckpointError, match=r"model.embed_tokens.weight \(320, 64\) \(the config gives \(384, 64\)\)"
    ):
        import_hf(folder, tmp_path / "out")
    sorted(folder.glob("model-*-of-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="transformers cannot load its weights"):
        import_hf(folder, tmp_path / "out")
    (folder / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"weights \(model.safetensors.index.json is not a shard index: .+\)"):
        import_hf(folder, tmp_path / "out")


def test_a_tie_config_json_contradicts_is_refused(tmp_path):
    """config.json says tie_word_embeddings, but the file holds an lm_head.weight of its own: transformers 5.x
    leaves the two untied (4.x ties them); imported tied, the logits would silently change."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings is true.*lm_head.weight"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["fp8", "bitsandbytes", "awq"])
def test_a_quantized_llama_is_refused_by_name(hf_folder, tmp_path, method):
    """Quantized weights are not the model's weights (transformers asks for packages to dequantize them)."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": method}}))
    with pytest.raises(CheckpointError, match=rf"quantization_config.*{method}"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _saved_as(folder, how):
    """Rewrite ``folder``'s weights as ``how``: sharded safetensors with an index, or pytorch_model.bin only."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True)
    (folder / "model.safetensors").unlink()
    if how == "shards":
        model.save_pretrained(folder, max_shard_size="50KB")
    else:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


@pytest.mark.parametrize(
    "config, saved",
    [
        ({"rms_norm_eps": 1e-6, "tie_word_embeddings": False}, None),
        ({"rope_theta": 123456.0, "rope_parameters": None}, None),  # as transformers 4.x writes it
        ({"vocab_size": 384}, None),  # a vocabulary padded past the tokenizer's 300 tokens
        ({"num_key_value_heads": None, "num_attention_heads": 4}, None),
        ({}, "shards"),
        ({"tie_word_embeddings": False}, "bin"),
    ],
)
def test_imported_llamas_give_transformers_logits_in_float64(tmp_path, config, saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**SHAPE, "tie_word_embeddings": True, **config})).save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({k: v for k, v in {**written, **config}.items() if v is not None or k not in config})
    )
    if saved:
        _saved_as(folder, saved)
    ours = load_checkpoint_model(import_hf(folder, tmp_path / "imported")).double().eval()
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64, local_files_only=True).eval()
    assert ours.cfg.norm_eps == hf.config.rms_norm_eps and ours.cfg.vocab_size == hf.config.vocab_size
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-12)


def test_a_tied_llama_whose_config_leaves_out_the_tie_is_told_to_set_it(hf_folder, tmp_path):
    """transformers' default is untied: a tied model's config.json without tie_word_embeddings lacks lm_head.weight."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["tie_word_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lm_head.weight missing \(.*set tie_word_embeddings: true\)"):
        import_hf(folder, tmp_path / "out")


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads=3: must divide num_attention_heads=4"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps=0.0: must be > 0"),
    ],
)
def test_a_config_fp8trains_llama_cannot_be_is_refused_in_its_names_before_reading_weights(
    hf_folder, tmp_path, monkeypatch, change, expected
):
    """transformers builds these (their forward fails or divides by zero later); fp8train's checks refuse them, as
    one message in config.json's names rather than a traceback after the weights were read."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    _no_weight_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"config.json describes a model .*{re.escape(expected)}"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_weights_of_a_llama_model_without_lm_head_import_tied(tmp_path):
    """LlamaModel.save_pretrained writes the names without "model.", which from_pretrained adds; a tied model needs
    no lm_head.weight."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    folder = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaModel(LlamaConfig(**SHAPE, tie_word_embeddings=True)).save_pretrained(folder)
    ours = load_checkpoint_model(import_hf(folder, tmp_path / "imported")).double().eval()
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64, local_files_only=True).eval()
    x = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("damage", ["truncated", "not a pickle"])
def test_a_damaged_pytorch_model_bin_is_named(hf_folder, tmp_path, damage):
    """torch.load raises RuntimeError or KeyError for these, which ended in a traceback."""
    from transformers import LlamaForCausalLM

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    (folder / "model.safetensors").unlink()
    torch.save(LlamaForCausalLM.from_pretrained(hf_folder).state_dict(), folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello" * 20)
    with pytest.raises(CheckpointError, match=r"hf: transformers cannot load its weights \(\w+: .+\)"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", [".", "sub/..", ".."])
def test_a_folder_given_as_dot_or_dotdot_is_named_for_what_it_is(hf_folder, tmp_path, monkeypatch, given):
    """`import-hf . OUT` inside the model's folder: the saved model.name is that folder's name, not '' or '..'."""
    folder = tmp_path / "llama-7b"
    shutil.copytree(hf_folder, folder)
    (folder / "sub").mkdir()
    monkeypatch.chdir(folder / "sub" if given == ".." else folder)
    out = import_hf(Path(given), tmp_path / "imported")
    assert "name: llama-7b\n" in (out / "model.yaml").read_text()


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"attention_bias": "false"}, 'attention_bias is "false", not true or false'),
        ({"mlp_bias": "false", "tie_word_embeddings": 1}, 'mlp_bias is "false".*; tie_word_embeddings is 1, not true'),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": "5e5"}}, r'rope_parameters.rope_theta is "5e5"'),
        ({"rope_parameters": None, "rope_theta": "5e5"}, 'rope_theta is "5e5", not a number'),
        ({"head_dim": "16"}, 'head_dim is "16", not an integer or null'),
        (
            {"num_hidden_layers": 2.0, "vocab_size": True},
            "vocab_size is true, not an integer; num_hidden_layers is 2.0",
        ),
        ({"rms_norm_eps": "1e-5"}, 'rms_norm_eps is "1e-5", not a number'),
    ],
)
def test_a_value_of_another_json_type_is_refused_by_name(hf_folder, tmp_path, monkeypatch, change, expected):
    """A hand-edited config.json with "false" in quotes: a string is true to Python (and to transformers 4.x, which
    would build the biases), so it is refused naming the key, not read as true nor left to fail deep in torch."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({k: v for k, v in {**config, **change}.items() if v is not None}))
    _no_weight_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"hf/config.json: .*{expected}") as e:
        import_hf(folder, tmp_path / "out")
    assert "linears have no bias" not in str(e.value) and "not hidden_size / num_attention_heads" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_inside_a_runs_checkpoints_is_refused(hf_folder, tmp_path):
    """Training deletes and replaces what lies in RUN/checkpoints (see test_export): weights imported there would go."""
    (tmp_path / "run").mkdir()
    for name in ("config.yaml", "tokenizer.json"):  # a run that has written no checkpoint yet
        (tmp_path / "run" / name).write_text("{}\n")
    with pytest.raises(CheckpointError, match=r"imported lies in the run's checkpoints folder .*run/checkpoints"):
        import_hf(hf_folder, tmp_path / "run" / "checkpoints" / "imported")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "tokenizer.json"]
    (tmp_path / "run" / "tokenizer.json").unlink()  # a project of another tool with a config.yaml: no run
    assert import_hf(hf_folder, tmp_path / "run" / "checkpoints" / "imported").is_dir()


def test_a_file_of_the_folder_given_instead_of_the_folder_is_named(hf_folder, tmp_path, capsys):
    from tests.unit.test_export import run_cli

    assert run_cli("import-hf", hf_folder / "config.json", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{hf_folder / 'config.json'} is a file, not a folder; pass the folder that holds it, {hf_folder}" in err
    assert "no such folder" not in err and not (tmp_path / "out").exists()


def test_float32_weights_of_a_config_that_says_bfloat16_are_imported_unrounded(hf_folder, tmp_path):
    """Many configs say "torch_dtype": "bfloat16" over float32 weights; transformers 5.x loads in the config's dtype
    by default, which rounded every weight to bfloat16 before the float32 run started from them."""
    from safetensors.torch import load_file

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    out = import_hf(folder, tmp_path / "imported")
    saved, imported = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert all(torch.equal(imported[k.removeprefix("model.")], v) for k, v in saved.items())


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda text: text + "n_experts: 8\n", "n_experts"),
        (lambda text: text.replace("d_model: 64", "d_model: sixty-four"), "d_model: Value 'sixty-four'"),
        (lambda text: text.replace("d_model: 64", "d_model: 65"), "model.n_heads=4: must divide model.d_model=65"),
        (lambda text: "vocab_size: [\n", "while parsing .* line 2"),
        (lambda text: "", "no vocab_size"),
    ],
    ids=["unknown key", "not an integer", "heads do not divide", "not YAML", "empty"],
)
def test_model_settings_edited_into_what_fp8train_cannot_build_are_named(hf_folder, tmp_path, edit, expected):
    """A hand-edited model.yaml (or a checkpoint's config.yaml from a version with other model settings) failed with
    OmegaConf's, YAML's or the model's own traceback when a run started from it or it was exported."""
    from fp8train.export.hf import saved_model_config

    out = import_hf(hf_folder, tmp_path / "imported")
    (out / "model.yaml").write_text(edit((out / "model.yaml").read_text()))
    with pytest.raises(
        CheckpointError,
        match=rf"imported/model.yaml: .*{expected}.*not model settings this version of fp8train can build",
    ):
        saved_model_config(out)


def test_importing_fp8train_weights_says_to_start_from_them_directly(hf_folder, tmp_path):
    """An fp8train checkpoint, or an import-hf folder, is what model.init_from takes already."""
    out = import_hf(hf_folder, tmp_path / "imported")
    with pytest.raises(CheckpointError, match=rf"written by fp8train.*start a run from it with model.init_from={out}"):
        import_hf(out, tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_two_rope_thetas_that_disagree_are_refused(hf_folder, tmp_path, monkeypatch):
    """transformers 5.x reads rope_parameters.rope_theta and ignores a top-level rope_theta beside it, which 4.x
    reads: a config.json whose top-level one was edited (to lengthen the context, say) imported the other unnoticed."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 5e5
    (folder / "config.json").write_text(json.dumps({**config, "rope_theta": 1e6}))
    _no_weight_reading(monkeypatch)
    with pytest.raises(CheckpointError, match=r"rope_theta is 1000000.0 but rope_parameters.rope_theta is 500000.0"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_with_ids_past_the_vocabulary_is_refused_though_it_has_fewer_tokens(
    hf_folder, tmp_path, monkeypatch
):
    """A tokenizer.json whose EOS sits at id 1000 (ids with gaps): 300 tokens, fewer than vocab_size 320, but the
    EOS that ends every document would have no embedding; counted by tokens, it was imported."""
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "<|endoftext|>":
            added["id"] = 1000
    tok["model"]["vocab"]["<|endoftext|>"] = 1000
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    _no_weight_reading(monkeypatch)
    with pytest.raises(
        CheckpointError, match=r"tokenizer has 300 tokens with ids up to 1000, but the model's vocab_si"
    ):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()

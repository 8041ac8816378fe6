"""export-hf: an FP8-trained checkpoint becomes a transformers Llama with the same logits."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from fp8train.config import compose
from fp8train.errors import CheckpointError
from fp8train.export.hf import checkpoint_to_export, export_hf, load_checkpoint_model
from fp8train.trainer import Trainer
from tests.helpers import ROOT, SMALL


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """A checkpoint of a few steps of fp8_smooth training (GQA, tied embeddings, RoPE theta 5e5): FP8 buffers
    and all."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(
        [
            *SMALL,
            "precision=fp8_smooth",
            "model.rope_theta=500000.0",
            "trainer.max_steps=3",
            "trainer.eval_every=0",
            "trainer.checkpoint_every=2",  # steps 2 and 3
            "trainer.keep_last=2",
        ]
    )
    assert cfg.model.tie_embeddings and cfg.model.kv_heads < cfg.model.n_heads
    Trainer(cfg, run_dir).fit()
    return run_dir


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(0))


def test_exported_bf16_logits_equal_fp8trains_bf16_forward(fp8_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf", dtype="bf16")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, local_files_only=True).eval()
    ours = load_checkpoint_model(fp8_checkpoint / "checkpoints" / "step_0000003").to(torch.bfloat16).eval()
    x = tokens(ours.cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x))
    assert hf.config.tie_word_embeddings and hf.config.num_key_value_heads == ours.cfg.kv_heads
    assert not any("_scaler" in k for k in hf.state_dict())


def test_exported_fp32_weights_equal_the_checkpoint(fp8_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    ours = load_checkpoint_model(fp8_checkpoint / "checkpoints" / "step_0000003").eval()
    for k, v in ours.state_dict().items():
        name = k if k.startswith("lm_head") else f"model.{k}"
        assert torch.equal(hf.state_dict()[name], v), k
    x = tokens(ours.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-5, atol=1e-5)


def no_random_init(monkeypatch) -> None:
    """Make drawing random values into a tensor that holds memory fail (on the meta device it costs nothing)."""

    def drawn(tensor, *args, **kwargs):
        if not tensor.is_meta:
            raise AssertionError(f"random values drawn into a {tuple(tensor.shape)} tensor")
        return tensor

    for method in ("normal_", "uniform_"):  # under every torch.nn.init function and nn.Linear's own init
        monkeypatch.setattr(torch.Tensor, method, drawn)


def test_export_draws_no_random_weights(fp8_checkpoint, tmp_path, monkeypatch):
    """Both models of an export are filled with the checkpoint's weights: drawing random ones first would cost a 7B
    model minutes and a 27 GB copy each (build on the meta device, then take the weights)."""
    ckpt = fp8_checkpoint / "checkpoints" / "step_0000003"
    expected = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if "_scaler." not in k}
    no_random_init(monkeypatch)
    out = export_hf(ckpt, tmp_path / "hf", dtype="fp32")
    monkeypatch.undo()
    exported = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(exported[f"model.{k}"], v) for k, v in expected.items() if not k.startswith("lm_head"))


def test_a_checkpoint_model_is_loaded_in_the_dtype_asked_with_its_tie_and_rope_tables(fp8_checkpoint, tmp_path):
    """The weights in that dtype from the start (export-hf's bf16: half the memory of float32 then a cast), the
    RoPE tables in float32 as build_model makes them, a tie kept under whichever name the file stores it."""
    from fp8train.export.hf import saved_model_config
    from fp8train.model import build_model

    ckpt = fp8_checkpoint / "checkpoints" / "step_0000003"
    built = build_model(saved_model_config(ckpt))
    for dtype in (torch.float32, torch.bfloat16):
        model = load_checkpoint_model(ckpt, dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert torch.equal(model.rotary_emb.cos, built.rotary_emb.cos) and model.rotary_emb.sin.dtype == torch.float32
        assert model.lm_head.weight is model.embed_tokens.weight and model.num_params() == built.num_params()
    weights = load_file(str(ckpt / "model.safetensors"))
    assert "embed_tokens.weight" in weights and "lm_head.weight" not in weights
    other = tmp_path / "step_0000003"
    shutil.copytree(ckpt, other)
    weights["lm_head.weight"] = weights.pop("embed_tokens.weight")
    save_file(weights, str(other / "model.safetensors"))
    model = load_checkpoint_model(other)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, weights["lm_head.weight"])


def test_exported_tokenizer_encodes_like_the_runs_tokenizer(fp8_checkpoint, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out = export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = Tokenizer.from_file(str(fp8_checkpoint / "tokenizer.json"))
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert hf_tok(text)["input_ids"] == ours.encode(text).ids
    assert hf_tok.eos_token == "<|endoftext|>"


def test_cli_exports_a_run_dir_and_refuses_a_non_empty_output(fp8_checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "fp8train.cli.main", "export-hf", str(fp8_checkpoint), str(tmp_path / "hf")]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "config.json").is_file()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert (
        again.returncode == 2
        and "exists and is not an empty folder" in again.stderr
        and "Traceback" not in again.stderr
    )


def test_exported_files_carry_rope_theta_and_tokenizer_class_for_transformers_4(fp8_checkpoint, tmp_path):
    """transformers 4.x (the Gaudi image's) reads a top-level rope_theta and knows PreTrainedTokenizerFast; 5.x
    writes theta only inside rope_parameters and names its own tokenizer class, which 4.x would not load."""
    out = export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 500000.0
    assert config.get("rope_parameters", {}).get("rope_theta", 500000.0) == 500000.0
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (
        tok_config["model_max_length"]
        == load_checkpoint_model(fp8_checkpoint / "checkpoints" / "step_0000003").cfg.max_seq_len
    )


def test_transformer_engine_extra_state_is_left_out(fp8_checkpoint, tmp_path):
    """A precision.engine=te checkpoint holds `<linear>._extra_state` (TE's scaling state): not a weight."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000003"
    shutil.copytree(fp8_checkpoint / "checkpoints" / "step_0000003", ckpt)
    shutil.copy(fp8_checkpoint / "tokenizer.json", tmp_path / "run" / "tokenizer.json")
    weights = load_file(str(ckpt / "model.safetensors"))
    save_file(
        {**weights, "layers.0.mlp.down_proj._extra_state": torch.zeros(8, dtype=torch.uint8)},
        str(ckpt / "model.safetensors"),
    )
    out = export_hf(ckpt, tmp_path / "hf", dtype="fp32")
    assert not any("_extra_state" in k for k in load_file(str(out / "model.safetensors")))


def test_an_output_path_that_is_a_file_is_refused(fp8_checkpoint, tmp_path):
    (tmp_path / "hf").write_text("not a folder")
    with pytest.raises(CheckpointError, match="exists and is not an empty folder"):
        export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")


def run_cli(*args: str) -> int:
    """`fp8train ARGS` in this process; its exit status (0 if it returned)."""
    from fp8train.cli.main import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def damaged_run(fp8_checkpoint, tmp_path):
    """A copy of the run whose newest checkpoint (step 3) has a truncated model.safetensors, and an intact older
    one (step 2)."""
    run = tmp_path / "run"
    shutil.copytree(fp8_checkpoint, run)
    weights = run / "checkpoints" / "step_0000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    return run


def test_a_run_dir_exports_its_newest_intact_checkpoint(fp8_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fp8train")
    run = damaged_run(fp8_checkpoint, tmp_path)
    assert run_cli("export-hf", run, tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert "step_0000003 is damaged" in caplog.text and "step_0000002 ->" in caplog.text


def test_a_damaged_checkpoint_named_explicitly_is_refused(fp8_checkpoint, tmp_path, capsys):
    run = damaged_run(fp8_checkpoint, tmp_path)
    assert run_cli("export-hf", run / "checkpoints" / "step_0000003", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "step_0000003: model.safetensors has 5 bytes" in err and "the checkpoint is damaged" in err
    assert not (tmp_path / "hf").exists()


def test_unreadable_weights_are_a_checkpoint_error(fp8_checkpoint, tmp_path):
    run = damaged_run(fp8_checkpoint, tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read"):
        load_checkpoint_model(run / "checkpoints" / "step_0000003")


def test_a_folder_without_checkpoints_is_named_for_what_it_lacks(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert run_cli("export-hf", tmp_path / "notes", tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "is neither a checkpoint folder" in err and "nor a run directory with checkpoints" in err
    assert run_cli("export-hf", tmp_path / "missing", tmp_path / "hf") == 2
    assert "no such checkpoint folder or run directory" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_created_is_refused(fp8_checkpoint, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(CheckpointError, match="file/hf: cannot create the output folder"):
        export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "file" / "hf")


def custom_eos_tokenizer(folder, eos: str = "<|doc|>"):
    """A BPE whose end-of-text token has a name fp8train does not guess, declared in tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([(ROOT / "data" / "tinyshakespeare.txt").read_text()[:100_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos).save_pretrained(folder)
    return folder


def test_a_run_with_a_declared_eos_of_its_own_exports_with_it(tmp_path):
    """The run trained with the EOS its tokenizer_config.json declared; the run dir keeps that declaration, so the
    export finds the same id rather than failing on a tokenizer.json that names no known EOS."""
    from transformers import AutoTokenizer

    folder = custom_eos_tokenizer(tmp_path / "tok")
    cfg = compose([*SMALL, "trainer.max_steps=1", "trainer.eval_every=0", f"data.tokenizer.path={folder}"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.data.eos_id == 1
    trainer.fit()
    out = export_hf(tmp_path / "run" / "checkpoints" / "step_0000001", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 1
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).eos_token == "<|doc|>"


def test_the_exported_tokenizer_encodes_text_as_training_did_with_no_bos_added(tmp_path):
    """A Llama-style tokenizer.json whose post-processor puts <s> first: the run trained on the text's ids alone, so
    the export must not make transformers' tokenizer add a BOS the model never saw."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from fp8train.data.tokenizer import train_bpe
    from fp8train.data.tokens import encode_chunks

    tok = train_bpe([(ROOT / "data" / "tinyshakespeare.txt").read_text()[:200_000]], vocab_size=300)
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)]),
        ]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<s>").save_pretrained(
        tmp_path / "tok"
    )
    cfg = compose([*SMALL, "trainer.max_steps=1", "trainer.eval_every=0", f"data.tokenizer.path={tmp_path / 'tok'}"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    out = export_hf(tmp_path / "run" / "checkpoints" / "step_0000001", tmp_path / "hf")
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    trained = [i for _, ids in encode_chunks(trainer.data.tokenizer, text) for i in ids]
    exported = AutoTokenizer.from_pretrained(out, local_files_only=True)(text)["input_ids"]
    assert bos not in trained and exported == trained


def superseded_run(fp8_checkpoint, tmp_path):
    """A copy of the run whose checkpoints were all set aside by a resume from an earlier step."""
    run = tmp_path / "run"
    shutil.copytree(fp8_checkpoint, run)
    aside = run / "checkpoints" / "superseded" / "after_step_0000001_20260101-000000"
    aside.mkdir(parents=True)
    for step in ("step_0000002", "step_0000003"):
        shutil.move(run / "checkpoints" / step, aside / step)
    return run, aside / "step_0000003"


def test_a_superseded_checkpoint_exports_with_its_runs_tokenizer(fp8_checkpoint, tmp_path):
    # superseded/ keeps checkpoints a resume replaced, to be used by path: their tokenizer is the run dir's.
    from transformers import AutoTokenizer

    run, ckpt = superseded_run(fp8_checkpoint, tmp_path)
    out = export_hf(ckpt, tmp_path / "hf")
    exported = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert exported.get_vocab() == Tokenizer.from_file(str(run / "tokenizer.json")).get_vocab()


def test_a_run_dir_with_only_superseded_checkpoints_names_them(fp8_checkpoint, tmp_path, capsys):
    run, ckpt = superseded_run(fp8_checkpoint, tmp_path)
    assert run_cli("export-hf", run, tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "without a complete checkpoint" in err and str(ckpt) in err
    assert not (tmp_path / "hf").exists()


def test_the_checkpoints_folder_of_a_run_exports_its_newest_checkpoint(fp8_checkpoint, tmp_path, capsys):
    # RUN_DIR/checkpoints is what a user sees listed beside the step folders; it means the run directory.
    assert run_cli("export-hf", fp8_checkpoint / "checkpoints", tmp_path / "hf") == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    via_run = export_hf(checkpoint_to_export(fp8_checkpoint), tmp_path / "hf_run")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (via_run / "model.safetensors").read_bytes()


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_no_half_written_folder(fp8_checkpoint, tmp_path, monkeypatch, existing):
    """The disk fills while the tokenizer is written, after the weights: a folder with config.json and weights but no
    tokenizer would pass for a model, and a second export would refuse it as not empty."""
    from transformers import PreTrainedTokenizerFast

    if existing:
        (tmp_path / "hf").mkdir()
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(CheckpointError, match=r"hf: writing it failed \(No space left on device\)"):
        export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == (["hf"] if existing else [])
    assert not existing or not any((tmp_path / "hf").iterdir())
    monkeypatch.undo()
    out = export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / "tokenizer.json").is_file()


def test_a_failed_write_removes_the_parent_folders_it_created_and_only_those(fp8_checkpoint, tmp_path, monkeypatch):
    """out=a/b/c/hf where only a existed: a failed export leaves a as it was and no empty b/c behind it."""
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "a").mkdir()
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(CheckpointError, match="writing it failed"):
        export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "a" / "b" / "c" / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and not any((tmp_path / "a").iterdir())


def test_the_temporary_folder_of_a_killed_export_is_removed_by_the_next(fp8_checkpoint, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "hf" / f".tmp-{dead.stdout.strip()}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_an_output_folder_that_is_a_link_is_written_through(fp8_checkpoint, tmp_path):
    """An empty OUT may be a link to (or a mount of) a larger disk: the files go there, the link stays."""
    (tmp_path / "big_disk").mkdir()
    (tmp_path / "hf").symlink_to(tmp_path / "big_disk")
    export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    assert (tmp_path / "hf").is_symlink() and (tmp_path / "big_disk" / "model.safetensors").is_file()


def test_exported_weights_are_as_readable_as_the_other_files(fp8_checkpoint, tmp_path):
    """safetensors creates its files private (0600); a folder to hand to other users or a serving container that runs
    as another user must be readable as the umask allows, like the config and tokenizer files beside it."""
    out = export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~current_umask(), modes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    "precision", ["fp8", "fp8_smooth_channel", "fp8_smooth_gaudi2", "fp8_bf16_down", "bf16", "fp32"]
)
def test_every_precision_recipe_exports_to_its_logits(precision, tmp_path):
    """Whatever state a recipe keeps beside the weights stays out of the export (untied embeddings, a vocabulary
    that is no multiple of 8, FP8 Adam's state in the checkpoint too)."""
    from transformers import AutoModelForCausalLM

    overrides = ["model.tie_embeddings=false", "model.vocab_size=2053", "optim=adamw_fp8", "monitor=disabled"]
    cfg = compose([*SMALL, f"precision={precision}", *overrides, "trainer.max_steps=1", "trainer.eval_every=0"])
    Trainer(cfg, tmp_path / "run").fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000001"
    out = export_hf(ckpt, tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    ours = load_checkpoint_model(ckpt).eval()
    x = tokens(2053)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x))
    assert hf.config.vocab_size == 2053 and not hf.config.tie_word_embeddings


def test_export_import_export_gives_the_same_files(fp8_checkpoint, tmp_path):
    """A checkpoint exported, imported, trained from (one step too small to move a weight) and exported again gives
    the first export byte for byte: weights, config.json and tokenizer files carry over unchanged both ways."""
    from fp8train.export.hf import import_hf, saved_model_config

    ckpt = fp8_checkpoint / "checkpoints" / "step_0000003"
    first = export_hf(ckpt, tmp_path / "first", dtype="fp32")
    imported = import_hf(first, tmp_path / "imported")
    weights = load_file(str(imported / "model.safetensors"))
    assert weights.keys() == {k for k in load_file(str(ckpt / "model.safetensors")) if "_scaler." not in k}
    assert all(torch.equal(v, load_file(str(ckpt / "model.safetensors"))[k]) for k, v in weights.items())
    saved = saved_model_config(imported)
    assert saved == dataclasses.replace(saved_model_config(ckpt), name="first")
    cfg = compose(
        [
            *SMALL,
            "precision=fp8_smooth",
            "model.rope_theta=500000.0",
            f"model.init_from={imported}",
            f"data.tokenizer.path={imported / 'tokenizer.json'}",
            "optim.lr=1e-30",
            "optim.min_lr=0",
            "trainer.max_steps=1",
            "trainer.eval_every=0",
        ]
    )
    Trainer(cfg, tmp_path / "run").fit()
    again = export_hf(checkpoint_to_export(tmp_path / "run"), tmp_path / "again", dtype="fp32")
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in first.iterdir())
    for file in first.iterdir():
        assert (again / file.name).read_bytes() == file.read_bytes(), file.name


def test_a_damaged_run_tokenizer_is_named_before_the_weights_are_read(fp8_checkpoint, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(fp8_checkpoint, run)
    (run / "tokenizer.json").write_text('{"version": "1.0", "model": ')

    def read(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr("fp8train.export.hf.load_checkpoint_model", read)
    assert run_cli("export-hf", run, tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert f"{run / 'tokenizer.json'} is not a tokenizer.json" in err and "data.tokenizer.path" in err
    assert not (tmp_path / "hf").exists()


def test_an_fp32_export_computes_fp8trains_logits_in_float64(fp8_checkpoint, tmp_path):
    """In float64 the two forwards agree exactly: the same arithmetic, not float32 rounding that happens to match."""
    from transformers import AutoModelForCausalLM

    ckpt = fp8_checkpoint / "checkpoints" / "step_0000003"
    out = export_hf(ckpt, tmp_path / "hf", dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, local_files_only=True).eval()
    ours = load_checkpoint_model(ckpt).double().eval()
    x = tokens(ours.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=1e-12)


def test_weights_taken_by_an_empty_model_hold_no_mapping_of_their_file(tmp_path):
    """A resumed run takes its checkpoint's weights this way; were they still mapped from model.safetensors, the
    disk space of that checkpoint, once rotated away by keep_last, would stay in use until the run ends."""
    from fp8train.config import ModelConfig
    from fp8train.export.hf import load_weights
    from fp8train.model import build_model, empty_model

    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
    saved = build_model(cfg)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, folder / "model.safetensors")
    model = empty_model(cfg)
    load_weights(model, folder)
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    assert str(folder / "model.safetensors") not in maps.read_text()
    assert torch.equal(model.embed_tokens.weight, saved.embed_tokens.weight)


@pytest.mark.parametrize("out", ["checkpoints/step_0000004", "checkpoints/step_0000003/hf", "checkpoints/hf"])
def test_an_output_folder_inside_the_runs_checkpoints_is_refused(fp8_checkpoint, tmp_path, capsys, out):
    """Training owns RUN/checkpoints: it replaces a step_N folder when it reaches step N, a resume moves it into
    superseded/ as a checkpoint of the replaced timeline, and keep_last deletes a checkpoint with what lies in it.
    An export there would be lost that way, so it is refused and the run's folders stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(fp8_checkpoint, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert run_cli("export-hf", run, run / out) == 2
    err = capsys.readouterr().err
    assert f"{run / out} lies in the run's checkpoints folder {run / 'checkpoints'}" in err, err
    assert f"e.g. {run / 'hf'}" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.parametrize("existing", [False, True])
def test_an_export_stopped_while_its_files_move_into_place_leaves_no_part_of_them(
    fp8_checkpoint, tmp_path, monkeypatch, existing
):
    """A Ctrl-C between two of the renames that move the files into OUT: the files moved so far go again (OUT empty
    or absent), and config.json, which makes a folder a model to transformers, is the last to move, so that a kill
    there leaves a folder transformers refuses rather than one without tokenizer files that passes for a model."""
    if existing:
        (tmp_path / "hf").mkdir()
    moved = []

    def replace(src, dst):
        if len(moved) == 4:  # of the 5 files: before the last
            raise KeyboardInterrupt
        os.rename(src, dst)
        moved.append(Path(dst).name)

    monkeypatch.setattr("fp8train.export.hf.os.replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    assert "config.json" not in moved
    assert [p.name for p in tmp_path.iterdir()] == (["hf"] if existing else [])
    assert not existing or not any((tmp_path / "hf").iterdir())


@pytest.mark.parametrize(
    "cwd, given",
    [
        ("checkpoints", "step_0000003"),
        ("checkpoints/step_0000003", "."),
        ("checkpoints", "."),
        ("checkpoints/step_0000003", ".."),
    ],
)
def test_a_checkpoint_or_run_given_by_a_relative_path_exports(fp8_checkpoint, tmp_path, monkeypatch, cwd, given):
    """`cd RUN/checkpoints; fp8train export-hf step_N OUT` found no tokenizer.json in its run directory ("."), and
    "." or ".." were neither a checkpoint nor a run directory to it."""
    monkeypatch.chdir(fp8_checkpoint / cwd)
    assert run_cli("export-hf", given, tmp_path / "hf") == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_an_output_link_to_a_missing_folder_is_named_as_such(fp8_checkpoint, tmp_path):
    """A link to a disk that is not mounted: 'cannot create the output folder (File exists)' said nothing useful."""
    (tmp_path / "hf").symlink_to(tmp_path / "unmounted" / "hf")
    with pytest.raises(CheckpointError, match=r"hf is a link to .*unmounted/hf, which does not exist \(a disk"):
        export_hf(fp8_checkpoint / "checkpoints" / "step_0000003", tmp_path / "hf")
    assert not (tmp_path / "unmounted").exists()

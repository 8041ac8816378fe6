"""Config composition and validation: every file composes, every bad value is reported in override syntax."""

from __future__ import annotations

import pytest

from fp8train.config import CONF_DIR, Config, compose, format_value, to_typed
from fp8train.errors import ConfigError

# Groups whose options need a value the option itself cannot know (the user's own text files).
NEEDS = {("data", "text"): ["data.sources=[{path: data/tinyshakespeare.txt}]"]}


def all_options():
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        for option in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, option.stem


@pytest.mark.parametrize("group,option", list(all_options()))
def test_every_config_file_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}", *NEEDS.get((group, option), [])])
    assert isinstance(cfg, Config)
    if group in ("model", "precision", "optim", "data", "backend", "parallel"):
        name = getattr(cfg, group).name
        assert getattr(name, "value", name) == option  # each option file names itself


def test_defaults_are_the_documented_default_run():
    cfg = compose([])
    assert (cfg.model.name, cfg.precision.name, cfg.data.name) == ("tiny", "fp8_smooth", "tinyshakespeare")
    assert (cfg.precision.recipe.value, cfg.precision.smooth_swiglu.value) == ("fp8", "token")
    assert cfg.logger.wandb.mode.value == "offline"
    assert cfg.run_name == "tiny-fp8_smooth-s1234"  # the wandb run name shows the precision
    assert cfg.tokens_per_step == cfg.trainer.micro_batch_size * cfg.data.seq_len


def test_llama2_7b_has_the_paper_shape():
    m = compose(["model=llama2_7b"]).model
    assert (m.n_layers, m.d_model, m.n_heads, m.ffn_dim, m.vocab_size) == (32, 4096, 32, 11008, 32000)


def test_experiment_files_hold_deltas_only():
    # An experiment must not restate the whole config: it names the groups it overrides and a few values.
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_"), path
        assert len([ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]) < 30, path


def problems(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    return e.value.problems


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
        ("optim.lr=abc", "optim.lr=abc: expected a number"),
        ("trainer.max_steps=1.5", "trainer.max_steps=1.5: expected an integer"),
        ("model.n_heads=6", "model.n_heads=6: must divide model.d_model=256"),
        ("model=huge", "model=huge: unknown option; choose one of llama2_7b, llama_125m, llama_1b, tiny"),
        ("data.sources=[{path: missing.txt}]", "data.sources.0.path=missing.txt: no such file"),
        ("data.seq_len=1024", "data.seq_len=1024: exceeds model.max_seq_len=512"),
        ("optim.lrr=1", "optim.lrr: unknown setting (known here: name, lr,"),
        ("logger.wandb.mode=loud", "logger.wandb.mode=loud: must be one of online, offline, disabled"),
        ("model.n_kv_heads=3", "model.n_kv_heads=3: must divide model.n_heads=4"),
        ("optim.betas=[0.9,1.5]", "optim.betas=[0.9,1.5]: must be two numbers in [0, 1)"),
        ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps=0: must be > 0"),
        ("data.val_fraction=0.7", "data.val_fraction=0.7: must be > 0 and < 0.5"),
        ("optim.min_lr=1", "optim.min_lr=1.0: must be <= optim.lr=0.001"),
        ("resume=no/such/dir", "resume=no/such/dir: no such checkpoint"),
        ("backend=tpu", "backend=tpu: unknown option; choose one of auto, cpu, cuda, hpu"),
        ("model=null", "model=null: a config group takes one of its options, not null; choose one of llama2_7b,"),
        ("variant=null", "variant=null: a config group takes one of its options, not null; choose one of bf16,"),
        # Hydra drops a deleted group or key and the schema's default filled the gap: model.d_model=256 unannounced
        (
            "~model",
            "~model: deleting a config group leaves model.* at the schema's built-in defaults, not an option of "
            "conf/model/; leave ~model out, or choose one of llama2_7b, llama_125m, llama_1b, tiny: model=OPTION",
        ),
        ("~precision=fp8_smooth", "~precision=fp8_smooth: deleting a config group leaves precision.* at the schema's"),
        (
            "~trainer.max_steps",
            "~trainer.max_steps: deleting a setting leaves it at the schema's built-in default, not the value conf/ "
            "gives it; leave ~trainer.max_steps out, or set the value: trainer.max_steps=VALUE",
        ),
        ("~trainer", "~trainer: deleting a section leaves trainer.* at the schema's built-in defaults, not the values"),
        (
            "~variant",
            "~variant: a config group is chosen, not deleted (variant is unset unless chosen); leave ~variant out, or "
            "choose one of bf16,",
        ),
        # Hydra's own messages for these stop at "Ambiguous value ..." or "... appears more than once": no fix named
        ("model=tiny,llama_1b", "model=tiny,llama_1b: several options are a sweep, one job each: add -m (--multirun)"),
        ("optim.betas=0.9,0.95", "optim.betas=0.9,0.95: several values are a sweep, one job each: add -m"),
        ("+model=llama_1b", "+model=llama_1b: model is in conf/config.yaml's defaults already; choose it without +"),
        ("+variant=bf16", "+variant=bf16: variant is in conf/config.yaml's defaults already; choose it without +"),
        ("++debug=smoke", "++debug=smoke: debug is in conf/config.yaml's defaults already; choose it without +"),
        # README: +backend.compile_options.NAME=VALUE; without the + the entry was only "unknown setting"
        (
            "backend.compile_options.max_autotune=true",
            "backend.compile_options.max_autotune: a new entry of backend.compile_options is added with a +: "
            "+backend.compile_options.max_autotune=true",
        ),
        (
            "backend.compile_options.triton.cudagraphs=false",
            "backend.compile_options.triton.cudagraphs: a new entry of backend.compile_options is added with a +: "
            "+backend.compile_options.triton.cudagraphs=false",
        ),
    ],
)
def test_each_bad_value_is_named_in_override_syntax(override, expected):
    found = problems([override])
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


@pytest.mark.parametrize(
    "overrides,expected",
    [
        # 2^-15 puts 448 below E4M3's smallest normal (2^-6): most of every tensor flushes to zero, and a margin
        # past fp32's range gives scale 0 and NaN losses.
        (["precision.margin=15"], "precision.margin=15: must be <= 14 for precision.profile=ocp"),
        (["precision=fp8_smooth_gaudi2", "precision.margin=14"], "precision.margin=14: must be <= 13"),
        (["precision.margin=200"], "precision.margin=200: must be <= 14"),
        # Every scaler allocates its whole history: 10^11 slots was a 400 GB allocation and a traceback.
        (["precision.amax_history_len=100000000000"], "precision.amax_history_len=100000000000: must be <= 16384"),
        (["precision.linears=[]"], "precision.linears=[]: precision.recipe=fp8 needs at least one linear in FP8"),
        (
            ["precision=fp8_bf16_down", "precision.linears=[down_proj]"],
            "precision.linears=[down_proj]: precision.recipe=fp8 needs at least one linear in FP8",
        ),
        (
            ["precision=fp8_smooth_channel", "precision.linears=[q_proj,up_proj]"],
            "precision.smooth_swiglu=channel: rescales the input of the FP8 down projection, but precision.linears",
        ),
        # Hugging Face's BPE trainer aborted with a Rust allocation backtrace
        (["data.tokenizer.vocab_size=100000000000"], "data.tokenizer.vocab_size=100000000000: must be <= 1048576"),
        # torch.manual_seed overflowed with a traceback; an empty resume was the launch directory as a checkpoint
        (["trainer.seed=18446744073709551616"], "trainer.seed=18446744073709551616: must be < 2^64"),
        (["resume="], "resume=: empty; use resume=none, resume=auto or a checkpoint path"),
        (
            ["optim.warmup_steps=10", "optim.decay_steps=5"],
            "optim.decay_steps=5: must be > optim.warmup_steps=10",
        ),
    ],
)
def test_settings_that_contradict_each_other_or_break_the_numbers_are_refused(overrides, expected):
    found = problems(overrides)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_the_largest_margins_accepted_keep_a_tensor_amax_a_normal_e4m3_number():
    from fp8train.config import MAX_MARGIN
    from fp8train.fp8 import formats

    for profile, limit in MAX_MARGIN.items():
        top = formats.fp8_max("e4m3", profile.value)
        smallest_normal = formats.fp8_min_subnormal("e4m3") * 2**3
        assert top * 2.0**-limit >= smallest_normal > top * 2.0 ** -(limit + 1)
        compose([f"precision.profile={profile.value}", f"precision.margin={limit}"])


def test_a_schedule_without_decay_or_warmup_past_the_decay_is_accepted():
    compose(["optim.schedule=constant", "optim.warmup_steps=10", "optim.decay_steps=5"])
    compose(["optim.warmup_steps=500", "trainer.max_steps=5"])  # a smoke run shorter than warmup
    compose(["precision=bf16", "precision.linears=[]"])


def test_engine_te_on_a_machine_without_habana_is_refused_before_the_run_starts(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "habana_frameworks" else real(n, *a))
    (found,) = problems(["precision.engine=te", "backend=auto"])
    assert found.startswith("precision.engine=te: Habana's Transformer Engine needs backend.name=hpu"), found
    assert "auto" in found


def test_zero3_with_per_channel_smooth_swiglu_is_accepted():
    # W_down diag(s) is formed inside down_proj's own forward, where ZeRO-3 has gathered W_down whole
    # (test_smooth_swiglu.py, and test_deepspeed.py on 2 ranks).
    cfg = compose(["parallel=deepspeed", "parallel.zero_stage=3", "precision=fp8_smooth_channel"])
    assert (cfg.parallel.zero_stage, cfg.precision.smooth_swiglu.value) == (3, "channel")


def test_null_for_an_unset_group_says_to_leave_it_out():
    (found,) = problems(["experiment=null"])
    assert found.endswith("or leave experiment= out (experiment is unset unless chosen)")
    (found,) = problems(["model=null"])
    assert "leave" not in found


def test_every_problem_is_listed_at_once():
    found = problems(["model=huge", "optim.lr=abc", "model.n_heads=5", "data.seq_len=1024", "trainer.seed=-1"])
    heads = [p.split(":")[0] for p in found]
    assert heads == [
        "model=huge",
        "optim.lr=abc",
        "model.n_heads=5",
        "model.n_kv_heads=2",  # follows from n_heads=5: reported too, so the user sees the whole picture
        "trainer.seed=-1",
        "data.seq_len=1024",
    ]


def test_error_message_is_one_paragraph_listing_problems():
    with pytest.raises(ConfigError) as e:
        compose(["optim.lr=-1", "trainer.max_steps=0"])
    text = str(e.value)
    assert text.startswith("Invalid configuration (2 problems):")
    assert "  - optim.lr=-1.0: must be > 0" in text and "  - trainer.max_steps=0: must be > 0" in text


def test_required_text_file_is_asked_for():
    assert problems(["data=text"]) == ["data.sources.0.path=: a text file is required: data.sources=[{path: FILE}]"]


def test_duplicate_source_names_are_refused():
    found = problems(["data.sources=[{path: data/tinyshakespeare.txt}, {path: data/tinyshakespeare.txt}]"])
    assert [p.split("=")[0] for p in found] == ["data.sources.0.name", "data.sources.1.name"]


def test_to_typed_accepts_plain_dicts_and_fills_defaults():
    cfg = to_typed({"optim": {"lr": 3e-4}, "model": {"name": "x"}})
    assert cfg.optim.lr == 3e-4 and cfg.model.name == "x" and cfg.trainer.max_steps == 300


@pytest.mark.parametrize("section", ["data", "trainer", "logger", "monitor"])
def test_the_schema_defaults_are_those_of_the_default_run(section):
    """The defaults written in fp8train/config.py are the values `python train.py` runs with, where conf/ has one
    default (model, precision and optim files extend the schema's plain base values instead)."""
    assert getattr(to_typed({}), section) == getattr(compose([]), section)


@pytest.mark.parametrize("value,text", [(None, "null"), (True, "true"), ([1, 2], "[1,2]"), ({"a": 1}, "{a: 1}")])
def test_format_value_writes_override_syntax(value, text):
    assert format_value(value) == text


def test_one_entry_of_a_list_is_set_by_its_index_as_the_data_errors_say():
    # The data errors say "point data.sources.0.path at ..."; that override must compose, and a typo in it be named.
    text = "data/tinyshakespeare.txt"
    cfg = compose(["data=text", f"data.sources.0.path={text}", "data.sources.0.name=mine"])
    assert [(s.path, s.name) for s in cfg.data.sources] == [(text, "mine")]
    assert compose([f"data.sources.0.path={text}"]).data.sources[0].path == text
    (found,) = problems(["data.sources.0.nam=x"])
    assert found == "data.sources.0.nam: unknown setting (known here: path, name)"
    (found,) = problems(["data.sources.1.path=b.txt"])  # there is one source: the index is named, and why
    assert found == (
        "data.sources.1.path=b.txt: data.sources has 1 entry (data.sources.0), so there is no data.sources.1; to "
        "add an entry, set the whole list: "
        "'data.sources=[{path: data/tinyshakespeare.txt, name: shakespeare},{path: b.txt}]'"
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # Hydra said only "Error merging override optim.betas.2=0.99 (list index out of range)"
        (["optim.betas.2=0.99"], "optim.betas.2=0.99: optim.betas has 2 entries (optim.betas.0 to optim.betas.1)"),
        (["logger.wandb.tags.0=a"], "logger.wandb.tags.0=a: logger.wandb.tags is empty, so there is no"),
        (["precision.linears.9=q_proj"], "precision.linears.9=q_proj: precision.linears has 7 entries"),
        # the length the list has after the overrides that set it whole
        (
            ["data.sources=[{path: a.txt}, {path: b.txt}]", "data.sources.2.name=c"],
            "data.sources.2.name=c: data.sources has 2 entries (data.sources.0 to data.sources.1), so there is no "
            "data.sources.2; to add an entry, set the whole list: "
            "'data.sources=[{path: a.txt},{path: b.txt},{name: c}]'",
        ),
    ],
)
def test_an_entry_past_the_end_of_a_list_is_named_with_the_list_length(overrides, expected):
    found = problems(overrides)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_an_override_hydra_cannot_parse_is_named_with_the_other_problems():
    found = problems(["model", "data.sources=[{path: a.txt}", "optim.lr=-1"])
    assert found[0].startswith("model: not an override Hydra can parse (missing EQUAL at '<EOF>'); write KEY=VALUE")
    assert found[1].startswith("data.sources=[{path: a.txt}: not an override Hydra can parse (no viable alternative")
    assert found[2:] == ["optim.lr=-1.0: must be > 0"]


def test_a_pattern_as_source_path_says_that_each_file_is_listed(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("some text\n")
    (found,) = problems(["data=text", f"data.sources=[{{path: {tmp_path}/*.txt}}]"])
    assert found.startswith(f"data.sources.0.path={tmp_path}/*.txt: is a pattern (it matches 2 files); ")
    assert f"data.sources=[{{path: {tmp_path}/a.txt}}, {{path: {tmp_path}/b.txt}}]" in found
    (found,) = problems(["data=text", f"data.sources=[{{path: {tmp_path}/*.md}}]"])
    assert found.startswith(f"data.sources.0.path={tmp_path}/*.md: is a pattern (it matches no file); ")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # fp8_smooth's recipe is fp8; the refused value must not leave the schema's bf16 to be checked against
        (["precision.recipe=fp16"], ["precision.recipe=fp16: must be one of bf16, fp32, fp8"]),
        (["model.max_seq_len=64", "data.seq_len=abc"], ["data.seq_len=abc: expected an integer"]),
    ],
)
def test_a_refused_value_is_named_alone_not_with_checks_of_the_default_it_leaves(overrides, expected):
    assert problems(overrides) == expected


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # "cannot resolve an interpolation: Interpolation key 'nope' not found", without the setting that has it
        (["data.name=${nope}"], "data.name=${nope}: cannot resolve an interpolation: Interpolation key 'nope' not"),
        (["model.name=${data.nope}"], "model.name=${data.nope}: cannot resolve an interpolation: Interpolation key"),
        (["data=text", "data.sources=[{path: '${nope}'}]"], "data.sources.0.path=${nope}: cannot resolve"),
        (
            ["data.cache_dir=${oc.env:FP8TRAIN_NO_SUCH_VARIABLE}"],
            "data.cache_dir=${oc.env:FP8TRAIN_NO_SUCH_VARIABLE}: cannot resolve an interpolation: KeyError raised "
            "while resolving interpolation: \"Environment variable 'FP8TRAIN_NO_SUCH_VARIABLE' not found\"",
        ),
    ],
)
def test_an_interpolation_that_fails_is_named_by_its_setting(overrides, expected):
    found = problems(overrides)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_the_cache_dir_from_the_environment_is_taken_as_it_is(monkeypatch):
    # Empty, it put the caches in the launch directory; with "${" in it, a traceback from omegaconf.
    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", "")
    assert problems([]) == [
        "data.cache_dir=: empty; name a folder for the tokenizer and token caches (an empty FP8TRAIN_CACHE_DIR= gives "
        "this too)"
    ]
    monkeypatch.setenv("FP8TRAIN_CACHE_DIR", "/tmp/caches/${USER}")
    assert compose([]).data.cache_dir == "/tmp/caches/${USER}"


@pytest.mark.parametrize(
    "overrides, group",
    [(["variant=fp8", "precision=fp32"], "precision"), (["variant=fp8_smooth_adamw_fp8", "optim=adamw"], "optim")],
)
def test_a_group_the_variant_chooses_is_not_chosen_again_on_the_command_line(overrides, group):
    # The command line won over the variant's choice: precision=fp32 beside experiment=compare_bf16_fp8 trained
    # every arm (bf16, fp8, fp8_smooth) in fp32, with no word.
    (found,) = problems(overrides)
    assert found.startswith(f"{overrides[1]}: the chosen variant sets {group} itself"), found
    assert compose(["variant=fp8", "precision.margin=2"]).precision.margin == 2  # a single value applies to the arm

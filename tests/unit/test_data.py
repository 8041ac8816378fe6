"""Data pipeline: source checks, split, tokenizer (trained, cached, loaded), token cache, deterministic batches."""

import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from fp8train.config import PROJECT_ROOT, DataConfig, SourceConfig, TokenizerConfig, compose
from fp8train.data import TokenData, build_data
from fp8train.data import tokenizer as tokenizer_module
from fp8train.data.tokenizer import train_bpe
from fp8train.data.tokens import encode_chunks, publishing, split_point
from fp8train.errors import ConfigError, DataError, Fp8trainError

SHAKESPEARE = (PROJECT_ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
TEXT = SHAKESPEARE[:30_000]  # ~9k tokens: enough for a 512-token BPE, trained in a few ms


def data_cfg(
    tmp_path, texts, *, vocab_size=512, seq_len=32, val_fraction=0.1, tokenizer_path=None, names=None, cache_dir=None
):
    """A DataConfig over ``texts`` (str or bytes), each written to its own file in tmp_path; caches in
    ``cache_dir`` (default tmp_path/cache)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, text in enumerate(texts):
        path = tmp_path / f"src{i}.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        sources.append(SourceConfig(path=str(path), name=names[i] if names else None))
    return DataConfig(
        name="test",
        sources=sources,
        tokenizer=TokenizerConfig(path=tokenizer_path, vocab_size=vocab_size),
        seq_len=seq_len,
        val_fraction=val_fraction,
        cache_dir=str(cache_dir or tmp_path / "cache"),
    )


def build(cfg, seed=0, micro_batch_size=4, grad_accum_steps=2, rank=0, world_size=1) -> TokenData:
    return build_data(
        cfg,
        seed=seed,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        rank=rank,
        world_size=world_size,
    )


def cache_entries(cache: Path) -> list[str]:
    """What a cache folder holds, by kind (tokens, tokenizer, .tmp), leaving out the lock files of its builders."""
    return [p.name.split("-")[0] for p in cache.iterdir() if not p.name.endswith(".lock")]


def train_tokens(data: TokenData) -> np.ndarray:
    dtype = json.loads((data.cache_path / "meta.json").read_text())["dtype"]
    return np.fromfile(data.cache_path / "train.bin", dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_trained_tokenizer_round_trips_any_text_and_has_the_configured_size(tmp_path):
    data = build(data_cfg(tmp_path, [TEXT], vocab_size=512))
    assert data.vocab_size == data.tokenizer.get_vocab_size() == 512
    assert data.eos_id == data.tokenizer.token_to_id("<|endoftext|>")
    assert data.tokenizer_file.is_file()
    assert Tokenizer.from_file(str(data.tokenizer_file)).to_str() == data.tokenizer.to_str()
    for text in ["Plain ASCII, with  two spaces.\n\tTab", "Crème brûlée à Zürich, naïve façade", "emoji 😀🚀 中文 ∑x²"]:
        assert data.tokenizer.decode(data.tokenizer.encode(text).ids) == text
    # Merges were learned: common English is shorter in tokens than in bytes.
    assert len(data.tokenizer.encode(TEXT[:2000]).ids) < 0.5 * len(TEXT[:2000].encode())


def test_second_build_reuses_the_cached_tokenizer(tmp_path, monkeypatch, caplog):
    cfg = data_cfg(tmp_path, [TEXT])
    first = build(cfg)
    mtime = first.tokenizer_file.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    with caplog.at_level(logging.INFO, logger="fp8train.data"):
        second = build(cfg)
    assert second.tokenizer_file == first.tokenizer_file
    assert second.tokenizer_file.stat().st_mtime_ns == mtime
    assert any("tokenizer cache hit" in r.getMessage() for r in caplog.records)
    assert any("token cache hit" in r.getMessage() for r in caplog.records)
    assert len(list((tmp_path / "cache").glob("tokenizer-*"))) == 1


def test_chunked_encoding_equals_encoding_the_whole_text():
    tokenizer = train_bpe([TEXT], 400)
    # Runs of spaces and blank lines at line ends and starts are where a careless cut changes the pre-tokens.
    lines = "".join(f"line {i}  \n\n   indented {i}\n \nx{i}'s\n" for i in range(300)) + TEXT[:5000]
    one_line = "".join(f"word{i}  x{i}, {i}   y  " for i in range(300))  # no newline: cut at lone spaces
    for text in [lines, one_line]:
        chunks = list(encode_chunks(tokenizer, text, piece_chars=50))
        assert len(chunks) > 5
        assert sum(n for n, _ in chunks) == len(text)
        assert [i for _, ids in chunks for i in ids] == tokenizer.encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------------------------------------------
# Split


def test_val_split_is_the_tail_starting_at_a_line():
    cut = split_point(TEXT, 0.1)
    assert TEXT[cut - 1] == "\n"
    assert abs((len(TEXT) - cut) - 0.1 * len(TEXT)) <= 0.025 * len(TEXT)
    assert split_point("a" * 1000, 0.1) == 900  # no newline near: the exact fraction


def test_token_cache_holds_exactly_the_train_and_val_text(tmp_path):
    data = build(data_cfg(tmp_path, [TEXT], val_fraction=0.1))
    cut = split_point(TEXT, 0.1)
    train, val = train_tokens(data), np.fromfile(data.cache_path / "val_0.bin", dtype=np.uint16)
    assert train[-1] == val[-1] == data.eos_id and data.eos_id not in train[:-1]
    assert data.tokenizer.decode(train[:-1].tolist()) == TEXT[:cut]
    assert data.tokenizer.decode(val[:-1].tolist()) == TEXT[cut:]
    assert data.n_train_tokens == len(train) and data.n_val_tokens == {"src0": len(val)}


def test_a_utf8_byte_order_mark_is_no_part_of_the_text(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark (EF BB BF): it marks the encoding, it is not text,
    so it gets no tokens, and the file trains on the very data (the same caches) as without it. A U+FEFF inside
    the text stays, as Python's utf-8-sig decoding keeps it."""
    cache = tmp_path / "cache"
    plain = build(data_cfg(tmp_path / "plain", [TEXT], cache_dir=cache))
    marked = build(data_cfg(tmp_path / "marked", [b"\xef\xbb\xbf" + TEXT.encode()], cache_dir=cache))
    assert marked.cache_path == plain.cache_path and marked.fingerprint == plain.fingerprint
    assert train_tokens(marked).tolist() == train_tokens(plain).tolist()
    assert len(list(cache.glob("tokenizer-*"))) == 1
    inner = build(data_cfg(tmp_path / "inner", [TEXT[:1000] + "\ufeff" + TEXT[1000:]], cache_dir=cache))
    assert "\ufeff" in inner.tokenizer.decode(train_tokens(inner).tolist())
    with pytest.raises(DataError, match="is empty"):
        build(data_cfg(tmp_path / "only", [b"\xef\xbb\xbf"]))


def test_tokenizer_never_sees_the_val_text(tmp_path):
    word = "Zyxquor"  # appears nowhere in Shakespeare; 300 repeats make it one token if BPE ever sees it
    block = "".join(f"{word} {word}.\n" for _ in range(150))
    in_val = build(data_cfg(tmp_path / "val", [TEXT + block], val_fraction=0.1, vocab_size=1024))
    in_train = build(data_cfg(tmp_path / "train", [block + TEXT], val_fraction=0.1, vocab_size=1024))
    cut = split_point(TEXT + block, 0.1)
    assert cut <= len(TEXT) + 1  # the whole block lies in the val tail
    assert len(in_val.tokenizer.encode(" " + word).ids) > 1
    assert len(in_train.tokenizer.encode(" " + word).ids) == 1  # control: seen in training -> merged


# --------------------------------------------------------------------------------------------------------------
# Batches


def test_batches_depend_only_on_seed_step_micro_step_rank(tmp_path):
    a = build(data_cfg(tmp_path / "a", [TEXT]), seed=7)
    b = build(data_cfg(tmp_path / "b", [TEXT]), seed=7)  # separate caches: tokenizer trained twice
    other_seed = build(data_cfg(tmp_path / "a", [TEXT]), seed=8)
    assert a.fingerprint == b.fingerprint
    for step, micro_step in [(0, 0), (5, 1), (400, 0)]:  # step 400 is past the first epoch
        xa, ya = a.train_batch(step, micro_step)
        xb, yb = b.train_batch(step, micro_step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, other_seed.train_batch(step, micro_step)[0])
    assert not torch.equal(a.train_batch(0, 0)[0], a.train_batch(0, 1)[0])


def test_train_batch_is_the_window_the_spec_names(tmp_path):
    data = build(data_cfg(tmp_path, [TEXT]), seed=3, micro_batch_size=4, grad_accum_steps=2, rank=1, world_size=2)
    tokens, T, n = train_tokens(data), data.seq_len, data.n_train_windows
    assert n == (len(tokens) - 1) // T
    step, micro_step = 9, 1
    x, y = data.train_batch(step, micro_step)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, T) and x.device.type == "cpu"
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    for j in range(4):
        g = ((step * 2 + micro_step) * 2 + 1) * 4 + j
        window = np.random.default_rng([3, g // n]).permutation(n)[g % n]
        assert x[j].tolist() == tokens[window * T : window * T + T].tolist()
        assert y[j].tolist() == tokens[window * T + 1 : window * T + T + 1].tolist()


def test_one_epoch_over_ranks_and_micro_steps_covers_every_window_once(tmp_path):
    cfg = data_cfg(tmp_path, [TEXT])
    B, G, W = 3, 2, 2
    ranks = [build(cfg, seed=1, micro_batch_size=B, grad_accum_steps=G, rank=r, world_size=W) for r in range(W)]
    tokens, T, n = train_tokens(ranks[0]), ranks[0].seq_len, ranks[0].n_train_windows
    window_of = {tuple(tokens[w * T : w * T + T].tolist()): w for w in range(n)}
    assert len(window_of) == n  # every window's text is distinct, so rows identify windows
    order = []  # windows in global sample order g
    step = 0
    while len(order) < 2 * n:
        for micro_step in range(G):
            for rank in ranks:
                order += [window_of[tuple(row)] for row in rank.train_batch(step, micro_step)[0].tolist()]
        step += 1
    assert sorted(order[:n]) == list(range(n))
    assert sorted(order[n : 2 * n]) == list(range(n))
    assert order[:n] != order[n : 2 * n]  # each epoch has its own order
    position = ranks[0].position(step)
    assert (position["step"], position["epoch"], position["samples_seen"]) == (
        step,
        step * B * G * W // n,
        step * B * G * W,
    )


def test_val_batches_are_fixed_consecutive_windows(tmp_path):
    """With one process and no accumulation (the defaults) the set is eval_batches batches of consecutive windows."""
    data = build(data_cfg(tmp_path, [TEXT], seq_len=16), micro_batch_size=4, grad_accum_steps=1)
    val = np.fromfile(data.cache_path / "val_0.bin", dtype=np.uint16)
    n_windows = (len(val) - 1) // 16
    first = list(data.val_batches("src0", 3))
    second = list(data.val_batches("src0", 3))
    assert len(first) == 3 and all(counted for _, _, counted in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    inputs = torch.cat([x for x, _, _ in first])
    targets = torch.cat([y for _, y, _ in first])
    assert inputs.reshape(-1).tolist() == val[: 12 * 16].tolist()  # windows in order, no overlap
    assert targets.reshape(-1).tolist() == val[1 : 12 * 16 + 1].tolist()
    everything = list(data.val_batches("src0", 10**6))  # capped by the split: the last batch may be short
    assert sum(len(x) for x, _, _ in everything) == n_windows
    assert len(everything) == -(-n_windows // 4)


def val_windows_per_rank(cfg, eval_batches, micro_batch_size, grad_accum_steps, world_size):
    """Per rank, the validation windows (indices into the split) of each batch it runs, and whether it counts."""
    out = []
    for rank in range(world_size):
        data = build(
            cfg, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, rank=rank, world_size=world_size
        )
        val = np.fromfile(data.cache_path / "val_0.bin", dtype=np.uint16)
        T = data.seq_len
        window_of = {tuple(val[w * T : w * T + T].tolist()): w for w in range((len(val) - 1) // T)}
        out.append(
            [
                ([window_of[tuple(row)] for row in x.tolist()], counted)
                for x, _, counted in data.val_batches("src0", eval_batches)
            ]
        )
    return out


@pytest.mark.parametrize("eval_batches", [3, 10**6], ids=["3-global-batches", "whole-split"])
def test_the_validation_set_is_the_same_for_every_split_of_the_global_batch(tmp_path, eval_batches):
    """eval_batches counts global batches: 8 sequences each in all three layouts, so one validation set, which
    the ranks share out (each runs 1/N of it) instead of each evaluating it whole. The whole split (49 windows of
    30 tokens, 13 micro-batches of 4) does not divide evenly over 2 ranks: the rank with fewer batches runs one
    more, not counted, so every rank runs as many forwards (ZeRO-3 gathers weights from every rank in each)."""
    cfg = data_cfg(tmp_path, [TEXT], seq_len=30)
    n_split = (len(np.fromfile(build(cfg).cache_path / "val_0.bin", dtype=np.uint16)) - 1) // 30
    n = min(eval_batches * 8, n_split)
    layouts = {
        "micro 8, 1 rank": val_windows_per_rank(cfg, eval_batches, 8, 1, 1),
        "micro 4, accum 2, 1 rank": val_windows_per_rank(cfg, eval_batches, 4, 2, 1),
        "micro 4, 2 ranks": val_windows_per_rank(cfg, eval_batches, 4, 1, 2),
    }
    for name, ranks in layouts.items():
        counted = [w for batches in ranks for ws, c in batches if c for w in ws]
        assert counted == list(range(n)), name  # every window of the set once, over all ranks
        assert len({len(batches) for batches in ranks}) == 1, name  # the same number of forwards on every rank
        for batches in ranks:  # 1/N of the set per rank (up to a micro-batch when it does not divide)
            share = sum(len(ws) for ws, c in batches if c)
            assert abs(share - n / len(ranks)) <= 4, name
    # The same micro-batches, on one rank or two: a batch-dependent FP8 scale quantizes them alike too.
    one, two = layouts["micro 4, accum 2, 1 rank"], layouts["micro 4, 2 ranks"]
    assert [ws for ws, c in one[0] if c] == [ws for batches in two for ws, c in batches if c]
    if eval_batches == 3:
        assert [sum(len(ws) for ws, c in batches if c) for batches in two] == [12, 12]
    else:
        assert n == 49 and [len(batches) for batches in two] == [7, 7]
        assert [sum(c for _, c in batches) for batches in two] == [6, 7]


def test_two_named_sources(tmp_path):
    a, b = SHAKESPEARE[:20_000], SHAKESPEARE[500_000:520_000]
    data = build(data_cfg(tmp_path, [a, b], names=["first", "second"]))
    assert data.val_sources == ["first", "second"]
    train = train_tokens(data)
    ends = np.flatnonzero(train == data.eos_id)  # one EOS after each source's train part
    assert ends.tolist() == [ends[0], len(train) - 1]
    assert data.tokenizer.decode(train[: ends[0]].tolist()) == a[: split_point(a, 0.1)]
    assert data.tokenizer.decode(train[ends[0] + 1 : -1].tolist()) == b[: split_point(b, 0.1)]
    assert len(list(data.val_batches("second", 1))) == 2  # one global batch: 2 micro-batches of 4
    with pytest.raises(KeyError):
        next(data.val_batches("src0", 1))


# --------------------------------------------------------------------------------------------------------------
# Given tokenizers


@pytest.fixture
def trained(tmp_path):
    """A BPE trained on TEXT and the data built with it."""
    return build(data_cfg(tmp_path / "ref", [TEXT]))


def test_tokenizer_json_and_folders_load_offline(tmp_path, trained, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = trained.train_batch(2, 1)[0]
    fast_dir, vocab_dir = tmp_path / "hf_fast", tmp_path / "hf_vocab"
    PreTrainedTokenizerFast(tokenizer_object=trained.tokenizer, eos_token="<|endoftext|>").save_pretrained(fast_dir)
    vocab_dir.mkdir()
    trained.tokenizer.model.save(str(vocab_dir))  # vocab.json + merges.txt: only transformers can read these
    (vocab_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    for i, path in enumerate([trained.tokenizer_file, fast_dir, vocab_dir]):
        data = build(data_cfg(tmp_path / f"run{i}", [TEXT], tokenizer_path=str(path)))
        assert data.vocab_size == trained.vocab_size and data.eos_id == trained.eos_id
        assert data.tokenizer_file.is_file()
        assert torch.equal(data.train_batch(2, 1)[0], reference)  # same ids, same windows
    # The tokenizer.json written for the folder without one is fp8train's cache: damaged, it is written again (it
    # was copied into the run dir as it was, and other ranks could not read it).
    written = data.tokenizer_file.read_bytes()
    data.tokenizer_file.write_bytes(written[: len(written) // 2])
    again = build(data_cfg(tmp_path / f"run{i}", [TEXT], tokenizer_path=str(vocab_dir)))
    assert again.tokenizer_file == data.tokenizer_file and again.tokenizer_file.read_bytes() == written


def test_a_tokenizer_saved_with_truncation_or_padding_still_encodes_every_token(tmp_path, trained):
    """A tokenizer.json may carry the truncation/padding of its last use; encoding the corpus in 64k-character
    pieces must not cut each piece to max_length tokens nor pad it."""
    reference = train_tokens(trained)
    tok = Tokenizer.from_str(trained.tokenizer.to_str())
    tok.enable_truncation(max_length=16)
    tok.enable_padding(length=4096, pad_id=trained.eos_id)
    file = tmp_path / "truncating" / "tokenizer.json"
    file.parent.mkdir()
    tok.save(str(file))
    data = build(data_cfg(tmp_path / "run", [TEXT], tokenizer_path=str(file)))
    assert np.array_equal(train_tokens(data), reference)
    assert torch.equal(data.train_batch(2, 1)[0], trained.train_batch(2, 1)[0])


@pytest.mark.parametrize("eos_id", [1000, 70_000], ids=["uint16", "uint32"])
def test_a_tokenizer_whose_ids_have_gaps_sizes_the_model_by_its_largest_id(tmp_path, trained, eos_id):
    """ids need not be 0..n-1 (a tokenizer.json may place special tokens far above the rest): the model must
    embed every id the corpus holds, and the cache must store ids above 65535 without wrapping."""
    from fp8train.trainer import with_vocab_size

    spec = json.loads(trained.tokenizer.to_str())
    old_eos = trained.eos_id
    spec["added_tokens"][0]["id"] = spec["model"]["vocab"]["<|endoftext|>"] = eos_id
    file = tmp_path / "gaps.json"
    file.write_text(json.dumps(spec))
    data = build(data_cfg(tmp_path / "run", [TEXT], tokenizer_path=str(file)))
    assert data.tokenizer.get_vocab_size() == 512 and data.eos_id == eos_id
    assert data.vocab_size == eos_id + 1  # every id the model may see is below it
    expected = train_tokens(trained).astype(np.int64)
    expected[expected == old_eos] = eos_id
    assert np.array_equal(train_tokens(data), expected)  # EOS stored as itself, not wrapped to 16 bits
    cfg = compose(["model.vocab_size=512"])
    with pytest.raises(ConfigError, match=rf"model\.vocab_size=512: smaller than the tokenizer's {eos_id + 1}"):
        with_vocab_size(cfg, data.vocab_size)
    assert with_vocab_size(compose([]), data.vocab_size).model.vocab_size >= eos_id + 1


def test_a_damaged_cached_tokenizer_is_trained_again_into_the_same_bytes(tmp_path, caplog):
    """A torn write or a full disk in data.cache_dir: the tokenizer fp8train trained is fp8train's to replace, as a
    damaged token cache is (the run stopped with "Delete ..."). BPE training is deterministic, so the retrained
    tokenizer is the lost one and the token cache keyed by it still serves."""
    from fp8train.data.loader import check_data

    cfg = data_cfg(tmp_path, [TEXT])
    first = build(cfg)
    intact = first.tokenizer_file.read_bytes()
    torn = intact[: len(intact) // 2]
    first.tokenizer_file.write_bytes(torn)
    # fp8train check on a corpus it would not tokenize: a warning and no training, as for a damaged token cache
    with caplog.at_level(logging.WARNING, logger="fp8train"):
        summary, vocab = check_data(cfg, max_chars=10, seed=0, micro_batch_size=4, grad_accum_steps=1)
    assert vocab is None and "not tokenized" in summary and first.tokenizer_file.read_bytes() == torn
    assert "cannot read" in caplog.text and "it is trained again when training starts" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fp8train"):
        again = build(cfg)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"the tokenizer cache {first.tokenizer_file.parent} has a tokenizer.json that ")
    assert again.tokenizer_file == first.tokenizer_file and again.tokenizer_file.read_bytes() == intact
    assert again.cache_path == first.cache_path and "token cache hit" in caplog.text
    assert torch.equal(again.train_batch(3, 1)[0], first.train_batch(3, 1)[0])
    assert cache_entries(tmp_path / "cache") == ["tokenizer", "tokens"]  # the damaged copy is gone
    # A tokenizer the user named is the user's file: refused with what to do, never replaced.
    mine = tmp_path / "mine" / "tokenizer.json"
    mine.parent.mkdir()
    mine.write_bytes(torn)
    with pytest.raises(DataError, match=f"data.tokenizer.path={mine}: {mine} is not a tokenizer.json that"):
        build(data_cfg(tmp_path / "run", [TEXT], tokenizer_path=str(mine)))
    assert mine.read_bytes() == torn


def test_a_cached_tokenizer_folder_without_its_tokenizer_json_is_trained_again(tmp_path, caplog):
    """A partial copy of the cache folder, or a clean-up that deleted files: the folder is there, tokenizer.json is
    not. The run went on with a tokenizer file that did not exist, and failed copying it into the run dir."""
    cfg = data_cfg(tmp_path, [TEXT])
    first = build(cfg)
    (first.tokenizer_file.parent / "partial").write_text("")
    first.tokenizer_file.unlink()
    with caplog.at_level(logging.WARNING, logger="fp8train"):
        again = build(cfg)
    assert again.tokenizer_file == first.tokenizer_file and again.tokenizer_file.is_file()
    assert again.tokenizer.to_str() == first.tokenizer.to_str()
    assert f"the tokenizer cache {first.tokenizer_file.parent} has no tokenizer.json" in caplog.text


def test_a_tokenizer_json_saved_with_a_byte_order_mark_is_named_so(tmp_path, trained):
    """An editor that saves UTF-8 with a byte-order mark makes a tokenizer.json that tokenizers (and transformers)
    cannot parse, with "expected value at line 1 column 1": the message says what is at line 1 column 1."""
    file = tmp_path / "tokenizer.json"
    file.write_bytes(b"\xef\xbb\xbf" + trained.tokenizer_file.read_bytes())
    with pytest.raises(DataError) as e:
        build(data_cfg(tmp_path / "run", [TEXT], tokenizer_path=str(file)))
    assert f"{file} starts with a UTF-8 byte-order mark" in str(e.value)
    assert "Save it without one" in str(e.value)


def test_tokenizer_without_eos_is_refused(tmp_path):
    file = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(file))
    with pytest.raises(DataError, match=r"data\.tokenizer\.path=.*no end-of-text token"):
        build(data_cfg(tmp_path, [TEXT], tokenizer_path=str(file)))


# --------------------------------------------------------------------------------------------------------------
# User errors


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b"text\x00\x01\x02 more", r"looks binary \(a NUL byte at byte offset 4\)"),
        (
            "Caf\u00e9 au lait\nna\u00efve\n".encode("latin-1"),
            r"not valid UTF-8: byte 0xe9 at byte offset 3 \(line 1\)",
        ),
        (b"\xef\xbb\xbfok\nCaf\xe9\n", r"not valid UTF-8: byte 0xe9 at byte offset 9 \(line 2\)"),  # after a BOM
    ],
    ids=["missing", "empty", "binary", "latin-1", "bom-latin-1"],
)
def test_unusable_source_names_key_and_file(tmp_path, content, expected):
    cfg = data_cfg(tmp_path, [TEXT, content or b""])
    path = tmp_path / "src1.txt"
    if content is None:
        path.unlink()
    with pytest.raises(DataError, match=expected) as e:
        build(cfg)
    assert f"data.sources.1.path={path}" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_utf8_file_with_a_damaged_byte_is_not_told_to_convert_from_latin1(tmp_path):
    """UTF-8 text with a stray bad byte (a cut download, a bad concatenation): converting it from Latin-1 would turn
    every accented letter into two (é -> Ã©), so the advice is to drop the bad bytes. A Latin-1 file, whose bytes
    before the first bad one are ASCII, is still told to convert."""
    damaged = "Caf\u00e9 ok\n".encode() * 3 + b"bad \xff byte\n" + TEXT.encode()
    with pytest.raises(DataError) as e:
        build(data_cfg(tmp_path / "damaged", [damaged]))
    message = str(e.value)
    assert "byte 0xff at byte offset 31 (line 4)" in message
    assert "iconv -f utf-8 -t utf-8 -c" in message and "latin1" not in message
    with pytest.raises(DataError) as e:
        build(data_cfg(tmp_path / "latin1", ["Caf\u00e9 ok\n".encode("latin-1") + TEXT.encode()]))
    assert "iconv -f latin1 -t utf-8" in str(e.value) and "-c" not in str(e.value)


def test_every_unusable_source_is_named_at_once(tmp_path):
    """Three files of a corpus, two unusable: one run says so for both, not one per attempt."""
    cfg = data_cfg(tmp_path, [b"", TEXT, "Caf\u00e9\n".encode("latin-1")])
    with pytest.raises(DataError) as e:
        build(cfg)
    message = str(e.value)
    assert message.startswith("2 of the 3 data.sources cannot be used: ")
    assert f"data.sources.0.path={tmp_path / 'src0.txt'}: the file" in message and "is empty" in message
    assert f"data.sources.2.path={tmp_path / 'src2.txt'}: the file" in message and "not valid UTF-8" in message
    assert "src1" not in message and "\n" not in message


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_a_utf16_or_utf32_text_file_is_named_so_with_the_conversion(tmp_path, encoding):
    """Text saved as UTF-16 (Windows' "Unicode") is full of NUL bytes, but it is text: say which encoding to convert."""
    cfg = data_cfg(tmp_path, [TEXT[:2000].encode(encoding)])
    with pytest.raises(DataError) as e:
        build(cfg)
    family = encoding[:6].upper()
    assert f"is {family} text, not UTF-8" in str(e.value)
    iconv_name = encoding.replace("-be", "be")  # no byte-order mark: the byte order must be named
    assert f"iconv -f {iconv_name} -t utf-8" in str(e.value) and "binary" not in str(e.value)


def test_a_folder_as_source_is_named_a_folder_with_the_way_to_list_its_files(tmp_path):
    from fp8train.config import compose
    from fp8train.errors import ConfigError

    (tmp_path / "corpus").mkdir()
    with pytest.raises(ConfigError) as err:
        compose(["data=text", f"data.sources=[{{path: {tmp_path / 'corpus'}}}]"])
    message = str(err.value)
    assert f"data.sources.0.path={tmp_path / 'corpus'}: is a folder" in message and "no such file" not in message
    assert f"data.sources=[{{path: {tmp_path / 'corpus'}/a.txt}}, " in message


def test_a_pipe_as_source_is_named_a_pipe_not_a_missing_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # what a shell's <(zcat corpus.gz) hands over
    with pytest.raises(ConfigError) as err:
        compose(["data=text", f"data.sources=[{{path: {tmp_path / 'fifo'}}}]"])
    message = str(err.value)
    assert f"data.sources.0.path={tmp_path / 'fifo'}: {tmp_path / 'fifo'} is not a regular file (a pipe" in message
    assert "no such file" not in message


def test_thousands_of_sources_do_not_hold_a_file_descriptor_each(tmp_path):
    """A corpus split into more files than the open-file limit (often 1024): numpy's memmap keeps a descriptor
    open per file, so mapping every validation split at once failed with 'Too many open files'. Here the limit is
    lowered to 150 more than the test process uses and there are 200 sources."""
    import resource

    texts = [SHAKESPEARE[i * 1500 : (i + 1) * 1500] for i in range(200)]
    cfg = data_cfg(tmp_path, texts, seq_len=8, val_fraction=0.2)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 150, hard))
    try:
        data = build(cfg, micro_batch_size=2, grad_accum_steps=1)
        batches = {name: [x for x, _, _ in data.val_batches(name, 1)] for name in data.val_sources}
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    dtype = json.loads((data.cache_path / "meta.json").read_text())["dtype"]
    for i, name in enumerate(data.val_sources):
        val = np.fromfile(data.cache_path / f"val_{i}.bin", dtype=dtype)
        assert data.n_val_tokens[name] == len(val)
        assert torch.cat(batches[name]).flatten().tolist() == val[:16].tolist()  # 2 windows of 8, in order


def test_corpus_too_short_for_seq_len(tmp_path):
    with pytest.raises(DataError, match=r"^data\.seq_len=4096: the training split holds only \d+ tokens"):
        build(data_cfg(tmp_path, [TEXT[:3000]], seq_len=4096))
    with pytest.raises(DataError, match=r"^data\.seq_len=512: the validation split of source 'src0'.*val_fraction"):
        build(data_cfg(tmp_path, [TEXT[:20_000]], seq_len=512, val_fraction=0.05))


def test_a_training_split_smaller_than_one_global_batch_is_a_warning(tmp_path, caplog):
    """Fewer windows than sequences per step: every step holds some windows twice or more (several epochs in one
    step), which the loss curve does not show."""
    cfg = data_cfg(tmp_path, [TEXT[:3000]], seq_len=32)
    with caplog.at_level(logging.WARNING, logger="fp8train.data"):
        data = build(cfg, micro_batch_size=16, grad_accum_steps=2, world_size=2)
    assert data.n_train_windows < 64
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"holds {data.n_train_windows} windows of data.seq_len=32" in warned[0]
    assert "one global batch of 64 sequences" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fp8train.data"):
        build(cfg, micro_batch_size=2, grad_accum_steps=1)
    assert not caplog.records


def test_every_source_with_a_too_short_validation_split_is_named_at_once(tmp_path):
    """Short files among a corpus: one run names them all, rather than one per attempt (each retokenizing)."""
    texts = [TEXT, "Short one.\n" * 20, TEXT[:20_000], "Another short file.\n" * 10]
    with pytest.raises(DataError) as e:
        build(data_cfg(tmp_path, texts, seq_len=64, names=["a", "b", "c", "d"]))
    message = str(e.value)
    assert message.startswith("data.seq_len=64: the validation splits of 2 of the 4 sources hold fewer than")
    assert f"data.sources.1.path={tmp_path / 'src1.txt'} ('b'): " in message
    assert f"data.sources.3.path={tmp_path / 'src3.txt'} ('d'): " in message
    assert "'a'" not in message and "'c'" not in message and "\n" not in message


# --------------------------------------------------------------------------------------------------------------
# Cache atomicity


def test_concurrent_builds_leave_one_complete_cache(tmp_path):
    cfg = data_cfg(tmp_path, [SHAKESPEARE[:200_000]], vocab_size=1024)
    kwargs = dict(seed=0, micro_batch_size=2, grad_accum_steps=1)
    ctx = multiprocessing.get_context("spawn")  # fork would copy the thread pools of torch and tokenizers
    procs = [ctx.Process(target=build_data, args=(cfg,), kwargs=kwargs) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    data = build(cfg)
    cache = tmp_path / "cache"
    assert sorted(cache_entries(cache)) == ["tokenizer", "tokens"]
    assert data.cache_path.parent == cache
    assert len(train_tokens(data)) == data.n_train_tokens


def _build_counting(cfg: DataConfig, start, slow_rebuild: bool, out: str) -> None:
    """Build ``cfg``'s data in this process once every process has passed ``start``, recording each tokenizer
    training and tokenization and the log. A tokenization is slowed down so that builders overlap; with
    ``slow_rebuild``, this process pauses after its first check of an existing cache."""
    from fp8train.data import tokenizer, tokens

    built, lines = [], []
    real_train, real_write, real_damage = tokenizer.train_bpe, tokens._write_tokens, tokens.cache_damage
    tokenizer.train_bpe = lambda *a: built.append("train_bpe") or real_train(*a)
    tokens._write_tokens = lambda *a: built.append("_write_tokens") or time.sleep(1) or real_write(*a)
    checks = []

    def cache_damage(*a):
        damage = real_damage(*a)
        if not checks and slow_rebuild:
            time.sleep(2)  # the other process discards the damaged cache and publishes a new one meanwhile
        checks.append(damage)
        return damage

    tokens.cache_damage = cache_damage
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("fp8train").addHandler(handler)
    logging.getLogger("fp8train").setLevel(logging.INFO)
    start.wait()
    data = build_data(cfg, seed=0, micro_batch_size=2, grad_accum_steps=1)
    with open(out, "w") as f:
        json.dump(
            {"built": built, "cache": str(data.cache_path), "tokens": train_tokens(data).tolist(), "log": lines}, f
        )


def _run_builders(cfg: DataConfig, tmp_path: Path, slow: list[bool]) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")  # fork would copy the thread pools of torch and tokenizers
    start = ctx.Barrier(len(slow))
    outs = [tmp_path / f"builder{i}.json" for i in range(len(slow))]
    procs = [ctx.Process(target=_build_counting, args=(cfg, start, s, str(o))) for s, o in zip(slow, outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(slow)
    return [json.loads(o.read_text()) for o in outs]


def test_concurrent_builders_train_and_tokenize_once_and_the_others_wait(tmp_path):
    """The ranks of a machine with its own data.cache_dir all build at once: one trains the tokenizer and tokenizes
    while the others wait for it, say so, and then open what it wrote."""
    cfg = data_cfg(tmp_path, [TEXT])
    results = _run_builders(cfg, tmp_path, [False, False, False])
    built = sorted(b for r in results for b in r["built"])
    assert built == ["_write_tokens", "train_bpe"], built
    assert len({r["cache"] for r in results}) == 1 and len({tuple(r["tokens"]) for r in results}) == 1
    waits = [line for r in results for line in r["log"] if line.startswith("waiting for ")]
    assert any(f"which builds {results[0]['cache']}" in line for line in waits), waits
    cache = tmp_path / "cache"
    tokens_dir, tokenizer_dir = Path(results[0]["cache"]).name, next(cache.glob("tokenizer-*")).name
    assert sorted(p.name for p in cache.iterdir()) == sorted(  # each with the lock file of its builders, no .tmp-*
        [tokens_dir, tokenizer_dir, f".{tokens_dir}.lock", f".{tokenizer_dir}.lock"]
    )


def test_two_processes_finding_the_same_damaged_cache_rebuild_it_once(tmp_path):
    """Both see the damaged cache; the first discards it and publishes a new one; the second, after its lock, finds
    that one sound instead of discarding it in turn (which pulled the files from under the first)."""
    cfg = data_cfg(tmp_path, [TEXT])
    path = build(cfg).cache_path
    (path / "meta.json").write_text("{")
    results = _run_builders(cfg, tmp_path, [False, True])
    assert sorted(b for r in results for b in r["built"]) == ["_write_tokens"]
    assert [r["cache"] for r in results] == [str(path)] * 2
    assert results[0]["tokens"] == results[1]["tokens"] == train_tokens(build(cfg)).tolist()
    assert any("written meanwhile by another process" in line for line in results[1]["log"]), results[1]["log"]


def test_processes_finding_the_same_damaged_tokenizer_train_it_once(tmp_path):
    """As for a damaged token cache: one trains the tokenizer again under its lock, the others then find it sound,
    and the token cache keyed by it is reused by all."""
    cfg = data_cfg(tmp_path, [TEXT])
    first = build(cfg)
    intact = first.tokenizer_file.read_bytes()
    first.tokenizer_file.write_bytes(intact[: len(intact) // 2])
    results = _run_builders(cfg, tmp_path, [False, False, False])
    assert sorted(b for r in results for b in r["built"]) == ["train_bpe"]
    assert [r["cache"] for r in results] == [str(first.cache_path)] * 3
    assert first.tokenizer_file.read_bytes() == intact


def test_a_file_system_without_locks_builds_as_before_with_one_warning(tmp_path, monkeypatch, caplog):
    import fcntl

    from fp8train.data import tokens

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(tokens, "_warned_no_locks", False)
    with caplog.at_level(logging.INFO, logger="fp8train"):
        data = build(data_cfg(tmp_path, [TEXT]))
        build(data_cfg(tmp_path / "other", [TEXT[:20_000]]))
    warned = [r for r in caplog.records if "refuses file locks" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING, caplog.text
    assert "No locks available" in warned[0].getMessage()
    assert np.array_equal(train_tokens(data), train_tokens(build(data_cfg(tmp_path / "again", [TEXT]))))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["tokenizer", "tokens"]


def _build_as_rank(rank: int, cfgs: list[tuple[list[DataConfig], bool]], init_file: str, out: str) -> None:
    """One of the gloo ranks (as many as configs in ``cfgs[i][0]``): build each config's data (``cfgs[i][0][rank]``)
    as the trainer does, recording whether this rank read the sources, trained a tokenizer, wrote a token cache or
    hashed one, and what it got. With ``cfgs[i][1]``, rank 0's files are out of the other ranks' sight, as on another
    machine's local disk."""
    import torch.distributed as dist

    from fp8train import trainer
    from fp8train.data import loader, tokenizer, tokens

    record = []
    for module, name in ((loader, "read_sources"), (tokenizer, "train_bpe"), (tokens, "_write_tokens")):
        original = getattr(module, name)
        setattr(module, name, lambda *a, _f=original, _n=name: record.append(_n) or _f(*a))
    real_sha256 = tokens.file_sha256

    def file_sha256(*a):  # recorded once per build: one call per cache file
        if "file_sha256" not in record:
            record.append("file_sha256")
        return real_sha256(*a)

    tokens.file_sha256 = file_sha256
    world_size = len(cfgs[0][0])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = []
    real_shareable = trainer.shareable

    def elsewhere(shared: dict) -> dict:  # the same names in another machine's folder
        tokenizer_file = Path(shared["tokenizer_file"])
        return {
            **shared,
            "cache_path": f"/elsewhere/{Path(shared['cache_path']).name}",
            "tokenizer_file": f"/elsewhere/{tokenizer_file.parent.name}/{tokenizer_file.name}",
        }

    for by_rank, hide in cfgs:
        record.clear()
        trainer.shareable = lambda data, _hide=hide: (elsewhere if _hide else dict)(real_shareable(data))
        layout = dict(seed=0, micro_batch_size=2, grad_accum_steps=1, rank=rank, world_size=world_size)
        try:
            data = trainer.build_data_rank0_first(by_rank[rank], **layout)
            results.append({"built": list(record), "batch": data.train_batch(3, 0)[0].tolist()})
        except Fp8trainError as e:  # rank 0's DataError, and on rank 1 the same message
            results.append({"error": str(e)})
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(results, f)


def _run_ranks(tmp_path: Path, cfgs: list[tuple[list[DataConfig], bool]]) -> list[list[dict]]:
    """_build_as_rank on each rank; what each rank got from each config."""
    ctx = multiprocessing.get_context("spawn")
    ranks = range(len(cfgs[0][0]))
    outs = [tmp_path / f"rank{r}.json" for r in ranks]
    procs = [ctx.Process(target=_build_as_rank, args=(r, cfgs, str(tmp_path / "init"), str(outs[r]))) for r in ranks]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * len(ranks)
    return [json.loads(o.read_text()) for o in outs]


def test_data_parallel_ranks_tokenize_once_and_fail_together(tmp_path):
    """Rank 0 reads the sources, trains the tokenizer and writes the token cache; the other ranks then open what it
    made without reading the corpus again (nor hashing a cache rank 0 has just checked), instead of every rank of a
    node doing it all at once. A data error reaches every rank, none waits forever. A rank that cannot see rank 0's
    cache (a cache folder local to each node) builds its own, which must hold the same tokens; if it is other data,
    that rank says so and the others stop with it."""
    shared = data_cfg(tmp_path / "ok", [TEXT])
    bad = data_cfg(tmp_path / "bad", [b""])
    per_node = [data_cfg(tmp_path / f"node{r}", [TEXT]) for r in (0, 1)]
    other_text = [data_cfg(tmp_path / f"other{r}", [TEXT[: 20_000 + r]]) for r in (0, 1)]
    cfgs = [([shared, shared], False), ([bad, bad], False), (per_node, True), (other_text, True)]
    (ok0, bad0, node0, other0), (ok1, bad1, node1, other1) = _run_ranks(tmp_path, cfgs)
    assert ok0["built"] == ["read_sources", "train_bpe", "_write_tokens"] and ok1["built"] == []
    assert ok0["batch"] != ok1["batch"]  # each rank its own rows, from the same cache
    assert bad0["error"] == bad1["error"] and "is empty" in bad0["error"]
    assert node1["built"] == ["read_sources", "train_bpe", "_write_tokens"]
    assert (node0["batch"], node1["batch"]) == (ok0["batch"], ok1["batch"])
    assert other1["error"].startswith("data.sources: rank 1 sees other data than rank 0")
    # Rank 0 stops too, rather than wait in the next collective for a rank that has left.
    assert other0["error"] == "rank 1 could not open the data; see its message."


def test_the_ranks_of_a_machine_without_rank_0s_files_read_the_corpus_once(tmp_path):
    """Ranks 1 and 2 share a cache folder that rank 0's is not (another machine's local disk): one of them reads the
    sources, trains the tokenizer and tokenizes into it; the other waits, then opens those files under the names
    rank 0 gave (the names hash the content) without reading the corpus, as it would rank 0's own."""
    node0, node1 = (data_cfg(tmp_path / f"node{n}", [TEXT]) for n in (0, 1))
    results = [r[0] for r in _run_ranks(tmp_path, [([node0, node1, node1], True)])]
    assert results[0]["built"] == ["read_sources", "train_bpe", "_write_tokens"]
    assert sorted(r["built"] for r in results[1:]) == [["file_sha256"], ["read_sources", "train_bpe", "_write_tokens"]]
    expected = [
        build(node0, micro_batch_size=2, grad_accum_steps=1, rank=r, world_size=3).train_batch(3, 0)[0]
        for r in range(3)
    ]
    assert [r["batch"] for r in results] == [b.tolist() for b in expected]


def test_a_late_publisher_discards_its_copy_and_a_failed_one_leaves_nothing(tmp_path):
    final = tmp_path / "tokens-x"
    with publishing(final) as slow:
        (slow / "who").write_text("slow")
        with publishing(final) as fast:  # another process finishing first
            (fast / "who").write_text("fast")
    assert (final / "who").read_text() == "fast"
    with pytest.raises(RuntimeError):
        with publishing(tmp_path / "tokens-y"):
            raise RuntimeError("tokenization failed")
    assert [p.name for p in tmp_path.iterdir()] == ["tokens-x"]


# --------------------------------------------------------------------------------------------------------------
# Cache integrity


@pytest.mark.parametrize("damage", ["overwritten", "padded", "truncated", "meta"])
def test_a_damaged_token_cache_is_rebuilt_with_one_log_line(tmp_path, caplog, damage):
    """Bytes overwritten in place, or a partial copy padded to the right size, keep every file's size: the
    checksums in meta.json catch them, and the cache is tokenized again instead of training on garbage."""
    cfg = data_cfg(tmp_path, [TEXT])
    first = build(cfg)
    good, path = train_tokens(first).copy(), first.cache_path
    del first  # its memory maps
    train_bin = path / "train.bin"
    raw = bytearray(train_bin.read_bytes())
    if damage == "overwritten":
        raw[100:108] = bytes(8)
    elif damage == "padded":
        raw[len(raw) // 2 :] = bytes(len(raw) - len(raw) // 2)
    elif damage == "truncated":
        raw = raw[:-2]
    if damage == "meta":
        (path / "meta.json").write_text("{")
    else:
        train_bin.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="fp8train"):
        again = build(cfg)
    damaged = [r for r in caplog.records if "fails its check" in r.getMessage()]
    assert len(damaged) == 1 and damaged[0].levelno == logging.WARNING, caplog.text
    assert str(path) in damaged[0].getMessage() and "tokenized again" in damaged[0].getMessage()
    assert again.cache_path == path and np.array_equal(train_tokens(again), good)
    assert sorted(cache_entries(tmp_path / "cache")) == ["tokenizer", "tokens"]


@pytest.mark.parametrize("unreadable", ["meta", "bin"])
def test_another_users_unreadable_token_cache_is_refused_not_discarded(tmp_path, monkeypatch, unreadable):
    """A shared data.cache_dir holding a cache written by another user with a private umask: a permission error is
    not damage, so the cache is neither renamed away nor rebuilt in its place; the run says whose fix it is."""
    from fp8train.data import tokens

    cfg = data_cfg(tmp_path, [TEXT])
    path = build(cfg).cache_path
    before = tokens.file_identities(path)

    def denied(file, *args):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(tokens, "_read_meta" if unreadable == "meta" else "file_sha256", denied)
    with pytest.raises(DataError) as e:
        build(cfg)
    message = str(e.value)
    assert message.startswith(f"data.cache_dir={path.parent}: the token cache {path} cannot be read (Permission")
    assert "chmod -R a+rX" in message and "set data.cache_dir to a folder of your own" in message
    assert tokens.file_identities(path) == before


def test_another_users_unreadable_tokenizer_cache_is_refused_not_discarded(tmp_path, monkeypatch):
    """As for the token cache: a cached tokenizer.json this user may not read is not trained again in its place."""
    cfg = data_cfg(tmp_path, [TEXT])
    file = build(cfg).tokenizer_file
    before = file.read_bytes()
    real = Path.read_bytes

    def denied(path):
        if path == file:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError) as e:
        build(cfg)
    message = str(e.value)
    assert message.startswith(f"data.cache_dir={file.parent.parent}: the tokenizer cache {file.parent} cannot be read")
    assert "chmod -R a+rX" in message
    assert real(file) == before


def test_a_cache_dir_that_is_a_file_is_named_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("a file")
    for cache_dir in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "cache"):
        cfg = data_cfg(tmp_path, [TEXT])
        cfg.cache_dir = str(cache_dir)
        with pytest.raises(DataError) as e:
            build(cfg)
        assert str(e.value) == (
            f"data.cache_dir={cache_dir}: {tmp_path / 'notes.txt'} is a file, not a folder; set data.cache_dir (or "
            "FP8TRAIN_CACHE_DIR) to a writable folder."
        )


def test_a_damaged_token_cache_that_cannot_be_replaced_is_refused_by_name(tmp_path, monkeypatch):
    cfg = data_cfg(tmp_path, [TEXT])
    path = build(cfg).cache_path
    raw = bytearray((path / "train.bin").read_bytes())
    raw[10:12] = bytes([raw[10] ^ 1, raw[11]])
    (path / "train.bin").write_bytes(bytes(raw))
    real_rename = os.rename

    def read_only(src, dst):  # a cache folder on a read-only mount
        if Path(src) == path:
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", read_only)
    with pytest.raises(DataError) as e:
        build(cfg)
    message = str(e.value)
    assert message.startswith(f"data.cache_dir: the token cache {path} is damaged (train.bin")
    assert "Read-only file system" in message and "set data.cache_dir" in message


def test_the_data_fingerprint_of_a_fixed_corpus_and_tokenizer_does_not_change(tmp_path):
    """Checkpoints store the data fingerprint and a resume on another one is refused, so a change of the cache
    format must not change it: every saved run would stop resuming. Pinned to the value fp8train has computed
    since the cache got its format number (a tokenizers release that serializes tokenizer.json otherwise would also
    change it)."""
    words = ["<|endoftext|>", "[UNK]", *sorted(set(SHAKESPEARE[:30_000].split()))[:500]]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    cfg = DataConfig(
        name="t",
        sources=[SourceConfig(path=str(PROJECT_ROOT / "data" / "tinyshakespeare.txt"))],
        tokenizer=TokenizerConfig(path=str(tmp_path / "tokenizer.json")),
        seq_len=32,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
    )
    data = build(cfg)
    assert data.fingerprint == "af0c79cc9b84e96e"
    meta = json.loads((data.cache_path / "meta.json").read_text())
    del meta["sha256"]  # a cache written before checksums were recorded
    (data.cache_path / "meta.json").write_text(json.dumps(meta))
    again = build(cfg)
    assert again.fingerprint == data.fingerprint and again.cache_path == data.cache_path
    assert "sha256" in json.loads((again.cache_path / "meta.json").read_text())


def test_meta_json_records_the_sha256_of_every_cache_file(tmp_path):
    from fp8train.data import tokens

    path = build(data_cfg(tmp_path, [TEXT, TEXT[::-1]])).cache_path
    digests = json.loads((path / "meta.json").read_text())["sha256"]
    assert sorted(digests) == ["train.bin", "val_0.bin", "val_1.bin"]
    for name, digest in digests.items():
        assert digest == hashlib.sha256((path / name).read_bytes()).hexdigest()
    assert tokens.cache_damage(path) is None


def test_ctrl_c_while_tokenizing_ends_with_a_message_and_leaves_no_cache(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of tokenizing: a one-line message and exit status 130, no traceback, and nothing in the
    cache folder that a later run would take for a finished cache; the next run tokenizes and trains."""
    from fp8train.cli.main import main
    from fp8train.data import tokens

    real_encode = tokens.encode_chunks

    def encode_then_ctrl_c(*args, **kwargs):
        chunks = real_encode(*args, piece_chars=1000)
        yield next(chunks)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal sends
        time.sleep(5)
        yield from chunks

    cfg = data_cfg(tmp_path, [TEXT])
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [
        "train",
        f"hydra.run.dir={run_dir}",
        "data=text",
        f"data.sources=[{{path: {cfg.sources[0].path}}}]",
        f"data.cache_dir={cache}",
        "data.tokenizer.vocab_size=512",
        "data.seq_len=32",
        "backend=cpu",
        "logger.wandb.mode=disabled",
        "trainer.max_steps=1",
    ]
    monkeypatch.setattr(tokens, "encode_chunks", encode_then_ctrl_c)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # Hydra reads its overrides from there
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # Hydra configures logging for the run
    try:
        main(args)
        status = 0
    except SystemExit as e:
        status = e.code
    except KeyboardInterrupt:
        status = "KeyboardInterrupt escaped: Python prints its traceback"
    finally:
        root.handlers[:], root.level = handlers, level
    assert status == 130
    err = capsys.readouterr().err
    assert err.startswith("fp8train: interrupted (Ctrl-C)") and err.count("\n") == 1, err
    assert cache_entries(cache) == ["tokenizer"]  # no tokens-*, no .tmp-*
    monkeypatch.setattr(tokens, "encode_chunks", real_encode)
    assert np.array_equal(train_tokens(build(cfg)), train_tokens(build(data_cfg(tmp_path / "again", [TEXT]))))


# --------------------------------------------------------------------------------------------------------------
# Resuming with another batch layout


def step_windows(layout, step):
    """The rows of every (micro_step, rank) of ``step``, as a sorted list: the data one optimizer step trains on."""
    rows = []
    for data in layout:
        for micro_step in range(data.grad_accum_steps):
            rows += [tuple(r) for r in data.train_batch(step, micro_step)[0].tolist()]
    return sorted(rows)


def test_a_layout_with_the_same_global_batch_trains_each_step_on_the_same_sequences(tmp_path):
    """micro_batch_size x grad_accum_steps x ranks = 8 in every layout: step k takes sequences [8k, 8k + 8)."""
    cfg = data_cfg(tmp_path, [TEXT])
    layouts = [
        [build(cfg, seed=2, micro_batch_size=8, grad_accum_steps=1)],
        [build(cfg, seed=2, micro_batch_size=4, grad_accum_steps=2)],
        [build(cfg, seed=2, micro_batch_size=2, grad_accum_steps=2, rank=r, world_size=2) for r in range(2)],
    ]
    saved = layouts[0][0].position(5)
    for layout in layouts:
        assert [step_windows(layout, s) for s in (5, 6, 40)] == [step_windows(layouts[0], s) for s in (5, 6, 40)]
        for data in layout:
            data.check_resume(saved, "ckpt")  # the same data: accepted


def test_another_global_batch_or_seed_is_refused_by_name(tmp_path):
    """Step k of a run with another global batch starts at another sequence: it would repeat or skip data."""
    cfg = data_cfg(tmp_path, [TEXT])
    saved = build(cfg, seed=2, micro_batch_size=8, grad_accum_steps=1).position(5)
    for kwargs, named in [
        (
            dict(seed=2, micro_batch_size=4, grad_accum_steps=1),
            "trainer.micro_batch_size=4 x trainer.grad_accum_steps=1",
        ),
        (
            dict(seed=2, micro_batch_size=8, grad_accum_steps=2),
            "trainer.micro_batch_size=8 x trainer.grad_accum_steps=2",
        ),
        (
            dict(seed=2, micro_batch_size=4, grad_accum_steps=1, rank=1, world_size=4),
            # It stopped after step 5 (5 x 8 = 40 sequences); its next step, step 6, would start at 5 x 16 = 80.
            "after 40 training sequences (trainer.micro_batch_size=8 x trainer.grad_accum_steps=1 x 1 data-parallel "
            "rank(s)), and with this run's trainer.micro_batch_size=4 x trainer.grad_accum_steps=1 x 4 data-parallel "
            "rank(s) its next step, step 6, would start at sequence 80",
        ),
        (dict(seed=3, micro_batch_size=8, grad_accum_steps=1), "trainer.seed=3"),
    ]:
        with pytest.raises(DataError) as err:
            build(cfg, **kwargs).check_resume(saved, "ckpt")
        message = str(err.value)
        assert named in message and "model.init_from=ckpt" in message and "\n" not in message


def test_a_resume_on_other_data_names_what_changed(tmp_path):
    """Checkpoints refuse to continue on other data; when the config is the same but a file was edited, the refusal
    names the file (and which part of it) instead of pointing at settings nobody changed."""
    texts = [TEXT[:12_000], TEXT[12_000:24_000]]
    cfg = data_cfg(tmp_path, texts, names=["a", "b"])
    saved = build(cfg).position(5)
    build(cfg).check_resume(saved, "ckpt")  # the same data: accepted

    def refusal(cfg) -> str:
        with pytest.raises(DataError) as e:
            build(cfg).check_resume(saved, "ckpt")
        assert str(e.value).startswith("resume: ckpt cannot continue on the data of an unbroken run: ")
        assert "model.init_from=ckpt" in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    (tmp_path / "src1.txt").write_text(texts[1][:-2] + "#\n")  # one character of the held-out part
    message = refusal(cfg)
    assert f"data.sources.1.path={tmp_path / 'src1.txt'} ('b') holds other text than it was trained on" in message
    assert "its held-out part" in message and "'a'" not in message and "data.seq_len" not in message
    assert "tokenizer" not in message  # trained on the training parts alone: the same
    (tmp_path / "src1.txt").write_text(texts[1])
    (tmp_path / "src0.txt").write_text("Edited.\n" + texts[0])
    message = refusal(cfg)
    assert "('a') holds other text than it was trained on (its training part" in message
    assert "tokenizer" not in message  # trained on the text: that it differs too says nothing more
    (tmp_path / "src0.txt").write_text(texts[0])
    assert "data.seq_len=32, not 16" in refusal(dataclasses.replace(cfg, seq_len=16))
    other_tokenizer = dataclasses.replace(cfg, tokenizer=TokenizerConfig(vocab_size=600))
    assert "the tokenizer differs (data.tokenizer" in refusal(other_tokenizer)
    assert "data.sources were a, b; this run's: a" in refusal(dataclasses.replace(cfg, sources=cfg.sources[:1]))


def test_the_trainer_checks_the_data_position_on_resume(tmp_path):
    from fp8train.config import compose
    from fp8train.trainer import Trainer
    from tests.helpers import SMALL

    run_dir = tmp_path / "run"
    base = [*SMALL, "precision=fp32", "trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.eval_every=0"]
    Trainer(compose([*base, "trainer.micro_batch_size=2", "trainer.stop_at=1"]), run_dir).fit()
    saved_config = (run_dir / "config.yaml").read_text()
    with pytest.raises(DataError, match=r"after 2 training sequences .* would start at sequence 1"):
        Trainer(compose([*base, "trainer.micro_batch_size=1", "resume=auto"]), run_dir)
    assert (run_dir / "config.yaml").read_text() == saved_config


def test_the_temp_folder_of_a_killed_build_is_removed_by_a_later_one(tmp_path):
    """A build killed by SIGKILL or SIGTERM leaves its temp folder (possibly gigabytes of partial ids); one that has
    not been written to for STALE_TMP_S is abandoned and goes, while a live builder's recent one stays."""
    import os

    from fp8train.data import tokens

    abandoned, live = tmp_path / ".tmp-tokens-a-x1", tmp_path / ".tmp-tokens-b-x2"
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "train.bin").write_bytes(b"\0" * 64)
    old = time.time() - tokens.STALE_TMP_S - 60
    for path in (abandoned / "train.bin", abandoned):
        os.utime(path, (old, old))
    os.utime(live, (old, old))  # a folder's mtime stays put while its file grows
    (tmp_path / "unrelated").mkdir()
    with publishing(tmp_path / "tokens-c") as tmp:
        (tmp / "meta.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-tokens-b-x2", "tokens-c", "unrelated"]


def test_resuming_a_zero_checkpoint_on_another_number_of_ranks_is_a_clear_error(tmp_path):
    """DeepSpeed raises its own ZeRORuntimeException for a changed data-parallel world size; it must reach the
    user as the one-paragraph CheckpointError that names the fix, not as a traceback."""
    from types import SimpleNamespace

    from deepspeed.runtime.zero.utils import ZeRORuntimeException

    from fp8train.errors import CheckpointError
    from fp8train.parallel import DEEPSPEED_DIR
    from fp8train.parallel.deepspeed import DeepSpeedEngine

    def load_checkpoint(*args, **kwargs):
        raise ZeRORuntimeException(
            "The checkpoint being loaded used a DP world size of 2 but the current world size is 1."
        )

    (tmp_path / DEEPSPEED_DIR).mkdir()
    engine = object.__new__(DeepSpeedEngine)
    engine.ds = SimpleNamespace(load_checkpoint=load_checkpoint)
    engine.stage, engine.world_size = 2, 1
    with pytest.raises(CheckpointError, match=r"DP world size of 2 but the current world size is 1.*number of ranks"):
        engine.load_state(tmp_path, torch.device("cpu"))


# --------------------------------------------------------------------------------------------------------------
# Validation


def test_val_loss_weights_every_sequence_equally_when_the_last_batch_is_short(tmp_path):
    """The val split of tinyshakespeare at seq_len 64 is 333 windows: 41 batches of 8 and one of 5. val_loss is
    the mean over its tokens, so the short batch counts 5/333, not 1/42. A loss that is the mean input id makes
    the weighting visible; the reference is the float64 mean over every row."""
    from fp8train.config import compose
    from fp8train.trainer import Trainer
    from tests.helpers import SMALL

    t = Trainer(compose([*SMALL, "precision=fp32", "trainer.eval_batches=50"]), tmp_path / "run")
    t.loss = lambda inputs, targets: inputs.float().mean()
    source = t.data.val_sources[0]
    rows = torch.cat([x for x, _, _ in t.data.val_batches(source, 50)])
    assert [len(x) for x, _, _ in t.data.val_batches(source, 50)][-2:] == [8, 5]
    reference = rows.double().mean().item()
    metrics = t.evaluate()
    assert metrics["val_loss"] == pytest.approx(reference, rel=1e-6)
    assert metrics[f"val_loss/{source}"] == pytest.approx(reference, rel=1e-6)


def test_each_rank_evaluates_its_share_and_one_sum_over_ranks_gives_the_whole_set(tmp_path):
    """Two ranks of micro 2 x accum 2 (the global batch of 8 of SMALL): the 333 windows make 167 micro-batches,
    83 on rank 0 and 84 on rank 1, so rank 0 runs one more, uncounted. Each rank hands its sums to the engine once
    per evaluation; with the other rank's sums added, both report the mean over the 333 windows."""
    from fp8train.config import compose
    from fp8train.trainer import Trainer
    from tests.helpers import SMALL

    t = Trainer(compose([*SMALL, "precision=fp32", "trainer.eval_batches=50"]), tmp_path / "run")
    source = t.data.val_sources[0]
    reference = torch.cat([x for x, _, _ in t.data.val_batches(source, 50)]).double().mean().item()
    forwards = []
    t.loss = lambda inputs, targets: forwards.append(len(inputs)) or inputs.float().mean()
    ranks = [
        build_data(t.cfg.data, seed=t.cfg.trainer.seed, micro_batch_size=2, grad_accum_steps=2, rank=r, world_size=2)
        for r in range(2)
    ]
    local = []
    for data in ranks:  # what each rank has before the sum
        t.data, forwards[:] = data, []
        t.engine.sum = lambda x: local.append(x.clone()) or x
        t.evaluate()
        assert len(forwards) == 84 and sum(forwards) in (167, 168)  # half the windows (+ one uncounted batch)
    assert len(local) == 2  # one sum per evaluation
    for data in ranks:
        t.data = data
        t.engine.sum = lambda x: local[0] + local[1]
        metrics = t.evaluate()
        assert metrics["val_loss"] == pytest.approx(reference, rel=1e-6)
        assert metrics[f"val_loss/{source}"] == pytest.approx(reference, rel=1e-6)


def test_check_on_a_large_corpus_with_an_old_cache_says_it_is_tokenized_when_training_starts(tmp_path, caplog):
    """fp8train check does not tokenize a large corpus: a cache written before meta.json held checksums is then
    left as it is, and neither the log nor the summary may say it was tokenized again or that there is none."""
    from fp8train.data.loader import check_data

    cfg = data_cfg(tmp_path, [TEXT])
    path = build(cfg).cache_path
    meta = json.loads((path / "meta.json").read_text())
    del meta["sha256"]  # as fp8train wrote it before the checksums
    (path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="fp8train"):
        summary, vocab = check_data(cfg, max_chars=10, seed=0, micro_batch_size=4, grad_accum_steps=1)
    assert vocab is None and "not tokenized" in summary
    assert "no usable token cache" in summary and "no token cache yet" not in summary
    warned = [r.getMessage() for r in caplog.records if "fails its check" in r.getMessage()]
    assert len(warned) == 1 and "tokenized again when training starts" in warned[0], caplog.text
    assert "sha256" not in json.loads((path / "meta.json").read_text())  # left alone: check writes nothing here


@pytest.mark.parametrize("held_s", [0.05, 0.6])
def test_a_long_wait_for_a_lock_is_a_warning_that_every_rank_shows(tmp_path, monkeypatch, caplog, held_s):
    """Ranks other than 0 show only warnings: on a machine whose ranks wait while one of them tokenizes into a local
    data.cache_dir, the INFO line naming the builder was hidden, and the rank looked hung. A short wait stays quiet."""
    import fcntl
    import threading

    from fp8train.data import tokens

    monkeypatch.setattr(tokens, "LONG_WAIT_S", 0.3)
    final = tmp_path / "tokens-abc"
    lock = tmp_path / ".tokens-abc.lock"
    lock.write_text("process 123 on node7\n")
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    threading.Timer(held_s, os.close, (held,)).start()  # the builder finishes (closing releases its lock)
    with caplog.at_level(logging.WARNING, logger="fp8train"), tokens.building(final):  # quiet_logging's level
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if held_s < tokens.LONG_WAIT_S:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith(f"still waiting for process 123 on node7, which builds {final} (lock file {lock})")


def test_rank_0_waiting_long_for_the_other_ranks_data_says_so(tmp_path, monkeypatch, caplog):
    """With a data.cache_dir on each machine, rank 0 waits in a collective while the other machines tokenize: after
    LONG_WAIT_S a warning says what it waits for, rather than a silence that looks like a hang."""
    from fp8train import trainer
    from fp8train.data import tokens

    monkeypatch.setattr(tokens, "LONG_WAIT_S", 0.2)
    monkeypatch.setattr(trainer.parallel, "all_gather_object", lambda ok: time.sleep(0.6) or [ok])
    cfg = data_cfg(tmp_path, ["one two three four five six seven eight nine ten " * 400])
    with caplog.at_level(logging.WARNING, logger="fp8train"):
        trainer.build_data_rank0_first(cfg, seed=0, micro_batch_size=2, grad_accum_steps=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if w.startswith("waiting for the other ranks to open the data")] == [
        "waiting for the other ranks to open the data, 0 s so far (with a data.cache_dir on each machine, the other "
        "machines tokenize the corpus into theirs); parallel.timeout_min bounds the wait"
    ], warnings


def test_a_rank_seeing_other_data_names_what_differs(tmp_path):
    """A rank whose token cache is not rank 0's says why: other source bytes (naming the source), or the same files
    tokenized otherwise, which a tokenizers release other than rank 0's explains (0.19 stores BPE merges otherwise
    than 0.20 and later, so its tokenizer hashes otherwise even when every id is the same)."""
    import tokenizers

    from fp8train.data.loader import open_shared, shareable

    cfg = data_cfg(tmp_path, [TEXT[:10_000], TEXT[10_000:20_000]], names=["a", "b"])
    shared = shareable(build(cfg))
    elsewhere = {
        "cache_key": "0" * 16,
        "cache_path": "/elsewhere/tokens-0000000000000000",
        "tokenizer_file": "/elsewhere/tokenizer-0000000000000000/tokenizer.json",
        "tokenizer_sha256": "0" * 64,
    }
    layout = dict(seed=0, micro_batch_size=4, grad_accum_steps=2, rank=1, world_size=2)

    def message(**rank0) -> str:
        with pytest.raises(DataError) as e:
            open_shared(cfg, {**shared, **elsewhere, **rank0}, **layout)
        assert str(e.value).startswith("data.sources: rank 1 sees other data than rank 0 ")
        return str(e.value)

    release = message(tokenizers="0.19.1")
    assert f"rank 1 runs tokenizers {tokenizers.__version__} and rank 0 tokenizers 0.19.1" in release
    assert "the same bytes" in release and "same tokenizers version on every machine" in release
    assert "name identical files" not in release
    parts = [list(p) for p in shared["source_sha256"]]
    parts[1][0] = "0" * 64
    files = message(source_sha256=parts)
    assert f"data.sources.1.path={tmp_path / 'src1.txt'} ('b')" in files and "src0" not in files
    assert "name identical files on every machine" in files and "tokenizers 0" not in files
    tokenizer = message()
    assert "the same bytes" in tokenizer and "data.tokenizer" in tokenizer and "tokenizers 0" not in tokenizer


def test_a_rank_seeing_another_conversion_of_a_tokenizer_folder_names_the_transformers_releases(tmp_path, trained):
    """A tokenizer folder without tokenizer.json is converted by transformers, whose releases may convert it
    otherwise: the same files then give another tokenizer, and a rank on another release says so."""
    import transformers

    from fp8train.data.loader import open_shared, shareable

    folder = tmp_path / "hf_vocab"
    folder.mkdir()
    trained.tokenizer.model.save(str(folder))  # vocab.json + merges.txt
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"})
    )
    cfg = data_cfg(tmp_path / "run", [TEXT], tokenizer_path=str(folder))
    shared = {**shareable(build(cfg)), "cache_key": "0" * 16, "tokenizer_sha256": "0" * 64, "transformers": "4.45.0"}
    with pytest.raises(DataError) as e:
        open_shared(cfg, shared, seed=0, micro_batch_size=4, grad_accum_steps=2, rank=1, world_size=2)
    message = str(e.value)
    assert f"rank 1 runs transformers {transformers.__version__} and rank 0 transformers 4.45.0" in message
    assert f"data.tokenizer.path={folder}" in message and "tokenizer.json" in message

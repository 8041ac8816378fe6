"""The tokenizer: a byte-level BPE trained on the training split (cached), or one the user already has.

Trained: GPT-2's recipe with Hugging Face ``tokenizers``: bytes are mapped to 256 printable symbols (so any UTF-8
text round-trips and nothing is ever unknown), GPT-2's regex splits words, BPE merges are learned up to
``data.tokenizer.vocab_size``, and ``<|endoftext|>`` separates documents. It is stored in
``cache_dir/tokenizer-<key>/tokenizer.json``, the key hashing the training text, the vocabulary size and
``BPE_FORMAT``; the next run with the same text reuses it (and trains it again, identical, if it is damaged).
Processes that need it at once train it once: the others wait on its lock file (``tokens.building``).

Given (``data.tokenizer.path``): a ``tokenizer.json``, a folder holding one, or a Hugging Face tokenizer folder
without one (loaded offline through ``transformers.AutoTokenizer``; its fast backend is what is used).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fp8train.config import TokenizerConfig, first_line, resolve_path
from fp8train.data.tokens import building, discard_damaged, publishing, text_pieces, unreadable
from fp8train.errors import DataError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of other tokenizer families, tried after EOS_TOKEN and the tokenizer's declared EOS.
# (Chat end-of-turn tokens such as <|eot_id|> or <|im_end|> are deliberately not here.)
EOS_FALLBACKS = ("</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]")
BPE_FORMAT = "bytelevel-bpe-v1"  # bump when train_bpe changes, so cached tokenizers are retrained


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    file: Path  # a tokenizer.json equal to ``tokenizer``
    eos_id: int


def build_tokenizer(
    cfg: TokenizerConfig, train_texts: Sequence[str], train_sha256: str, cache_dir: Path, may_train: bool = True
) -> LoadedTokenizer | None:
    """Load ``cfg.path``, or train a BPE on ``train_texts`` (whose bytes hash to ``train_sha256``), cached; None if
    it would have to be trained and ``may_train`` is false."""
    if cfg.path is not None:
        return load_tokenizer(cfg.path, cache_dir)
    key = hashlib.sha256(f"{BPE_FORMAT}|vocab_size={cfg.vocab_size}|{train_sha256}".encode()).hexdigest()[:16]
    final = cache_dir / f"tokenizer-{key}"
    tokenizer, damage = _cached(final)
    if tokenizer is not None:
        log.info("tokenizer cache hit: %s", final / "tokenizer.json")
    else:
        # Like a damaged token cache, a damaged tokenizer cache (a torn write, a partial copy, a clean-up that
        # deleted files) is trained again: BPE training is deterministic, so it comes back byte for byte, and the
        # token caches keyed by it stay valid.
        if damage is not None:
            later = "" if may_train else " when training starts"
            log.warning("the tokenizer cache %s %s: it is trained again%s", final, damage, later)
        if not may_train:
            return None
        with building(final):
            tokenizer, damage = _cached(final)  # another process may have trained it while this one waited
            if tokenizer is None:
                if damage is not None:
                    discard_damaged(final, damage, "tokenizer cache")
                tokenizer = _train_into(final, cfg.vocab_size, train_texts)
    return LoadedTokenizer(
        tokenizer, final / "tokenizer.json", find_eos_id(tokenizer, None, "data.tokenizer.path=null")
    )


def _cached(final: Path) -> tuple[Tokenizer | None, str | None]:
    """The tokenizer cached in the folder ``final``, or None and what is wrong with the folder (None: no folder).
    A file this process may not read is no damage (as for the token cache): a DataError."""
    if not final.is_dir():
        return None, None
    file = final / "tokenizer.json"
    if not file.is_file():
        return None, "has no tokenizer.json"
    try:
        return _untruncated(Tokenizer.from_str(file.read_bytes().decode())), None
    except PermissionError as e:
        raise unreadable(final, e, "tokenizer cache") from None
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON (see read_tokenizer_file)
        return None, f"has a tokenizer.json that Hugging Face tokenizers cannot read ({first_line(e)})"


def _train_into(final: Path, vocab_size: int, train_texts: Sequence[str]) -> Tokenizer:
    """Train the BPE and publish it as ``final/tokenizer.json``."""
    n_chars = sum(map(len, train_texts))
    log.info("training a byte-level BPE tokenizer (vocab %d) on %s characters", vocab_size, f"{n_chars:,}")
    t0 = time.perf_counter()
    tokenizer = train_bpe(train_texts, vocab_size)
    with publishing(final) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
    log.info("tokenizer trained in %.1f s: %s", time.perf_counter() - t0, final / "tokenizer.json")
    if tokenizer.get_vocab_size() < vocab_size:
        log.warning(
            "the training text only supports %d of data.tokenizer.vocab_size=%d tokens (too few distinct "
            "words to merge); the model's vocabulary follows the tokenizer",
            tokenizer.get_vocab_size(),
            vocab_size,
        )
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as id 0, trained on ``texts``."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be invented at the start of every encoded string.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator((piece for text in texts for piece in text_pieces(text)), trainer)
    return tokenizer


def load_tokenizer(path: str, cache_dir: Path) -> LoadedTokenizer:
    """A tokenizer.json, a folder with one, or a Hugging Face tokenizer folder, all read offline."""
    key = f"data.tokenizer.path={path}"
    resolved = resolve_path(path)
    if not resolved.exists():
        raise DataError(
            f"{key}: no such file or folder ({resolved}); fix the path, or set {key.split('=')[0]}=null "
            "to train a tokenizer on the data."
        )
    if resolved.is_file():
        tokenizer = read_tokenizer_file(resolved, key)
        eos_hint = declared_eos(resolved.parent)
        file = resolved
    elif (resolved / "tokenizer.json").is_file():
        tokenizer = read_tokenizer_file(resolved / "tokenizer.json", key)
        eos_hint = declared_eos(resolved)
        file = resolved / "tokenizer.json"
    else:
        tokenizer, eos_hint = _load_hf_folder(resolved, key)
        # The trainer copies tokenizer_file into the run; give it one, keyed by the tokenizer's content.
        digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
        final = cache_dir / f"tokenizer-{digest}"
        file = final / "tokenizer.json"
        if _cached(final)[0] is None:
            with building(final):
                written, damage = _cached(final)  # another process may have written it while this one waited
                if written is None:
                    if damage is not None:  # as in build_tokenizer
                        discard_damaged(final, damage, "tokenizer cache")
                    with publishing(final) as tmp:
                        tokenizer.save(str(tmp / "tokenizer.json"))
    log.info("tokenizer loaded from %s (vocab %d)", resolved, tokenizer.get_vocab_size())
    return LoadedTokenizer(tokenizer, file, find_eos_id(tokenizer, eos_hint, key))


def find_eos_id(tokenizer: Tokenizer, declared: str | None, key: str) -> int:
    """The id of the end-of-document token: <|endoftext|>, else the declared EOS, else a common EOS name."""
    candidates = [EOS_TOKEN, *([declared] if declared else []), *EOS_FALLBACKS]
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(
        f"{key}: the tokenizer has no end-of-text token (looked for {', '.join(dict.fromkeys(candidates))}); "
        "documents need one between them. Add one to the tokenizer (tokenizer.add_special_tokens(['<|endoftext|>']) "
        "and save it), or set data.tokenizer.path=null to train a tokenizer on the data."
    )


def _untruncated(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with the truncation and padding a tokenizer.json may carry switched off: the corpus is encoded
    in pieces of PIECE_CHARS characters, and each must give all its ids, not max_length of them or pad ids."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def read_tokenizer_file(file: Path, key: str, fix: str | None = None) -> Tokenizer:
    """A tokenizer.json, untruncated; DataError naming ``key`` and ``fix`` if tokenizers cannot read it."""
    fix = fix or "Point data.tokenizer.path at a tokenizer.json or a tokenizer folder, or set it to null to train one."
    try:
        return _untruncated(Tokenizer.from_file(str(file)))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON or unknown components
        try:
            with open(file, "rb") as f:
                bom = f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
        except OSError:  # unreadable: tokenizers' own message says so
            bom = False
        if bom:  # what an editor saving "UTF-8 with BOM" writes: tokenizers and transformers reject it alike
            raise DataError(
                f"{key}: {file} starts with a UTF-8 byte-order mark, which Hugging Face tokenizers cannot read "
                f"({first_line(e)}). Save it without one (for example `sed -i '1s/^\\xEF\\xBB\\xBF//' {file}`)."
            ) from None
        raise DataError(
            f"{key}: {file} is not a tokenizer.json that Hugging Face tokenizers can read ({first_line(e)}). {fix}"
        ) from None


def _load_hf_folder(folder: Path, key: str) -> tuple[Tokenizer, str | None]:
    """A Hugging Face tokenizer folder without tokenizer.json (vocab.json + merges.txt, tokenizer.model, ...)."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError, ... with a readable message
        raise DataError(
            f"{key}: {folder} has no tokenizer.json and transformers cannot load it as a tokenizer folder "
            f"({first_line(e)}). Point data.tokenizer.path at a tokenizer.json or a complete Hugging Face "
            "tokenizer folder (save_pretrained writes one), or set it to null to train one."
        ) from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise DataError(
            f"{key}: the tokenizer in {folder} ({type(hf).__name__}) has no Hugging Face tokenizers backend. "
            "Convert it once with transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder) "
            "writes a tokenizer.json) and point data.tokenizer.path at the result."
        )
    return _untruncated(backend), getattr(hf, "eos_token", None)


def eos_declaration(eos_token: str) -> str:
    """A tokenizer_config.json naming the EOS, to write beside a tokenizer.json: how Hugging Face folders declare
    an EOS that fp8train would not guess (see find_eos_id), and what ``declared_eos`` reads back."""
    return json.dumps({"eos_token": eos_token}) + "\n"


def declared_eos(folder: Path) -> str | None:
    """The eos_token of a tokenizer_config.json beside a tokenizer.json, if any."""
    try:
        eos = json.loads((folder / "tokenizer_config.json").read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # older files store an AddedToken as {"content": ..., ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None

"""Batches from the token cache, a pure function of (seed, step, micro_step, rank).

Training windows are ``seq_len + 1`` tokens at stride ``seq_len`` over train.bin (inputs are the first seq_len,
targets the last seq_len). Every sample of a run has a global index

    g = ((step * grad_accum_steps + micro_step) * world_size + rank) * micro_batch_size + j

and takes window ``perm_epoch[g % n_windows]`` of epoch ``g // n_windows``, where ``perm_epoch`` is
``numpy.random.default_rng([seed, epoch]).permutation(n_windows)``. So a resumed run needs only the step to get
the same data, and within an epoch no window repeats across steps, micro steps or ranks. Step k takes samples
[k * G, (k + 1) * G), G = micro_batch_size * grad_accum_steps * world_size: a run may resume with another split of
the same G over micro batches, accumulation steps and ranks, but not with another G or seed (``check_resume``).

Validation takes the first ``eval_batches x G`` windows of each val split (all of it when shorter), in order, at
stride ``seq_len``: a set that such a resume keeps, which the ranks share out (``val_batches``).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer

from fp8train.config import DataConfig, resolve_path
from fp8train.data.tokenizer import build_tokenizer, read_tokenizer_file
from fp8train.data.tokens import (
    SourceText,
    TokenCache,
    build_token_cache,
    building,
    cache_damage,
    file_identities,
    id_space,
    open_token_cache,
    read_sources,
)
from fp8train.errors import DataError

log = logging.getLogger(__name__)


# `fp8train check` trains the tokenizer and tokenizes a corpus up to this size as the run would, and the run then
# finds both; a larger one only if that is done already.
CHECK_TOKENIZE_CHARS = 16 << 20
SHORT_LISTED = 10  # sources a too-short-split message names; the rest it counts


def build_data(
    cfg: DataConfig, *, seed: int, micro_batch_size: int, grad_accum_steps: int, rank: int = 0, world_size: int = 1
) -> TokenData:
    """Read and split the sources, get the tokenizer and the token cache (building what is missing), check sizes."""
    data = _build(
        cfg,
        None,
        seed=seed,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        rank=rank,
        world_size=world_size,
    )
    assert isinstance(data, TokenData)
    return data


def check_data(cfg: DataConfig, *, max_chars: int | None = None, **layout) -> tuple[str, int | None]:
    """For ``fp8train check``: what ``build_data`` does, with its errors (a missing, empty, binary or non-UTF-8
    source, a corpus too short for data.seq_len, a damaged tokenizer), except that a corpus of more than
    ``max_chars`` characters is only read and checked, not tokenized, unless it is already. Returns a one-line
    summary and the vocabulary the model needs (None when not tokenized)."""
    max_chars = CHECK_TOKENIZE_CHARS if max_chars is None else max_chars
    data = _build(cfg, max_chars, **layout)
    if isinstance(data, int):
        return (
            f"data: {len(cfg.sources)} source(s) read and checked, {data:,} characters; not tokenized (over "
            f"{max_chars:,} characters and no usable token cache yet), so their token counts are checked when "
            "training starts",
            None,
        )
    return (
        f"data: {data.n_train_tokens:,} train tokens ({data.n_train_windows:,} windows of {data.seq_len}), val "
        f"{', '.join(f'{name} {n:,}' for name, n in data.n_val_tokens.items())}; token cache {data.cache_path}",
        data.vocab_size,
    )


def _build(
    cfg: DataConfig,
    max_new_chars: int | None,
    *,
    seed: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    rank: int = 0,
    world_size: int = 1,
) -> TokenData | int:
    """build_data; with ``max_new_chars``, the number of characters instead when there are more and the tokenizer
    or the token cache would have to be built."""
    if not (0 <= rank < world_size and micro_batch_size > 0 and grad_accum_steps > 0 and seed >= 0):
        raise ValueError(f"bad batch layout: {seed=} {micro_batch_size=} {grad_accum_steps=} {rank=} {world_size=}")
    t0 = time.perf_counter()
    cache_dir = resolve_path(cfg.cache_dir)
    sources = read_sources(cfg)
    n_chars = sum(len(s.train) + len(s.val) for s in sources)
    may_build = max_new_chars is None or n_chars <= max_new_chars
    train_sha256 = hashlib.sha256("".join(s.train_sha256 for s in sources).encode()).hexdigest()
    tok = build_tokenizer(cfg.tokenizer, [s.train for s in sources], train_sha256, cache_dir, may_build)
    if tok is None:
        return n_chars
    cache = build_token_cache(sources, tok.tokenizer, tok.eos_id, tokenizer_sha256(tok.tokenizer), cache_dir, may_build)
    if cache is None:
        return n_chars
    _check_lengths(cfg, sources, cache)
    layout = dict(seed=seed, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps)
    data = _token_data(
        cfg,
        tok.tokenizer,
        tok.file,
        tok.eos_id,
        cache,
        [s.name for s in sources],
        **layout,
        rank=rank,
        world_size=world_size,
    )
    global_batch = micro_batch_size * grad_accum_steps * world_size
    if data.n_train_windows < global_batch:  # runs, but a loss curve would not show it
        log.warning(
            "the training split holds %d windows of data.seq_len=%d, fewer than one global batch of %d sequences "
            "(micro_batch_size x grad_accum_steps x ranks): every step trains on some of them twice or more. Add "
            "text to data.sources, or lower data.seq_len or the batch",
            data.n_train_windows,
            cfg.seq_len,
            global_batch,
        )
    if data.vocab_size > tok.tokenizer.get_vocab_size():
        log.info(
            "the tokenizer's %d tokens have ids up to %d: the model's vocabulary covers them all",
            tok.tokenizer.get_vocab_size(),
            data.vocab_size - 1,
        )
    log.info(
        "data ready in %.1f s: %s train tokens (%s windows of %d), val %s, vocab %d, fingerprint %s",
        time.perf_counter() - t0,
        f"{data.n_train_tokens:,}",
        f"{data.n_train_windows:,}",
        cfg.seq_len,
        ", ".join(f"{name} {n:,}" for name, n in data.n_val_tokens.items()),
        data.vocab_size,
        data.fingerprint,
    )
    return data


def shareable(data: TokenData) -> dict:
    """What another rank needs to open the data ``build_data`` made here without reading the sources again (see
    open_shared): where the tokenizer and the token cache are, and what identifies their files."""
    return {
        "cache_path": str(data.cache_path),
        "cache_key": data.cache_key,
        "cache_files": file_identities(data.cache_path),
        "tokenizer_file": str(data.tokenizer_file),
        "tokenizer_sha256": data.tokenizer_sha256,
        "eos_id": data.eos_id,
        "val_sources": data.val_sources,
        "source_sha256": data.source_sha256,  # and what tells another rank why its cache differs (_other_data)
        "tokenizers": tokenizers.__version__,
        "transformers": _transformers_version(),
    }


def _transformers_version() -> str | None:
    """The transformers release, if this process imported it (to convert a tokenizer folder without tokenizer.json);
    importing it only to ask would take seconds."""
    return getattr(sys.modules.get("transformers"), "__version__", None)


def open_shared(
    cfg: DataConfig,
    shared: dict,
    *,
    seed: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    rank: int,
    world_size: int,
) -> TokenData:
    """The data rank 0 built (``shared``: its ``shareable``), opened from its files without reading the corpus.

    Safe because the cache's name is a hash of the source bytes and the tokenizer: this rank takes it only when it
    sees the same tokenizer (sha256) and the files rank 0 checked (size, mtime, inode), or else files that pass
    the cache's sha256 check. A rank that sees neither (a cache folder local to each machine) looks for them under
    the same names in its own data.cache_dir, where one rank of the machine builds them while the others wait
    (tokens.building) instead of each reading and tokenizing the corpus; it refuses to train on other data than
    rank 0's.
    """
    layout = dict(seed=seed, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps)
    layout.update(rank=rank, world_size=world_size)
    path, tokenizer_file = Path(shared["cache_path"]), Path(shared["tokenizer_file"])
    data = _open_built(cfg, shared, path, tokenizer_file, **layout)
    if data is not None:
        return data
    cache_dir = resolve_path(cfg.cache_dir)
    if tokenizer_file.parent.parent == path.parent:  # trained (or converted) into rank 0's cache folder
        tokenizer_file = cache_dir / tokenizer_file.parent.name / tokenizer_file.name
    with building(cache_dir / path.name):
        data = _open_built(cfg, shared, cache_dir / path.name, tokenizer_file, **layout) or build_data(cfg, **layout)
    if data.cache_key != shared["cache_key"]:
        raise DataError(
            f"data.sources: rank {rank} sees other data than rank 0 (its token cache is {data.cache_path}, rank 0's "
            f"{shared['cache_path']}): {_other_data(cfg, data, shared)}"
        )
    return data


def _other_data(cfg: DataConfig, data: TokenData, shared: dict) -> str:
    """Why this rank's token cache is not rank 0's (``shared``), and what to change: the source files that differ;
    else the tokenizer, which another tokenizers release explains (0.19 and 0.20 store BPE merges otherwise, so the
    same tokenizer hashes otherwise), or another transformers release for a folder it converts."""
    ours, theirs = data.source_sha256, shared.get("source_sha256")
    if theirs is None or len(theirs) != len(ours):
        differ = "the source files or the tokenizer differ between machines"
    elif other := [i for i, (a, b) in enumerate(zip(ours, theirs)) if list(a) != list(b)]:
        named = ", ".join(f"data.sources.{i}.path={cfg.sources[i].path} ('{data.val_sources[i]}')" for i in other)
        return (
            f"the bytes of {named} differ from rank 0's. Make data.sources name identical files on every machine, or "
            "set data.cache_dir to a folder they all share."
        )
    elif (version := shared.get("tokenizers")) and version != tokenizers.__version__:
        return (
            f"the source files hold the same bytes, but the tokenizer differs: rank {data.rank} runs tokenizers "
            f"{tokenizers.__version__} and rank 0 tokenizers {version}, which may store or train it otherwise. "
            "Install the same tokenizers version on every machine."
        )
    elif (version := shared.get("transformers")) and version != _transformers_version() and _converted(cfg):
        return (
            f"the source files hold the same bytes, but the tokenizer differs: rank {data.rank} runs transformers "
            f"{_transformers_version()} and rank 0 transformers {version}, which may convert data.tokenizer.path="
            f"{cfg.tokenizer.path} (a folder without tokenizer.json) otherwise. Install the same transformers "
            "version on every machine, or point data.tokenizer.path at the tokenizer.json rank 0 wrote "
            f"({shared['tokenizer_file']}), copied to every machine."
        )
    else:
        differ = "the source files hold the same bytes, but the tokenizer differs between machines"
    return (
        f"{differ}. Make data.sources and data.tokenizer.path name identical files on every machine, or set "
        "data.cache_dir to a folder they all share."
    )


def _open_built(cfg: DataConfig, shared: dict, path: Path, tokenizer_file: Path, **layout) -> TokenData | None:
    """The token cache ``path`` and the tokenizer ``tokenizer_file`` if they are rank 0's (``shared``): the same
    tokenizer, and the very files rank 0 checked or files that pass the cache's check; else None."""
    if not (path.is_dir() and tokenizer_file.is_file()):
        return None
    try:
        tokenizer = read_tokenizer_file(tokenizer_file, "data.tokenizer.path")
    except DataError:
        return None
    if tokenizer_sha256(tokenizer) != shared["tokenizer_sha256"]:
        return None
    if file_identities(path) != shared["cache_files"] and cache_damage(path) is not None:
        return None
    cache = open_token_cache(path, shared["cache_key"])
    return _token_data(cfg, tokenizer, tokenizer_file, shared["eos_id"], cache, shared["val_sources"], **layout)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _token_data(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    tokenizer_file: Path,
    eos_id: int,
    cache: TokenCache,
    val_sources: list[str],
    **layout,
) -> TokenData:
    return TokenData(
        tokenizer=tokenizer,
        tokenizer_file=tokenizer_file,
        eos_id=eos_id,
        cache=cache,
        val_sources=val_sources,
        fingerprint=hashlib.sha256(f"{cache.key}|seq_len={cfg.seq_len}".encode()).hexdigest()[:16],
        seq_len=cfg.seq_len,
        **layout,
    )


def _converted(cfg: DataConfig) -> bool:
    """Whether data.tokenizer.path is a folder that transformers converts, having no tokenizer.json."""
    folder = None if cfg.tokenizer.path is None else resolve_path(cfg.tokenizer.path)
    return folder is not None and folder.is_dir() and not (folder / "tokenizer.json").is_file()


class TokenData:
    """The tokenizer plus deterministic training and validation batches (CPU int64 tensors)."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        tokenizer_file: Path,
        eos_id: int,
        cache: TokenCache,
        val_sources: list[str],
        fingerprint: str,
        seq_len: int,
        seed: int,
        micro_batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
    ):
        self.tokenizer = tokenizer
        self.tokenizer_file = tokenizer_file
        self.vocab_size = id_space(tokenizer)  # largest id + 1: more than the token count if the ids have gaps
        self.eos_id = eos_id
        self.fingerprint = fingerprint  # identifies source bytes, split, tokenizer and seq_len
        self.val_sources = list(val_sources)
        self.seq_len = seq_len
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.cache_path = cache.path
        self.cache_key = cache.key  # a hash of the source bytes, the split and the tokenizer
        # Each source's file and the sha256 of its train and val bytes; an older cache may lack the val one
        self.source_paths = [s["path"] for s in cache.meta["sources"]]
        self.source_sha256 = [[s.get("train_sha256"), s.get("val_sha256")] for s in cache.meta["sources"]]
        self.tokenizer_sha256 = tokenizer_sha256(tokenizer)
        self._train = cache.train
        self._val = dict(zip(self.val_sources, cache.val))
        self.n_train_tokens = len(self._train)
        self.n_val_tokens = {name: len(v) for name, v in self._val.items()}
        self.n_train_windows = (self.n_train_tokens - 1) // seq_len
        self._offsets = np.arange(seq_len + 1)
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation; the current and the next epoch

    def train_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch_size, seq_len) int64, for this rank at (step, micro_step)."""
        if not 0 <= micro_step < self.grad_accum_steps or step < 0:
            raise ValueError(f"{step=} {micro_step=} outside the run (grad_accum_steps={self.grad_accum_steps})")
        B = self.micro_batch_size
        first = ((step * self.grad_accum_steps + micro_step) * self.world_size + self.rank) * B
        epoch_B, i_B = np.divmod(np.arange(first, first + B, dtype=np.int64), self.n_train_windows)
        windows = np.empty_like(i_B)
        for epoch in np.unique(epoch_B):  # one or two epochs, unless the batch is larger than the split
            here = epoch_B == epoch
            windows[here] = self._perm(int(epoch))[i_B[here]]
        return self._gather(self._train, windows)

    def val_batches(self, source: str, eval_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        """This rank's share of the validation set of ``source``, in micro-batches: (inputs, targets, counted).

        The validation set is the first ``eval_batches`` global batches' worth of consecutive, non-overlapping
        windows of the split: eval_batches x G windows, G = micro_batch_size x grad_accum_steps x world_size (the
        global batch in sequences, which every resume keeps), or the whole split when it holds fewer. So the set
        is the same for every split of G, and with one process and no accumulation it is eval_batches batches of
        micro_batch_size. It is cut into micro-batches of micro_batch_size from its start (the last one is short
        when the set runs out) and these are dealt to the ranks in contiguous blocks: each rank runs 1/N of them
        (up to one), and they are the micro-batches of one process with the same micro_batch_size, so a
        batch-dependent FP8 scale (current scaling, per-channel Smooth-SwiGLU) quantizes them alike on any number
        of ranks. (With another micro_batch_size such a scale sees other batches: the same windows, other rounding.)

        Every rank yields as many batches: a rank whose block is a batch shorter (their number does not divide
        by the ranks) ends with a repeat of the set's first batch, ``counted`` False, whose loss must be left out.
        Its forward is there because a ZeRO-3 forward gathers the weights from every rank. Every call yields
        the same batches.
        """
        if source not in self._val:
            raise KeyError(f"no validation source '{source}'; the sources are {self.val_sources}")
        tokens, B = self._val[source], self.micro_batch_size
        global_batch = B * self.grad_accum_steps * self.world_size
        n_windows = min((len(tokens) - 1) // self.seq_len, eval_batches * global_batch)
        n_batches = -(-n_windows // B)
        first, end = (n_batches * r // self.world_size for r in (self.rank, self.rank + 1))
        for i in range(first, end):
            yield *self._gather(tokens, np.arange(i * B, min((i + 1) * B, n_windows))), True
        for _ in range(-(-n_batches // self.world_size) - (end - first)):
            yield *self._gather(tokens, np.arange(min(B, n_windows))), False

    def position(self, step: int) -> dict:
        """Where the data stream stands before ``step``: global samples consumed, the epoch they reach, the seed
        and batch layout that put it there, and what the data was (its fingerprint and what that is made of)."""
        samples_seen = step * self.grad_accum_steps * self.world_size * self.micro_batch_size
        return {
            "step": step,
            "epoch": samples_seen // self.n_train_windows,
            "samples_seen": samples_seen,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "world_size": self.world_size,
            # What the fingerprint is made of, so that a resume on other data can say what changed
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "sources": [[name, *digests] for name, digests in zip(self.val_sources, self.source_sha256)],
            "tokenizer_sha256": self.tokenizer_sha256,
            "tokenizers": tokenizers.__version__,
        }

    def check_resume(self, saved: dict, where: str | Path) -> None:
        """Refuse to continue a saved ``position`` on other data than the unbroken run's, naming what changed.

        Step k trains on global samples [k * G, (k + 1) * G) with G = micro_batch_size * grad_accum_steps *
        world_size, so another layout with the same G continues exactly (each step sees the same sequences, split
        otherwise over micro steps and ranks), while another G or another seed would repeat or skip sequences.
        """
        step, samples_seen = saved["step"], saved["samples_seen"]
        problems = [] if saved.get("fingerprint", self.fingerprint) == self.fingerprint else [self._data_change(saved)]
        if self.position(step)["samples_seen"] != samples_seen:
            was = (
                f" (trainer.micro_batch_size={saved['micro_batch_size']} x trainer.grad_accum_steps="
                f"{saved['grad_accum_steps']} x {saved['world_size']} data-parallel rank(s))"
                if "micro_batch_size" in saved
                else ""
            )
            problems.append(
                f"it stopped at step {step} after {samples_seen} training sequences{was}, and with this run's "
                f"trainer.micro_batch_size={self.micro_batch_size} x trainer.grad_accum_steps={self.grad_accum_steps}"
                f" x {self.world_size} data-parallel rank(s) its next step, step {step + 1}, would start at sequence "
                f"{self.position(step)['samples_seen']}, repeating or skipping data. Keep the global batch at "
                f"{samples_seen // step if step else samples_seen} sequences per step (micro_batch_size x "
                f"grad_accum_steps x ranks)"
            )
        if saved.get("seed", self.seed) != self.seed:
            problems.append(
                f"it was trained with trainer.seed={saved['seed']}, which orders its batches; trainer.seed="
                f"{self.seed} would shuffle the rest of the epoch otherwise. Resume with trainer.seed={saved['seed']}"
            )
        if problems:
            raise DataError(
                f"resume: {where} cannot continue on the data of an unbroken run: {'; '.join(problems)}. Or start a "
                f"new run directory from its weights with model.init_from={where}."
            )

    def _data_change(self, saved: dict) -> str:
        """What differs between the data of a saved ``position`` and this run's: sources, their text, seq_len or the
        tokenizer (one sentence, ending in what to do)."""
        was = {name: train_val for name, *train_val in saved["sources"]}
        changes = []
        if list(was) != self.val_sources:
            changes.append(f"its data.sources were {', '.join(was)}; this run's: {', '.join(self.val_sources)}")
        for i, (name, digests) in enumerate(zip(self.val_sources, self.source_sha256)):
            if was.get(name, digests) != digests:
                part = "its training part" if was[name][0] != digests[0] else "its held-out part"
                changes.append(
                    f"data.sources.{i}.path={self.source_paths[i]} ('{name}') holds other text than it was trained on "
                    f"({part})"
                )
        # A tokenizer trained on the data follows its training text: another one says nothing more then.
        retrained = list(was) != self.val_sources or any("training part" in c for c in changes)
        if saved["tokenizer_sha256"] != self.tokenizer_sha256 and not retrained:
            release = saved["tokenizers"]
            other = f"; it ran tokenizers {release}, this run {tokenizers.__version__}"
            changes.append(
                "the tokenizer differs (data.tokenizer.*, or the files it names or is trained on)"
                + (other if release != tokenizers.__version__ else "")
            )
        if saved["seq_len"] != self.seq_len:
            changes.append(f"it was trained with data.seq_len={saved['seq_len']}, not {self.seq_len}")
        return (
            f"{'; '.join(changes or ['its data differs from this run'])}. Resume on the files and data settings it was "
            "trained on"
        )

    def _perm(self, epoch: int) -> np.ndarray:
        """The order of the training windows in ``epoch``: global sample g is window ``_perm(g // n)[g % n]``."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_train_windows)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}  # a batch may straddle epochs
            self._perms[epoch] = perm
        return perm

    def _gather(self, tokens: np.ndarray, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(tokens[windows[:, None] * self.seq_len + self._offsets].astype(np.int64))  # (B, T+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __repr__(self) -> str:
        return (
            f"TokenData(vocab_size={self.vocab_size}, n_train_tokens={self.n_train_tokens}, "
            f"seq_len={self.seq_len}, val_sources={self.val_sources}, fingerprint={self.fingerprint!r})"
        )


def _check_lengths(cfg: DataConfig, sources: list[SourceText], cache: TokenCache) -> None:
    """Each split must hold at least one window of seq_len + 1 tokens."""
    window = cfg.seq_len + 1
    if len(cache.train) < window:
        raise DataError(
            f"data.seq_len={cfg.seq_len}: the training split holds only {len(cache.train)} tokens, fewer than one "
            f"window of data.seq_len + 1 = {window}. Lower data.seq_len, lower data.val_fraction={cfg.val_fraction}, "
            "or add text to data.sources."
        )
    short = [(s, len(val)) for s, val in zip(sources, cache.val) if len(val) < window]
    if len(short) == 1:
        s, n = short[0]
        raise DataError(
            f"data.seq_len={cfg.seq_len}: the validation split of source '{s.name}' ({s.path}) holds only "
            f"{n} tokens (the last data.val_fraction={cfg.val_fraction} of its text), fewer than one "
            f"window of data.seq_len + 1 = {window}. Lower data.seq_len, raise data.val_fraction, or point "
            f"data.sources.{s.index}.path at a longer file."
        )
    if short:  # all at once, as read_sources names every unusable file: each attempt would tokenize again
        listed = ", ".join(f"data.sources.{s.index}.path={s.path} ('{s.name}'): {n}" for s, n in short[:SHORT_LISTED])
        more = f", and {len(short) - SHORT_LISTED} more" if len(short) > SHORT_LISTED else ""
        raise DataError(
            f"data.seq_len={cfg.seq_len}: the validation splits of {len(short)} of the {len(sources)} sources hold "
            f"fewer than one window of data.seq_len + 1 = {window} tokens (the last data.val_fraction="
            f"{cfg.val_fraction} of their text; tokens: {listed}{more}). Lower data.seq_len, raise "
            "data.val_fraction, or point these sources at longer files (or join short files into one)."
        )

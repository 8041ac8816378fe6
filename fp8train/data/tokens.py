"""Text sources -> train/val split -> token ids on disk.

Each source file is read whole, checked (exists, non-empty, not binary, strict UTF-8; a byte-order mark at its
start is no text and is dropped, as Python's utf-8-sig does) and split by characters: its last ``val_fraction``
becomes the validation part, cut at a line start when one is near. The token cache is a directory
``cache_dir/tokens-<key>/`` holding flat arrays of ids (uint16 when every id is below 65535, else uint32):

    train.bin    every source's train part in config order, each followed by one EOS
    val_<i>.bin  source i's val part, followed by one EOS
    meta.json    token counts, dtype, the sha256 of each .bin file, and what the key was made of

The key hashes the exact train and val bytes of every source and the tokenizer, so a changed file, split or
tokenizer gets a new directory and an unchanged one is reused. A reused directory is checked against meta.json
first (sizes and sha256, about 0.6 s per GiB of ids on 2 CPU cores), so bytes overwritten in place or a partial
copy padded to the right size are tokenized again, with a warning, rather than trained on. The directory is
written under a temporary name and renamed into place, so readers never see a half-written cache; the temporary
folder of a killed build is removed by a later build once it is STALE_TMP_S old. Processes that need the same
missing cache at once (the ranks of a machine with its own cache_dir) take turns on a lock file beside it,
``.<name>.lock`` (``building``): one builds, the others wait and then find it. Lock files stay, a few bytes each.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from fp8train import locks
from fp8train.config import DataConfig, SourceConfig, first_line, resolve_path, source_name
from fp8train.errors import DataError

log = logging.getLogger(__name__)

# Bump when the layout or the encoding procedure changes: old caches are then ignored. It is part of the data
# fingerprint that checkpoints store, so a bump also stops every saved run from resuming: changes that leave the
# ids alone (such as the checksums in meta.json) do not bump it.
TOKENS_FORMAT = 1
PIECE_CHARS = 1 << 16  # characters per encode call; bounds the memory of tokenizers' Encoding objects
BATCH_PIECES = 16  # pieces per encode_batch call (tokenizers spreads a batch over its thread pool)
PROGRESS_CHARS = 16 << 20  # log progress every this many characters, on inputs larger than this
HASH_CHUNK = 16 << 20  # bytes read at a time when checking a cache file's sha256
# A wait for another process's build this long is logged as a warning, which ranks other than 0 show too (they
# hide INFO lines): a rank waiting for a machine's builder would look hung. Shorter waits keep the console quiet.
LONG_WAIT_S = 30
STALE_TMP_S = 3600  # a temp folder not written to for this long belongs to a killed build (a live one writes often)


@dataclass
class SourceText:
    """One source file, checked and split."""

    index: int
    name: str
    path: Path
    key: str  # how the user sets it: "data.sources.0.path=data/x.txt"
    train: str
    val: str
    train_sha256: str  # of the train part's UTF-8 bytes
    val_sha256: str


@dataclass
class TokenCache:
    """A token cache directory, memory-mapped read-only."""

    path: Path
    key: str
    train: np.memmap  # (n_train_tokens,)
    val: list[TokenFile]  # one per source, in config order
    meta: dict


class TokenFile:
    """The ids of a cache file, memory-mapped only while indexed. numpy's memmap keeps a file descriptor open, so
    mapping the validation split of each of thousands of sources at once would pass the open-file limit (often
    1024); evaluation reads a few windows of each, a few times per run."""

    def __init__(self, path: Path, dtype: np.dtype, n_tokens: int):
        self.path, self.dtype, self.n_tokens = path, dtype, n_tokens

    def __len__(self) -> int:
        return self.n_tokens

    def __getitem__(self, index) -> np.ndarray:
        return np.array(np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))[index])


# --------------------------------------------------------------------------------------------------------------
# Reading and splitting


def read_sources(cfg: DataConfig) -> list[SourceText]:
    """Read, check and split every source in config order; one DataError names every unusable source."""
    sources, problems = [], []
    for i, source in enumerate(cfg.sources):
        try:
            sources.append(_read_source(i, source, cfg.val_fraction))
        except DataError as e:
            problems.append(str(e))
    if len(problems) > 1:
        raise DataError(f"{len(problems)} of the {len(cfg.sources)} data.sources cannot be used: {' '.join(problems)}")
    if problems:
        raise DataError(problems[0])
    return sources


def _read_source(i: int, source: SourceConfig, val_fraction: float) -> SourceText:
    key = f"data.sources.{i}.path={source.path}"
    path = resolve_path(source.path)
    raw = read_bytes(path, key)
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # a byte-order mark is no text
    text = decode_utf8(raw, path, key, start)
    n_chars, cut = len(text), split_point(text, val_fraction)
    # The val tail is at most half the text, so encoding it is the cheap way to the byte offset of the cut.
    # The parts are then decoded again from the bytes, so the whole text and its parts never coexist
    # (a str of non-Latin-1 text takes 2-4 bytes per character).
    byte_cut = len(raw) - len(text[cut:].encode("utf-8"))
    del text
    view = memoryview(raw)
    src = SourceText(
        index=i,
        name=source_name(source),
        path=path,
        key=key,
        train=str(view[start:byte_cut], "utf-8"),
        val=str(view[byte_cut:], "utf-8"),
        train_sha256=hashlib.sha256(view[start:byte_cut]).hexdigest(),
        val_sha256=hashlib.sha256(view[byte_cut:]).hexdigest(),
    )
    log.info(
        "source %d '%s': %s, %s characters -> train %s / val %s",
        i,
        src.name,
        path,
        f"{n_chars:,}",
        f"{len(src.train):,}",
        f"{len(src.val):,}",
    )
    return src


def read_bytes(path: Path, key: str) -> bytes:
    """The file's bytes; DataError if it is missing, not a file, empty or binary."""
    fix = f"point {key.split('=')[0]} at a UTF-8 text file"
    if not path.exists():
        raise DataError(
            f"{key}: no such file ({path}); relative paths are taken from the directory you launch from. "
            f"Fix the path, or {fix}."
        )
    if not path.is_file():
        raise DataError(f"{key}: {path} is not a regular file; {fix}.")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{key}: cannot read {path} ({e.strerror or e}); check its permissions or {fix}.") from None
    if not raw or raw == codecs.BOM_UTF8:
        raise DataError(f"{key}: the file {path} is empty; {fix} that holds some text.")
    nul = raw.find(b"\0")
    if nul >= 0 and (wide := wide_encoding(raw)):
        raise DataError(
            f"{key}: the file {path} is {wide[:6].upper()} text, not UTF-8. Convert it (for example `iconv -f {wide} "
            f"-t utf-8 in.txt > out.txt`) and point {key.split('=')[0]} at the converted file."
        )
    if nul >= 0:
        raise DataError(
            f"{key}: the file {path} looks binary (a NUL byte at byte offset {nul}); training needs plain text. "
            f"Extract the text first (for example to a .txt file) and {fix}."
        )
    return raw


def wide_encoding(raw: bytes) -> str | None:
    """The iconv name of UTF-16 or UTF-32 if ``raw`` is text in one (a byte-order mark, or the NUL bytes that every
    ASCII character has there), else None. Windows' "Unicode" text files are UTF-16 with a byte-order mark."""
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    head = raw[:4096]
    for width in (4, 2):
        n = len(head) // width * width
        for order, at in (("le", 0), ("be", width - 1)):  # where the byte of an ASCII character's code sits
            codes = head[at:n:width]
            pads = [b for i, b in enumerate(head[:n]) if i % width != at]
            if codes and codes.count(0) <= 0.1 * len(codes) and pads.count(0) >= 0.9 * len(pads):
                return f"utf-{8 * width}{order}"
    return None


_NON_ASCII = re.compile(rb"[\x80-\xff]")


def decode_utf8(raw: bytes, path: Path, key: str, start: int = 0) -> str:
    """Strict UTF-8 decoding of ``raw[start:]``; the error names the file's byte offset and line of the first bad
    byte."""
    try:
        return str(memoryview(raw)[start:], "utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = raw.count(b"\n", 0, at) + 1
        # Non-ASCII text before it decoded: UTF-8 with damaged bytes, which a conversion from Latin-1 would garble
        # throughout (é -> Ã©).
        damaged = _NON_ASCII.search(raw, 0, at) is not None
        fix = (
            "The text before it is UTF-8: drop the bytes that are not (`iconv -f utf-8 -t utf-8 -c in.txt > out.txt`)"
            if damaged
            else "Convert it to UTF-8 (for example `iconv -f latin1 -t utf-8 in.txt > out.txt`)"
        )
        raise DataError(
            f"{key}: the file {path} is not valid UTF-8: byte 0x{raw[at]:02x} at byte offset {at} "
            f"(line {line}) {e.reason}. {fix} and point {key.split('=')[0]} at the new file."
        ) from None


def split_point(text: str, val_fraction: float) -> int:
    """Character index where the validation tail starts: ``val_fraction`` of the text, moved to a line start.

    The nearest line start within a quarter of the val size is taken, so the val part holds whole lines and
    is 75-125% of the nominal size; text without a newline in that range is cut at the exact fraction.
    """
    n = len(text)
    n_val = round(n * val_fraction)
    target = n - n_val
    tol = n_val // 4
    left = text.rfind("\n", max(target - tol - 1, 0), target)  # cut = left + 1, in [target - tol, target]
    right = text.find("\n", target, min(target + tol, n - 1))  # cut = right + 1, in (target, target + tol]
    cuts = [j + 1 for j in (left, right) if j >= 0]
    return min(cuts, key=lambda c: abs(c - target)) if cuts else target


# --------------------------------------------------------------------------------------------------------------
# Encoding


# Places where GPT-2's pre-tokenizer regex starts a new pre-token whatever precedes them, so that encoding the
# text in pieces cut there gives exactly the ids of encoding it whole: the start of a line after a lone newline,
# and a lone space between words. (Inside runs of spaces and newlines a cut would change the pre-tokens.)
_LINE_START = re.compile(r"(?<=\S\n)(?=\S)")
_WORD_START = re.compile(r"(?<=\S)(?= \S)")


def text_pieces(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Consecutive pieces of ``piece_chars`` to ``4 * piece_chars`` characters that concatenate to ``text``.

    Pieces end at a line start, else a word start (see _LINE_START), so byte-level BPE ids are unchanged by
    the cuts; only text with neither for 4 * piece_chars characters is cut blindly. Tokenizers that prepend a
    space to every input (SentencePiece-style Metaspace) get one more space per piece.
    """
    n, start = len(text), 0
    while n - start > piece_chars:
        lo, hi = start + piece_chars, min(start + 4 * piece_chars, n)
        found = _LINE_START.search(text, lo, hi) or _WORD_START.search(text, lo, hi)
        cut = found.start() if found else hi
        if cut >= n:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_chunks(tokenizer: Tokenizer, text: str, piece_chars: int = PIECE_CHARS) -> Iterator[tuple[int, list[int]]]:
    """(characters consumed, their ids) for consecutive chunks of ``text``; no special tokens are added."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast (no offsets): tokenizers>=0.20
    pieces = text_pieces(text, piece_chars)
    while batch := list(itertools.islice(pieces, BATCH_PIECES)):
        yield sum(map(len, batch)), [i for e in encode(batch, add_special_tokens=False) for i in e.ids]


def id_space(tokenizer: Tokenizer) -> int:
    """One more than the largest token id: the vocabulary the model must embed, and what the ids are stored in.

    It exceeds ``get_vocab_size()`` (the number of tokens) when the ids have gaps, as in a tokenizer.json that
    places its special tokens far above the rest.
    """
    return max(tokenizer.get_vocab_size(), max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1)


def token_dtype(n_ids: int) -> np.dtype:
    return np.dtype(np.uint16 if n_ids < 65536 else np.uint32)


# --------------------------------------------------------------------------------------------------------------
# The cache


def build_token_cache(
    sources: list[SourceText],
    tokenizer: Tokenizer,
    eos_id: int,
    tokenizer_sha256: str,
    cache_dir: Path,
    may_build: bool = True,
) -> TokenCache | None:
    """Tokenize every source into ``cache_dir/tokens-<key>/`` unless it is already there, and map it; None if it is
    not there (or damaged) and ``may_build`` is false."""
    recipe = {
        "format": TOKENS_FORMAT,
        "tokenizer_sha256": tokenizer_sha256,
        "eos_id": eos_id,
        "parts": [[s.train_sha256, s.val_sha256] for s in sources],
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    final = cache_dir / f"tokens-{key}"
    seen = folder_identities(final)
    damage = None if seen is None else cache_damage(final)
    if seen is not None and damage is None:
        log.info("token cache hit: %s", final)
        return open_token_cache(final, key)
    if not may_build:
        if seen is not None:  # fp8train check on a large corpus: the run tokenizes it
            log.warning(
                "the token cache %s fails its check (%s): it is tokenized again when training starts", final, damage
            )
        return None
    if seen is not None:
        log.warning("the token cache %s fails its check (%s): it is tokenized again", final, damage)
    with building(final):
        now = folder_identities(final)
        if now != seen:  # another process built (or replaced) it while this one checked or waited
            damage = None if now is None else cache_damage(final)
            if now is not None and damage is None:
                log.info("token cache %s was written meanwhile by another process; using that one", final)
                return open_token_cache(final, key)
        if now is not None:
            discard_damaged(final, damage or "")
        t0 = time.perf_counter()
        with publishing(final) as tmp:
            meta = _write_tokens(tmp, sources, tokenizer, eos_id)
            (tmp / "meta.json").write_text(json.dumps({**meta, "recipe": recipe}, indent=2) + "\n")
        log.info("token cache written in %.1f s: %s", time.perf_counter() - t0, final)
    return open_token_cache(final, key)


def _read_meta(path: Path) -> tuple[dict, np.dtype, dict[str, int]]:
    """meta.json of a cache directory, its dtype, and the token count of each .bin file it lists."""
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    counts = {"train.bin": int(meta["train_tokens"])}
    counts.update({f"val_{i}.bin": int(s["val_tokens"]) for i, s in enumerate(meta["sources"])})
    return meta, dtype, counts


def cache_damage(path: Path) -> str | None:
    """Why the cache directory ``path`` cannot be trusted (its meta.json, a file's size or sha256), or None.

    A file this process may not read is no damage (another user's cache, written with a private umask, in a shared
    data.cache_dir): a DataError, rather than a rebuild that would first move that user's cache away.
    """
    try:
        meta, dtype, counts = _read_meta(path)
    except PermissionError as e:
        raise unreadable(path, e) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable meta.json: {first_line(e)}"
    if not isinstance(digests := meta.get("sha256"), dict):
        return "no checksums in meta.json: written by an older fp8train"
    for name, count in counts.items():
        try:
            size = (path / name).stat().st_size
            if size != count * dtype.itemsize:
                return f"{name} holds {size:,} bytes, not the {count:,} tokens of meta.json"
            if file_sha256(path / name) != digests.get(name):
                return f"{name} does not match its sha256 in meta.json"
        except PermissionError as e:
            raise unreadable(path, e) from None
        except OSError as e:
            return f"{name}: {e.strerror or e}"
    return None


def unreadable(path: Path, e: OSError, what: str = "token cache") -> DataError:
    """A cache directory this process may not read: no damage to discard, but another user's to make readable."""
    return DataError(
        f"data.cache_dir={path.parent}: the {what} {path} cannot be read ({e.strerror or e}: "
        f"{e.filename or path}). If another user wrote it, ask them to make it readable (chmod -R a+rX {path}), or "
        "set data.cache_dir to a folder of your own."
    )


def file_identities(path: Path) -> dict[str, list[int]]:
    """Size, modification time (ns) and inode of each file in a cache directory: what tells another process, on a
    shared file system, that it sees the very files this one checked."""
    return {f.name: [(st := f.stat()).st_size, st.st_mtime_ns, st.st_ino] for f in sorted(path.iterdir())}


def folder_identities(path: Path) -> dict[str, list[int]] | None:
    """file_identities of a cache directory, None if there is none: what tells whether another process replaced it."""
    try:
        return file_identities(path) if path.is_dir() else None
    except OSError as e:  # unreadable, or renamed away while listed
        return {f"unreadable: {e.strerror}": []}


def file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def discard_damaged(final: Path, damage: str, what: str = "token cache") -> None:
    """Move a damaged cache directory out of the way (atomically: no reader sees it half deleted) and delete it."""
    doomed = final.parent / f".tmp-{final.name}-damaged-{os.getpid()}-{time.time_ns()}"
    try:
        os.rename(final, doomed)
    except FileNotFoundError:  # another process moved it first
        return
    except OSError as e:
        raise DataError(
            f"data.cache_dir: the {what} {final} is damaged ({damage}) and cannot be replaced "
            f"({e.strerror or e}). Delete it (it is rebuilt on the next run), or set data.cache_dir to a writable "
            "folder."
        ) from None
    shutil.rmtree(doomed, ignore_errors=True)


def open_token_cache(path: Path, key: str) -> TokenCache:
    """Memory-map a finished cache directory (check it first with cache_damage)."""
    try:
        meta, dtype, counts = _read_meta(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"data.cache_dir: the token cache {path} has no readable meta.json ({first_line(e)}). Delete {path} (it "
            "is rebuilt on the next run), or set data.cache_dir to another folder."
        ) from None
    train = np.memmap(path / "train.bin", dtype=dtype, mode="r")
    val = [TokenFile(path / f"val_{i}.bin", dtype, counts[f"val_{i}.bin"]) for i in range(len(meta["sources"]))]
    return TokenCache(path=path, key=key, train=train, val=val, meta=meta)


@contextlib.contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``final``, renamed to ``final`` when the block succeeds.

    rename(2) of a directory is atomic and fails when the target exists and is not empty: then another
    process published the same content first, and ours is discarded.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as e:
        file = next((p for p in (final.parent, *final.parent.parents) if p.exists() and not p.is_dir()), None)
        why = f"{file} is a file, not a folder" if file else f"cannot create a folder there ({e.strerror or e})"
        raise DataError(
            f"data.cache_dir={final.parent}: {why}; set data.cache_dir (or FP8TRAIN_CACHE_DIR) to a writable folder."
        ) from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is plain shared data
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("%s was written meanwhile by another process; using that one", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_held: set[Path] = set()  # the lock files this process holds, so that a build inside a build of the same thing passes
_warned_no_locks = False


@contextlib.contextmanager
def building(final: Path) -> Iterator[None]:
    """Hold the lock file ``.<name>.lock`` beside ``final`` (it holds the holder's pid and host) while building it:
    one process at a time builds a cache, whether the others run on this machine or on another one sharing the
    folder. After the lock, check again whether ``final`` is there: the process that held it may have built it.
    Where the file system has no locks, every process builds (``publishing`` keeps them apart), with one warning."""
    lock = final.parent / f".{final.name}.lock"
    if lock in _held:
        yield
        return
    fd = _lock(lock, final)
    if fd is None:
        yield
        return
    _held.add(lock)
    try:
        yield
    finally:
        _held.discard(lock)
        # The lock file stays: removing it would let a waiter lock a file no longer at that path (and on NFS
        # leave it a stale handle), while a newcomer locks a new one.
        os.close(fd)


def _lock(lock: Path, final: Path) -> int | None:
    """An open descriptor of ``lock`` holding its exclusive flock, waiting for it if need be; None where the folder
    is not writable (building there fails with its own message) or the file system refuses locks."""
    global _warned_no_locks
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = locks.holder(fd)
                log.info("waiting for %s, which builds %s (lock file %s)", holder, final, lock)
                late = (
                    "still waiting for %s, which builds %s (lock file %s), %d s so far; this process goes on after it"
                )
                with warning_after(LONG_WAIT_S, late, holder, final, lock, LONG_WAIT_S):
                    fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, lock):
                locks.mark_holder(fd)
                return fd
            os.close(fd)  # deleted meanwhile (by hand, or by a process without locks): lock the path anew
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: NFS without lockd, some FUSE file systems
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)  # no process can hold it: leave no lock files behind
            if not _warned_no_locks:
                _warned_no_locks = True
                log.warning(
                    "data.cache_dir=%s: the file system refuses file locks (%s), so processes that need the same "
                    "token cache or tokenizer at once each build it",
                    lock.parent,
                    e.strerror or e,
                )
            return None
        except BaseException:  # Ctrl-C while waiting
            os.close(fd)
            raise


@contextlib.contextmanager
def warning_after(seconds: float, message: str, *args) -> Iterator[None]:
    """Log ``message % args`` as a warning if the block still runs after ``seconds``: a wait that would otherwise
    look like a hang, also on ranks whose INFO lines are hidden."""
    timer = threading.Timer(seconds, log.warning, (message, *args))
    timer.daemon = True  # never what keeps a process alive
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open ``fd`` is still the file at ``path`` (not one removed, or removed and created again)."""
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False  # any other error: as for flock, the file system's locks cannot be trusted (see _lock)
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _remove_abandoned(cache_dir: Path) -> None:
    """Delete the temp folders of builds killed before their ``finally`` ran (SIGKILL, SIGTERM, a lost node).

    A live build writes into its folder every few seconds, so one whose newest file is older than STALE_TMP_S is
    abandoned, whatever host or process made it.
    """
    now = time.time()
    for folder in cache_dir.glob(".tmp-*"):
        try:
            newest = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())])
        except OSError:  # removed meanwhile by its builder or another cleaner
            continue
        if folder.is_dir() and now - newest > STALE_TMP_S:
            log.info("removing %s, left by a build that was killed", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _write_tokens(out: Path, sources: list[SourceText], tokenizer: Tokenizer, eos_id: int) -> dict:
    """Write train.bin and val_<i>.bin into ``out``; return the meta.json fields."""
    dtype = token_dtype(id_space(tokenizer))
    total_chars = sum(len(s.train) + len(s.val) for s in sources)
    progress = _Progress(total_chars)
    source_meta = [{"name": s.name, "path": str(s.path), "train_sha256": s.train_sha256} for s in sources]
    digests = {"train.bin": hashlib.sha256()}
    with open(out / "train.bin", "wb") as f:
        for s, m in zip(sources, source_meta):
            m["train_chars"] = len(s.train)
            m["train_tokens"] = _write_part(f, digests["train.bin"], s.train, tokenizer, eos_id, dtype, progress)
    for s, m in zip(sources, source_meta):
        name = f"val_{s.index}.bin"
        digests[name] = hashlib.sha256()
        with open(out / name, "wb") as f:
            m["val_chars"] = len(s.val)
            m["val_tokens"] = _write_part(f, digests[name], s.val, tokenizer, eos_id, dtype, progress)
        m["val_sha256"] = s.val_sha256
    return {
        "format": TOKENS_FORMAT,
        "dtype": dtype.name,
        "vocab_size": id_space(tokenizer),
        "eos_id": eos_id,
        "train_tokens": sum(m["train_tokens"] for m in source_meta),
        "sources": source_meta,
        "sha256": {name: h.hexdigest() for name, h in digests.items()},
    }


def _write_part(f, digest, text: str, tokenizer: Tokenizer, eos_id: int, dtype: np.dtype, progress: _Progress) -> int:
    """Append the ids of ``text`` and one EOS to the open file ``f`` and to ``digest``; return how many."""
    n = 0
    for n_chars, ids in encode_chunks(tokenizer, text):
        raw = np.asarray(ids, dtype=dtype).tobytes()
        f.write(raw)
        digest.update(raw)
        n += len(ids)
        progress.advance(n_chars)
    raw = np.asarray([eos_id], dtype=dtype).tobytes()
    f.write(raw)
    digest.update(raw)
    return n + 1


class _Progress:
    """Logs 'tokenized X / Y M characters' every PROGRESS_CHARS characters, for inputs big enough to wait on."""

    def __init__(self, total_chars: int):
        self.total, self.done, self.next_report, self.t0 = total_chars, 0, PROGRESS_CHARS, time.perf_counter()
        if total_chars > PROGRESS_CHARS:
            log.info("tokenizing %.0f M characters", total_chars / 1e6)

    def advance(self, chars: int) -> None:
        self.done += chars
        if self.total > PROGRESS_CHARS and self.done >= self.next_report:
            log.info(
                "tokenized %.0f / %.0f M characters (%.0f s)",
                self.done / 1e6,
                self.total / 1e6,
                time.perf_counter() - self.t0,
            )
            self.next_report = self.done + PROGRESS_CHARS

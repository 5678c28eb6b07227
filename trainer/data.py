"""Training data as a pure function of (seed, step), so a resumed run sees the same stream.

Four sources, chosen by ``DataConfig.kind``:

- ``stdlib`` (default): the Python standard library's ``.py`` files as bytes (vocab 256). Files
  under ``site-packages``, ``test``, ``tests`` and ``idle_test`` folders are skipped, which leaves
  about 12 MB on CPython 3.11.
- ``text``: every ``*.txt`` file under ``path`` (recursively), or one text file, as bytes.
- ``bin``: nanoGPT-style uint16 token shards in the folder ``path``: files named ``train*.bin``
  are the training split and ``val*.bin`` the validation split, memory-mapped as they are.
- ``digits``: scikit-learn's bundled 8x8 digit images (1797 images, 10 classes).

Byte corpora (``stdlib``, ``text``) go to validation file by file, by a hash of each file's
relative path (`file_split`), so adding a file never moves another. When that leaves a split
empty (say, a single file) the last ``val_fraction`` of the bytes is held out instead. Each file
ends with a NUL byte, a document boundary that source text never contains. The two splits are
cached once as memory-mapped uint8 ``train.bin`` / ``val.bin`` plus ``meta.json`` (written
last, each through a temporary file and a rename), in a folder named after a hash of the file
listing, so a changed file is rebuilt and concurrent workers never read a half-written cache.

``get_batch(split, step)`` draws from a ``torch.Generator`` seeded by (seed, split, step, rank,
micro-step), never from a global stream; ``val_batches(n)`` is a fixed set, the same on every
call and for every seed, so validation losses of different runs compare directly.

>>> data = build_data(DataConfig(kind="digits", batch_size=4), seed=0)
>>> x, y = data.get_batch("train", step=0)
>>> tuple(x.shape), tuple(y.shape), data.num_classes
((4, 1, 8, 8), (4,), 10)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.errors import ConfigError

Split = Literal["train", "val"]
CACHE_FORMAT = 1  # bump when the cached layout changes, so old caches are rebuilt
DOCUMENT_END = b"\0"
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
DIGITS_NOISE_STD = 0.05  # pixel noise with `augment`, on the [0, 1] intensity scale
DIGITS_MAX_SHIFT = 1  # pixels, in each direction, with `augment`


class DataConfig(BaseModel):
    """Where batches come from and how big they are."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["stdlib", "text", "bin", "digits"] = Field(
        default="stdlib",
        description="stdlib: Python's own source as bytes; text: a folder of .txt files; "
        "bin: nanoGPT uint16 shards train*.bin / val*.bin; digits: scikit-learn's 8x8 digits.",
    )
    path: Path | None = Field(
        default=None, description="Folder (or one .txt file) to read; required for text and bin."
    )
    block_size: int = Field(default=256, ge=1, description="Tokens per sequence (language models).")
    batch_size: int = Field(
        default=16, ge=1, description="Sequences or images per batch, per process."
    )
    val_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Share of files (or images) held out for validation.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where byte corpora are cached; None: $XDG_CACHE_HOME/scaleplan, "
        "else ~/.cache/scaleplan.",
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Read only the first files (sorted by path) up to this many bytes; "
        "stdlib and text only. None reads everything.",
    )
    vocab_size: int | None = Field(
        default=None,
        ge=1,
        description="Vocabulary of bin shards; None scans the shards for the largest token id.",
    )
    augment: bool = Field(
        default=False,
        description="digits only: random 1-pixel shifts and Gaussian pixel noise (0.05).",
    )

    @model_validator(mode="after")
    def _check_kind_fields(self) -> DataConfig:
        if self.kind in ("text", "bin") and self.path is None:
            raise ValueError(f"data.path: missing; data.kind {self.kind!r} needs a path")
        if self.kind in ("stdlib", "digits") and self.path is not None:
            raise ValueError(
                f"data.path: '{self.path}' is not used by data.kind {self.kind!r}; "
                "expected it only with kind text or bin"
            )
        if self.max_bytes is not None and self.kind not in ("stdlib", "text"):
            raise ValueError(
                f"data.max_bytes: {self.max_bytes} is not used by data.kind {self.kind!r}; "
                "expected it only with kind stdlib or text"
            )
        if self.vocab_size is not None and self.kind != "bin":
            raise ValueError(
                f"data.vocab_size: {self.vocab_size} is not used by data.kind {self.kind!r}; "
                "expected it only with kind bin"
            )
        if self.augment and self.kind != "digits":
            raise ValueError(
                f"data.augment: true is not used by data.kind {self.kind!r}; "
                "expected it only with kind digits"
            )
        return self


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/scaleplan, else ~/.cache/scaleplan: shared by every run and study."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "scaleplan"


def file_split(relative_path: str, val_fraction: float) -> Split:
    """Split of one file: 'val' when a SHA-1 of its relative path falls below val_fraction."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if bucket < val_fraction else "train"


def batch_generator(
    seed: int, split: str, step: int, rank: int = 0, micro: int = 0
) -> torch.Generator:
    """A generator that depends only on its arguments: batch `step` is the same on a resume."""
    key = f"scaleplan/{seed}/{split}/{step}/{rank}/{micro}".encode()
    return torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(
    root: Path, suffix: str, skip_dirs: frozenset[str] = frozenset()
) -> list[tuple[str, Path]]:
    """(relative POSIX path, path) of every file ending in `suffix` under `root`, sorted."""
    found = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and d != "__pycache__"]
        for name in filenames:
            if name.endswith(suffix):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's .py files (tests and site-packages skipped), sorted by path."""
    return list_files(stdlib_root(), ".py", STDLIB_SKIPPED_DIRS)


# ---------------------------------------------------------------------------------------------
# Data sources


class DataSource(ABC):
    """What the training loop reads: batches by (split, step) and a fixed validation set.

    task 'lm': x and y are (batch, block_size) int64 token ids, y is x shifted left by one.
    task 'classify': x is (batch, *input_shape) float32, y is (batch,) int64 class ids.
    """

    task: Literal["lm", "classify"]
    vocab_size: int | None = None
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    batch_size: int
    fingerprint: str  # SHA-256 identifying the data and its split; runs record it
    meta: dict[str, Any]  # what a run should log about its data (sizes, source, fingerprint)
    train_size: int  # tokens (lm) or examples (classify)
    val_size: int

    @property
    @abstractmethod
    def tokens_per_batch(self) -> int:
        """Tokens in one batch (lm), or examples (classify)."""

    @abstractmethod
    def get_batch(
        self, split: Split, step: int, *, rank: int = 0, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `step` of `split`, a pure function of (seed, split, step, rank, micro).

        `rank` (data-parallel process) and `micro` (gradient-accumulation micro-step) give
        independent batches for the same step; rank=0, micro=0 is the single-process stream.
        """

    @abstractmethod
    def val_batches(self, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed validation set: n batches, or one pass over the validation split if None."""


class TokenData(DataSource):
    """Language-model windows from one or more memory-mapped token arrays per split."""

    task: Literal["lm", "classify"] = "lm"

    def __init__(
        self,
        shards: dict[Split, list[np.ndarray]],
        *,
        vocab_size: int,
        block_size: int,
        batch_size: int,
        seed: int,
        fingerprint: str,
        meta: dict[str, Any],
    ) -> None:
        self.shards = shards
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.fingerprint = fingerprint
        self.meta = meta
        # a window needs block_size + 1 tokens, so a shard of n tokens has n - block_size starts;
        # windows never straddle two shards
        self._starts_before: dict[Split, np.ndarray] = {}
        for split in ("train", "val"):
            counts = [max(0, len(shard) - block_size) for shard in shards[split]]
            self._starts_before[split] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            if self._starts_before[split][-1] == 0:
                longest = max(len(shard) for shard in shards[split])
                raise ConfigError(
                    f"data.block_size: {block_size} is too long for the {split} split "
                    f"({longest} tokens in its longest shard); expected at most {longest - 1}"
                )
        self.train_size = sum(len(s) for s in shards["train"])
        self.val_size = sum(len(s) for s in shards["val"])

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.block_size

    def get_batch(
        self, split: Split, step: int, *, rank: int = 0, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        generator = batch_generator(self.seed, split, step, rank, micro)
        total = int(self._starts_before[split][-1])
        starts = torch.randint(total, (self.batch_size,), generator=generator).numpy()
        return self._windows(split, starts)

    def val_batches(self, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        total = int(self._starts_before["val"][-1])
        if n is None:  # non-overlapping windows over the whole split
            starts = np.arange(0, total, self.block_size, dtype=np.int64)
        else:  # evenly spaced windows: no randomness, so every call and every seed agree
            starts = np.linspace(0, total - 1, n * self.batch_size).round().astype(np.int64)
        chunks = range(0, len(starts), self.batch_size)
        return [self._windows("val", starts[i : i + self.batch_size]) for i in chunks]

    def _windows(self, split: Split, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        before = self._starts_before[split]
        shard_ids = np.searchsorted(before, starts, side="right") - 1
        rows = [
            self.shards[split][shard][offset : offset + self.block_size + 1]
            for shard, offset in zip(shard_ids, starts - before[shard_ids], strict=True)
        ]
        window = torch.from_numpy(np.stack(rows).astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class DigitsData(DataSource):
    """scikit-learn's 8x8 digits, intensities scaled to [0, 1], split by a hash of each index."""

    task: Literal["lm", "classify"] = "classify"
    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, *, batch_size: int, val_fraction: float, seed: int, augment: bool) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError(
                "data.kind: 'digits' needs scikit-learn; install it with "
                "`pip install scikit-learn` or pick kind stdlib, text or bin"
            ) from None
        bunch = load_digits()
        images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
        labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
        is_val = torch.tensor(
            [file_split(f"digits/{i}", val_fraction) == "val" for i in range(len(labels))]
        )
        self.images: dict[Split, torch.Tensor] = {"train": images[~is_val], "val": images[is_val]}
        self.labels: dict[Split, torch.Tensor] = {"train": labels[~is_val], "val": labels[is_val]}
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.train_size = len(self.labels["train"])
        self.val_size = len(self.labels["val"])
        digest = hashlib.sha256()
        for split in ("train", "val"):
            digest.update(self.images[split].numpy().tobytes())
            digest.update(self.labels[split].numpy().tobytes())
        self.fingerprint = digest.hexdigest()
        self.meta = {
            "kind": "digits",
            "examples": {"train": self.train_size, "val": self.val_size},
            "num_classes": self.num_classes,
            "augment": augment,
            "fingerprint": self.fingerprint,
        }

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size

    def get_batch(
        self, split: Split, step: int, *, rank: int = 0, micro: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        generator = batch_generator(self.seed, split, step, rank, micro)
        index = torch.randint(len(self.labels[split]), (self.batch_size,), generator=generator)
        x, y = self.images[split][index], self.labels[split][index]
        if self.augment and split == "train":
            x = shift_and_noise(x, generator)
        return x, y

    def val_batches(self, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The validation images in order, in batches; n caps the number of batches."""
        starts = list(range(0, self.val_size, self.batch_size))[:n]
        return [
            (
                self.images["val"][i : i + self.batch_size],
                self.labels["val"][i : i + self.batch_size],
            )
            for i in starts
        ]


def shift_and_noise(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Move each (B, 1, H, W) image by up to DIGITS_MAX_SHIFT pixels and add pixel noise."""
    batch, _, height, width = images.shape
    s = DIGITS_MAX_SHIFT
    padded = F.pad(images, (s, s, s, s))  # zeros come in at the edges
    dy = torch.randint(0, 2 * s + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]  # (B, 1, W)
    shifted = padded[torch.arange(batch)[:, None, None], 0, rows, cols].unsqueeze(1)
    noise = DIGITS_NOISE_STD * torch.randn(shifted.shape, generator=generator)
    return (shifted + noise).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Building sources


def build_data(config: DataConfig, seed: int = 0) -> DataSource:
    """The DataSource that `config` describes; byte corpora are built into the cache once."""
    if config.kind == "digits":
        return DigitsData(
            batch_size=config.batch_size,
            val_fraction=config.val_fraction,
            seed=seed,
            augment=config.augment,
        )
    if config.kind == "bin":
        assert config.path is not None  # the config validator guarantees it
        return _open_bin_shards(config, _existing_path(config.path), seed)
    if config.kind == "stdlib":
        root, files = stdlib_root(), stdlib_files()
    else:
        assert config.path is not None
        root = _existing_path(config.path)
        files = [(root.name, root)] if root.is_file() else list_files(root, ".txt")
        if not files:
            raise ConfigError(
                f"data.path: '{config.path}' has no .txt files; expected a folder of .txt files "
                "(searched recursively) or one text file"
            )
    return _open_byte_corpus(config, root, files, seed)


def _existing_path(path: Path) -> Path:
    resolved = path.expanduser().resolve()
    if not resolved.exists():
        raise ConfigError(
            f"data.path: '{path}' does not exist; expected a folder of .txt files or .bin shards"
        )
    return resolved


def _open_byte_corpus(
    config: DataConfig, root: Path, files: list[tuple[str, Path]], seed: int
) -> TokenData:
    if config.max_bytes is not None:
        files = _first_files(files, config.max_bytes)
    stats = [(rel, path.stat()) for rel, path in files]
    listing = [(rel, stat.st_size, stat.st_mtime_ns) for rel, stat in stats]
    if sum(size for _, size, _ in listing) == 0:
        raise ConfigError(f"data.path: '{root}' has only empty files; expected some text")
    key = hashlib.sha256(
        json.dumps([CACHE_FORMAT, config.kind, str(root), config.val_fraction, listing]).encode()
    ).hexdigest()[:16]
    cache_root = (config.cache_dir or default_cache_dir()).expanduser()
    folder = cache_root / f"{config.kind}-{key}"
    meta_path = folder / "meta.json"
    complete = all((folder / name).exists() for name in ("meta.json", "train.bin", "val.bin"))
    if not complete:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"data.cache_dir: '{cache_root}' is not writable ({error.strerror}); "
                "expected a folder this user can write"
            ) from None
        _write_byte_corpus(folder, config, root, files)
    meta = json.loads(meta_path.read_text())
    shards: dict[Split, list[np.ndarray]] = {
        split: [np.memmap(folder / f"{split}.bin", dtype=np.uint8, mode="r")]
        for split in ("train", "val")
    }
    return TokenData(
        shards,
        vocab_size=256,
        block_size=config.block_size,
        batch_size=config.batch_size,
        seed=seed,
        fingerprint=meta["fingerprint"],
        meta=meta | {"cache": str(folder)},
    )


def _first_files(files: list[tuple[str, Path]], max_bytes: int) -> list[tuple[str, Path]]:
    """Whole files, in order, until at least max_bytes are taken."""
    taken, total = [], 0
    for rel, path in files:
        if total >= max_bytes:
            break
        taken.append((rel, path))
        total += path.stat().st_size
    return taken


class _AtomicBin:
    """Bytes streamed to a temporary file, hashed on the way, renamed into place on commit."""

    def __init__(self, final: Path) -> None:
        self.final = final
        handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        self.file = os.fdopen(handle, "wb")
        self.temp = Path(name)
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def commit(self) -> None:
        self.file.close()
        os.replace(self.temp, self.final)

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _write_byte_corpus(
    folder: Path, config: DataConfig, root: Path, files: list[tuple[str, Path]]
) -> None:
    started = time.perf_counter()
    split_of = [file_split(rel, config.val_fraction) for rel, _ in files]
    by_file = "train" in split_of and "val" in split_of
    # without both splits, hold out the tail: the last val_fraction of all bytes
    total = sum(path.stat().st_size + len(DOCUMENT_END) for _, path in files)
    tail_start = total - max(1, int(total * config.val_fraction))
    writers = {split: _AtomicBin(folder / f"{split}.bin") for split in ("train", "val")}
    file_counts = {"train": 0, "val": 0}
    try:
        position = 0
        for (_, path), split in zip(files, split_of, strict=True):
            document = path.read_bytes() + DOCUMENT_END
            if by_file:
                writers[split].write(document)
                file_counts[split] += 1
            else:
                cut = min(max(tail_start - position, 0), len(document))
                writers["train"].write(document[:cut])
                writers["val"].write(document[cut:])
                position += len(document)
        if writers["val"].size == 0 or writers["train"].size == 0:
            raise ConfigError(
                f"data.path: '{root}' has too little text to split ({total} bytes); "
                "expected more text or a larger data.val_fraction"
            )
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    for writer in writers.values():
        writer.commit()
    fingerprint = hashlib.sha256(
        f"train:{writers['train'].digest.hexdigest()}:val:{writers['val'].digest.hexdigest()}".encode()
    ).hexdigest()
    meta = {
        "cache_format": CACHE_FORMAT,
        "kind": config.kind,
        "source": str(root),
        "python": sys.version.split()[0] if config.kind == "stdlib" else None,
        "dtype": "uint8",
        "vocab_size": 256,
        "split": "file-hash" if by_file else "tail",
        "val_fraction": config.val_fraction,
        "files": len(files),
        "files_per_split": file_counts if by_file else None,
        "tokens": {split: writer.size for split, writer in writers.items()},
        "fingerprint": fingerprint,
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    _atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2))


def _atomic_write_text(path: Path, text: str) -> None:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(name, path)


def _open_bin_shards(config: DataConfig, folder: Path, seed: int) -> TokenData:
    if not folder.is_dir():
        raise ConfigError(
            f"data.path: '{config.path}' is not a folder; expected a folder with "
            "train*.bin and val*.bin uint16 shards"
        )
    shards: dict[Split, list[np.ndarray]] = {}
    digest = hashlib.sha256()
    for split in ("train", "val"):
        paths = sorted(folder.glob(f"{split}*.bin"))
        if not paths:
            raise ConfigError(
                f"data.path: '{config.path}' has no {split}*.bin shard; expected train*.bin and "
                "val*.bin uint16 token files (nanoGPT layout)"
            )
        shards[split] = []
        for path in paths:
            size = path.stat().st_size
            if size == 0 or size % 2 != 0:
                problem = "has no tokens" if size == 0 else f"has {size} bytes, not whole uint16s"
                raise ConfigError(f"data.path: shard '{path}' {problem}; expected uint16 token ids")
            shards[split].append(np.memmap(path, dtype=np.uint16, mode="r"))
            # cheap and stable: name, size and both ends of each shard, never the whole file
            digest.update(f"{split}/{path.name}/{size}".encode())
            for chunk in _ends(path, size):
                digest.update(chunk)
    vocab_size = config.vocab_size
    if vocab_size is None:
        vocab_size = 1 + max(int(shard.max()) for split in shards.values() for shard in split)
    fingerprint = digest.hexdigest()
    meta = {
        "kind": "bin",
        "source": str(folder),
        "dtype": "uint16",
        "vocab_size": vocab_size,
        "shards": {split: len(shards[split]) for split in shards},
        "tokens": {split: sum(len(s) for s in shards[split]) for split in shards},
        "fingerprint": fingerprint,
    }
    return TokenData(
        shards,
        vocab_size=vocab_size,
        block_size=config.block_size,
        batch_size=config.batch_size,
        seed=seed,
        fingerprint=fingerprint,
        meta=meta,
    )


def _ends(path: Path, size: int, length: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as file:
        yield file.read(length)
        if size > length:
            file.seek(max(length, size - length))
            yield file.read(length)

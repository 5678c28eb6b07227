"""Data: the default corpus, splits, the (seed, step) -> batch contract, user data, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trainer.data import (
    DOCUMENT_END,
    DataConfig,
    DataSource,
    TokenData,
    build_data,
    file_split,
    stdlib_files,
)
from trainer.errors import ConfigError


@pytest.fixture(scope="module")
def stdlib_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def token_data(config: DataConfig, seed: int = 0) -> TokenData:
    data = build_data(config, seed)
    assert isinstance(data, TokenData)
    return data


def test_default_stdlib_corpus_builds_once(stdlib_cache: Path) -> None:
    data = token_data(DataConfig(cache_dir=stdlib_cache))
    assert data.task == "lm" and data.vocab_size == 256
    assert data.meta["split"] == "file-hash"
    assert 8_000_000 < data.train_size + data.val_size < 40_000_000  # about 12 MB on 3.11
    assert 0.02 < data.val_size / (data.train_size + data.val_size) < 0.25
    assert len(data.fingerprint) == 64
    assert data.tokens_per_batch == 16 * 256
    cached = Path(data.meta["cache"])
    assert sorted(p.name for p in cached.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    built_at = (cached / "train.bin").stat().st_mtime_ns
    again = token_data(DataConfig(cache_dir=stdlib_cache))
    assert again.fingerprint == data.fingerprint
    assert (cached / "train.bin").stat().st_mtime_ns == built_at  # read, not rebuilt
    assert json.loads((cached / "meta.json").read_text())["fingerprint"] == data.fingerprint


def test_stdlib_split_is_by_file_and_disjoint(stdlib_cache: Path) -> None:
    data = token_data(DataConfig(cache_dir=stdlib_cache))
    files = stdlib_files()
    assert all("site-packages" not in rel and "/test/" not in f"/{rel}" for rel, _ in files)
    expected: dict[str, list[bytes]] = {"train": [], "val": []}
    for rel, path in files:
        expected[file_split(rel, 0.1)].append(path.read_bytes() + DOCUMENT_END)
    for split in ("train", "val"):
        assert bytes(data.shards[split][0]) == b"".join(expected[split])
    assert data.meta["files_per_split"] == {split: len(expected[split]) for split in expected}


def test_file_split_is_a_stable_hash() -> None:
    names = [f"pkg/module_{i}.py" for i in range(2000)]
    splits = [file_split(name, 0.1) for name in names]
    assert splits == [file_split(name, 0.1) for name in names]
    assert 0.07 < splits.count("val") / len(names) < 0.13
    # raising val_fraction only moves files into validation, never out of it
    assert all(
        file_split(n, 0.2) == "val" for n, s in zip(names, splits, strict=True) if s == "val"
    )


def test_max_bytes_reads_the_first_files(tmp_path: Path) -> None:
    data = token_data(DataConfig(cache_dir=tmp_path, max_bytes=300_000, block_size=64))
    assert 300_000 <= data.train_size + data.val_size < 600_000
    assert data.meta["files"] < len(stdlib_files())


def test_batches_are_a_pure_function_of_seed_and_step(stdlib_cache: Path) -> None:
    config = DataConfig(cache_dir=stdlib_cache, block_size=32, batch_size=4)
    first, second = token_data(config, seed=1), token_data(config, seed=1)
    for split in ("train", "val"):
        for step in (0, 7, 123_456):
            x1, y1 = first.get_batch(split, step)
            x2, y2 = second.get_batch(split, step)
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x0, _ = first.get_batch("train", 0)
    assert not torch.equal(x0, first.get_batch("train", 1)[0])
    assert not torch.equal(x0, first.get_batch("val", 0)[0])
    assert not torch.equal(x0, first.get_batch("train", 0, rank=1)[0])
    assert not torch.equal(x0, first.get_batch("train", 0, micro=1)[0])
    assert not torch.equal(x0, token_data(config, seed=2).get_batch("train", 0)[0])
    # asking for other batches in between does not move the stream (no global state)
    torch.manual_seed(99)
    assert torch.equal(x0, first.get_batch("train", 0)[0])


def test_targets_are_inputs_shifted_by_one(stdlib_cache: Path) -> None:
    data = token_data(DataConfig(cache_dir=stdlib_cache, block_size=32, batch_size=8))
    x, y = data.get_batch("train", 3)
    assert x.shape == y.shape == (8, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    corpus = bytes(data.shards["train"][0])
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        window = bytes(row_x + row_y[-1:])
        assert window in corpus


def test_val_batches_are_fixed_and_seed_independent(stdlib_cache: Path) -> None:
    config = DataConfig(cache_dir=stdlib_cache, block_size=64, batch_size=4)
    one, other_seed = token_data(config, seed=0), token_data(config, seed=5)
    batches = one.val_batches(3)
    assert len(batches) == 3 and batches[0][0].shape == (4, 64)
    for (xa, ya), (xb, yb) in zip(batches, other_seed.val_batches(3), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    full_pass = one.val_batches()
    assert sum(len(x) for x, _ in full_pass) == -(-(one.val_size - 64) // 64)


def write_text_folder(root: Path, count: int = 24) -> None:
    (root / "nested").mkdir(parents=True)
    for i in range(count):
        folder = root / "nested" if i % 2 else root
        (folder / f"doc_{i:02d}.txt").write_text(f"document {i}: " + "lorem ipsum " * 40)
    (root / "ignored.md").write_text("not a .txt file")


def test_text_folder_loads_and_splits_by_file(tmp_path: Path) -> None:
    write_text_folder(tmp_path / "corpus")
    config = DataConfig(
        kind="text", path=tmp_path / "corpus", cache_dir=tmp_path / "cache", block_size=16
    )
    data = token_data(config)
    assert data.meta["split"] == "file-hash" and data.meta["files"] == 24
    assert b"not a .txt" not in bytes(data.shards["train"][0]) + bytes(data.shards["val"][0])
    x, y = data.get_batch("train", 0)
    assert x.shape == (16, 16) and int(x.max()) < 256
    # a changed file means a new cache and a new fingerprint
    (tmp_path / "corpus" / "doc_00.txt").write_text("changed text " * 50)
    assert token_data(config).fingerprint != data.fingerprint


def test_single_text_file_holds_out_its_tail(tmp_path: Path) -> None:
    text = "".join(f"line {i}\n" for i in range(2000))
    (tmp_path / "input.txt").write_text(text)
    config = DataConfig(
        kind="text", path=tmp_path / "input.txt", cache_dir=tmp_path / "cache", block_size=8
    )
    data = token_data(config)
    assert data.meta["split"] == "tail"
    train, val = bytes(data.shards["train"][0]), bytes(data.shards["val"][0])
    assert train + val == text.encode() + DOCUMENT_END
    assert len(val) == int(len(train + val) * 0.1)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temp files


def write_shards(folder: Path) -> None:
    folder.mkdir()
    np.arange(0, 500, dtype=np.uint16).tofile(folder / "train_000.bin")
    np.arange(1000, 1300, dtype=np.uint16).tofile(folder / "train_001.bin")
    np.arange(2000, 2200, dtype=np.uint16).tofile(folder / "val.bin")


def test_bin_shards_are_memory_mapped_and_windows_stay_in_one_shard(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    data = token_data(DataConfig(kind="bin", path=tmp_path / "shards", block_size=32))
    assert data.vocab_size == 2200  # largest token id + 1
    assert data.train_size == 800 and data.val_size == 200
    assert all(isinstance(shard, np.memmap) for shard in data.shards["train"])
    seen_shards = set()
    for step in range(20):
        x, y = data.get_batch("train", step)
        assert torch.equal(y, x + 1)  # consecutive ids: every window lies inside one shard
        seen_shards.update((x[:, 0] >= 1000).tolist())
    assert seen_shards == {True, False}
    x, _ = data.get_batch("val", 0)
    assert bool(((x >= 2000) & (x < 2200)).all())
    explicit = token_data(
        DataConfig(kind="bin", path=tmp_path / "shards", block_size=32, vocab_size=4096)
    )
    assert explicit.vocab_size == 4096 and explicit.fingerprint == data.fingerprint


def test_digits_shapes_determinism_and_augmentation() -> None:
    config = DataConfig(kind="digits", batch_size=32)
    data = build_data(config, seed=0)
    assert data.task == "classify" and data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert data.train_size + data.val_size == 1797
    x, y = data.get_batch("train", 4)
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (32,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    again = build_data(config, seed=0).get_batch("train", 4)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, data.get_batch("train", 5)[0])

    augmented = build_data(DataConfig(kind="digits", batch_size=32, augment=True), seed=0)
    xa, ya = augmented.get_batch("train", 4)
    assert torch.equal(ya, y) and not torch.equal(xa, x)  # same images, moved and noisy
    assert torch.equal(xa, augmented.get_batch("train", 4)[0])
    assert torch.equal(augmented.get_batch("val", 4)[0], data.get_batch("val", 4)[0])

    val = data.val_batches()
    assert sum(len(labels) for _, labels in val) == data.val_size
    assert len(data.val_batches(2)) == 2
    assert data.fingerprint == augmented.fingerprint


def test_data_sources_share_one_interface(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    sources: list[DataSource] = [
        build_data(DataConfig(kind="digits")),
        build_data(DataConfig(kind="bin", path=tmp_path / "shards", block_size=8)),
    ]
    for data in sources:
        x, y = data.get_batch("train", 0)
        assert len(x) == len(y) == data.batch_size
        assert data.meta["fingerprint"] == data.fingerprint


@pytest.mark.parametrize("kind", ["text", "bin"])
def test_missing_path_names_the_field(tmp_path: Path, kind: Literal["text", "bin"]) -> None:
    with pytest.raises(ConfigError, match=r"^data.path: '.*nowhere' does not exist"):
        build_data(DataConfig(kind=kind, path=tmp_path / "nowhere"))


def test_empty_text_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.path: .* has no .txt files"):
        build_data(DataConfig(kind="text", path=tmp_path / "empty", cache_dir=tmp_path))


def test_bin_folder_errors(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    np.arange(100, dtype=np.uint16).tofile(folder / "train.bin")
    with pytest.raises(ConfigError, match=r"data.path: .* has no val\*.bin shard"):
        build_data(DataConfig(kind="bin", path=folder))
    (folder / "val.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.path: shard .*val.bin' has no tokens"):
        build_data(DataConfig(kind="bin", path=folder))
    (folder / "val.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ConfigError, match="not whole uint16s"):
        build_data(DataConfig(kind="bin", path=folder))


def test_block_size_longer_than_validation_split(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    with pytest.raises(ConfigError, match=r"^data.block_size: 256 is too long for the val split"):
        build_data(DataConfig(kind="bin", path=tmp_path / "shards", block_size=256))


def test_unusable_cache_dir_names_the_field(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(ConfigError, match="data.cache_dir"):
        build_data(DataConfig(cache_dir=blocker, max_bytes=1000))


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"kind": "text"}, "data.path"),
        ({"kind": "stdlib", "path": "/tmp"}, "data.path"),
        ({"kind": "digits", "max_bytes": 10}, "data.max_bytes"),
        ({"kind": "stdlib", "vocab_size": 300}, "data.vocab_size"),
        ({"kind": "stdlib", "augment": True}, "data.augment"),
        ({"kind": "stdlib", "val_fraction": 1.5}, "val_fraction"),
        ({"kind": "stdlib", "batchsize": 4}, "batchsize"),
    ],
)
def test_config_errors_name_the_field(fields: dict[str, object], field_name: str) -> None:
    with pytest.raises(ValidationError, match=field_name):
        DataConfig.model_validate(fields)

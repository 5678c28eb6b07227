"""Runs tables: columns, FLOPs in place of tokens, Parquet, filters and bad input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from planner.errors import InputError
from planner.runs import load_runs


def _write(tmp_path: Path, frame: pd.DataFrame, name: str = "runs.csv") -> Path:
    path = tmp_path / name
    if name.endswith(".parquet"):
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


GOOD = pd.DataFrame({"params": [1e8, 2e8, 4e8], "tokens": [2e9, 4e9, 8e9], "loss": [3.1, 2.9, 2.7]})


def test_csv_and_parquet_load_the_same(tmp_path: Path) -> None:
    csv = load_runs(_write(tmp_path, GOOD))
    parquet = load_runs(_write(tmp_path, GOOD, "runs.parquet"))
    assert (csv.n_params == parquet.n_params).all() and (csv.loss == parquet.loss).all()


def test_flops_column_stands_in_for_tokens(tmp_path: Path) -> None:
    frame = GOOD.assign(flops=6 * GOOD.params * GOOD.tokens).drop(columns="tokens")
    runs = load_runs(_write(tmp_path, frame))
    assert runs.n_tokens == pytest.approx(GOOD.tokens.to_numpy())


def test_renamed_columns_and_where_filter(tmp_path: Path) -> None:
    frame = GOOD.rename(columns={"params": "N", "tokens": "D", "loss": "val"}).assign(
        tag=["a", "b", "a"]
    )
    runs = load_runs(
        _write(tmp_path, frame), params_col="N", tokens_col="D", loss_col="val", where={"tag": "a"}
    )
    assert len(runs) == 2


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (GOOD.drop(columns="loss"), "no column 'loss'"),
        (GOOD.drop(columns="tokens"), "neither a tokens column"),
        (GOOD.assign(loss=[3.0, -1.0, 2.0]), "column 'loss', row 2 \\(line 3\\)"),
        (GOOD.assign(params=[1e8, float("nan"), 1e9]), "column 'params', row 2"),
        (GOOD.assign(tokens=["1e9", "abc", "2e9"]), "'abc' is not a positive finite number"),
    ],
)
def test_bad_tables_name_the_column_and_row(
    tmp_path: Path, frame: pd.DataFrame, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        load_runs(_write(tmp_path, frame))


def test_unreadable_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_runs(tmp_path / "absent.csv")
    binary = tmp_path / "runs.parquet"
    binary.write_bytes(b"\x00\x01 not parquet")
    with pytest.raises(InputError, match="not a readable"):
        load_runs(binary)

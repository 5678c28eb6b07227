"""muP's coordinate check (trainer.coord_check, `scaleplan coord-check`): over a 16x range of
widths muP's activation sizes stay within x1.5 while SP's grow; a failing check exits 1 naming
the layers; bad widths are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studies.cli import main
from trainer.config import parse_config
from trainer.coord_check import coord_check


def small_gpt() -> dict:
    return {
        "model": {"n_layer": 2, "n_head": 2},
        "data": {"block_size": 32, "batch_size": 4, "max_bytes": 200_000},
    }


@pytest.mark.parametrize("kind", ["gpt", "mlp"])
def test_mup_coordinates_stay_flat_over_16x_while_sp_logits_grow(kind: str) -> None:
    raw = (
        small_gpt()
        if kind == "gpt"
        else {
            "model": {"kind": "mlp", "depth": 3},
            "data": {"kind": "digits", "batch_size": 64},
        }
    )
    widths = [64, 128, 256, 512, 1024] if kind == "gpt" else [32, 64, 128, 256, 512]
    result = coord_check(parse_config(raw), widths, steps=3, seeds=1, lr=1e-2)
    assert result.offending("mup", 1.5) == []
    for layer in result.coords["mup"]:
        assert max(result.spread("mup", layer, s) for s in range(3)) <= 1.5, layer
    # SP's logits after the first update grow with width: the reason its optimal LR drifts
    assert result.spread("sp", "logits", 1) > 3.0
    assert result.coords["sp"]["logits"][1][-1] > result.coords["sp"]["logits"][1][0]
    assert any(name.startswith("logits") for name in result.offending("sp", 1.5))


def test_the_command_writes_the_plot_and_exits_1_naming_unstable_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["coord-check", "--model", "mlp", "--widths", "32,128", "--steps", "2", "--seeds", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["offending"] == [] and Path(payload["plot"]).is_file()
    assert set(payload["coords"]) == {"sp", "mup"}
    # a tolerance no finite-width network meets: the check fails and says where
    assert main([*args, "--out", str(tmp_path / "b"), "--tolerance", "1.0001"]) == 1
    err = capsys.readouterr().err
    assert "muP coordinates change with width:" in err and "hidden" in err
    assert (tmp_path / "b" / "coord_check.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--widths", "64"], "--widths: [64]; expected two or more"),
        (["--widths", "64,66"], "--widths: width 66: model.n_head: 4 does not divide"),
        (["--widths", "64,x"], "not a comma-separated list"),
        (["--tolerance", "0.5"], "--tolerance: 0.5; expected a ratio above 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    try:
        code = main(["coord-check", *argv, "--out", str(tmp_path)])
    except SystemExit as exit_:  # argparse's own checks exit from inside the parser
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1

"""`scaleplan transfer-check` (studies.transfer): LR sweeps per width under SP and muP as one study
on the engine, each stage the same learning rates; the optimum from a parabola; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studies.cli import main
from studies.transfer import optimal_log2_lr


def test_the_optimum_is_the_parabolas_vertex_and_an_edge_is_flagged() -> None:
    points = [(x, (x + 7.3) ** 2 + 2.0) for x in (-10.0, -9.0, -8.0, -7.0, -6.0, -5.0)]
    x, edge = optimal_log2_lr(points)
    assert x == pytest.approx(-7.3) and not edge
    x, edge = optimal_log2_lr([(-3.0, 2.0), (-2.0, 2.5), (-1.0, 3.0)])
    assert x == pytest.approx(-3.0) and edge  # falling off the low end: widen the range
    assert optimal_log2_lr([(-4.0, float("nan")), (-3.0, 1.0)]) == (-3.0, True)


def test_a_small_transfer_check_writes_its_study_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tc"
    argv = ["transfer-check", "--widths", "16,32", "--trials", "3", "--steps", "15"]
    assert main([*argv, "--out", str(out), "--tracking-uri", "none", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["sp"]["optimal_log2_lr"]) == {"16", "32"}
    assert payload["mup"]["drift"] >= 0 and Path(payload["plot"]).is_file()
    study = (out / "transfer-check.yaml").read_text()
    assert "mup-w32" in study and "parametrization.name: mup" in study
    # every stage tried the same learning rates: the curves share their x values
    records = json.loads((out / "transfer_check.json").read_text())
    assert records["sp"]["optimal_log2_lr"].keys() == records["mup"]["optimal_log2_lr"].keys()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--widths", "32"], "--widths: [32]; expected two or more"),
        (["--trials", "2"], "expected at least 3 learning rates"),
        (["--log2-lr", "-3", "-5"], "--log2-lr: -3 -5; expected LOW < HIGH"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["transfer-check", *argv, "--out", str(tmp_path), "--tracking-uri", "none"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_horizon_check_fits_the_horizon_law_that_transfer_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hc"
    argv = ["transfer-check", "--widths", "16", "--horizons", "20,40", "--trials", "3"]
    assert main([*argv, "--out", str(out), "--tracking-uri", "none", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["mup"]["optimal_log2_lr"]) == {"20", "40"} and "sp" not in payload
    law = payload["horizon_law"]
    optima = payload["mup"]["optimal_log2_lr"]  # two horizons: the line through both optima
    assert law["b"] == pytest.approx(-(optima["40"] - optima["20"]), abs=1e-3)
    assert law["horizons"] == [20, 40] and law["b_stderr"] is None
    study = (out / "transfer-check.yaml").read_text()
    assert "steps: 40" in study and "mup-h20" in study
    proxy = tmp_path / "proxy.yaml"
    proxy.write_text(
        "steps: 20\nmodel: {kind: gpt, n_layer: 1, n_head: 2, d_model: 16, tie_embeddings: "
        "false}\noptimizer: {lr: 0.01}\nparametrization: {name: mup, base_width: 16}\n"
    )
    transfer = ["transfer", "--from", str(proxy), "--steps", "80", "--json"]
    assert main([*transfer, "--horizon-from", str(out / "transfer_check.json")]) == 0
    moved = json.loads(capsys.readouterr().out)["config"]["optimizer"]["lr"]
    assert moved == pytest.approx(0.01 * 4 ** -law["b"], rel=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--horizons", "30"], "--horizons: [30]; expected two or more"),
        (["--horizons", "10,20", "--depths", "1,2"], "--horizons / --depths: both given"),
    ],
)
def test_a_horizon_check_needs_two_horizons_and_one_axis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["transfer-check", *argv, "--out", str(tmp_path), "--tracking-uri", "none"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1

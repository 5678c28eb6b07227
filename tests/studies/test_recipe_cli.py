"""`scaleplan plan ... --emit-config` writes a recipe that `scaleplan train` runs as is;
`--gpus` adds the memory and parallelism plan; `scaleplan memory` prints ZeRO's Figure 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from studies.cli import main
from trainer.config import load_config


def test_the_emitted_recipe_trains_as_is_on_its_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    args = ["plan", "--compute", "1e12", "--law", "epoch2024", "--seq-len", "128"]
    assert main([*args, "--emit-config", str(recipe_file), "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)
    config = load_config(recipe_file)
    assert config.steps == recipe["steps"] and config.data.batch_size == recipe["batch_sequences"]
    assert (config.model.n_layer, config.model.d_model) == (
        recipe["shape"]["n_layer"],
        recipe["shape"]["d_model"],
    )
    assert config.optimizer.lr == pytest.approx(recipe["learning_rate"], rel=1e-3)
    # D = C / (6 N) at the shape's own N: the run spends the budget
    assert recipe["steps"] * recipe["tokens_per_step"] >= recipe["shape_tokens"]
    assert 6 * recipe["shape_params"] * recipe["shape_tokens"] == pytest.approx(1e12)

    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == recipe["steps"]
    # the budget it was planned for, in the trainer's count (FLOPs per token / 6 leaves out the
    # embedding that Epoch's law counts in N: 65.5k against 73.7k here)
    assert result["flops"] == pytest.approx(1e12 * 65_536 / 73_728, rel=0.02)
    assert result["final_val_loss"] < result["val_curve"][0][1] - 2.0  # it learned


def test_a_recipe_on_gpus_carries_its_split(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--compute", "1e23", "--law", "epoch2024", "--seq-len", "2048"]
    assert main([*args, "--gpus", "64", "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)
    split = recipe["split"]
    assert split["fits"] and split["data"] * split["tensor"] * split["pipeline"] == 64
    assert split["total_gb"] < 0.9 * 80
    assert recipe["wall_clock_hours"] == pytest.approx(recipe["gpu_hours"] / 64)
    assert recipe["alternatives"][0] == split


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--gpus", "2"], "--gpus: the model fits no split of 2 h100 GPUs"),
        (["--gpus", "0"], "--gpus: 0 is not allowed"),
        (["--compute", "1e23", "1e24", "--gpus", "8"], "a recipe is for one budget and one law"),
        (["--base", "nowhere.yaml"], "--base: 'nowhere.yaml' does not exist; expected a YAML file"),
    ],
)
def test_bad_recipe_input_is_one_line_and_exit_2(
    extra: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", "--compute", "1e23", "--law", "epoch2024"]
    if "--compute" in extra:
        args = ["plan", "--law", "epoch2024"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_base_config_keeps_its_data_and_tracking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.yaml"
    data = {"kind": "stdlib", "max_bytes": 300_000, "cache_dir": str(tmp_path / "cache")}
    base.write_text(yaml.safe_dump({"data": data, "tracking": {"enabled": False}}))
    out = tmp_path / "recipe.yaml"
    args = ["plan", "--compute", "1e12", "--law", "epoch2024", "--seq-len", "64"]
    assert main([*args, "--base", str(base), "--emit-config", str(out)]) == 0
    config = load_config(out)
    assert config.data.max_bytes == 300_000 and config.data.block_size == 64
    assert not config.tracking.enabled
    assert "compute-optimal recipe" in capsys.readouterr().out


def test_memory_prints_zero_figure_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory", "--params", "7.5e9", "--gpus", "64", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    totals = [row["total"] for row in shown["model_states_gb"]]
    assert totals == pytest.approx([120.0, 31.4, 16.6, 1.9], abs=0.05)
    assert shown["splits"][0]["fits"]
    assert main(["memory", "--shape", "32,4096,31", "--gpus", "8"]) == 2
    assert "--shape: 32,4096,31" in capsys.readouterr().err


def test_a_ladder_law_counts_flops_and_its_recipe_spends_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a law fitted to a ladder's table: N is FLOPs per token / 6 (attention included), which at
    # context 128 is 1.3-2.3x a small model's non-embedding count; its recipe must spend C
    law = {"E": 1.0, "A": 50.0, "B": 300.0, "alpha": 0.4, "beta": 0.35}
    runs = tmp_path / "runs.csv"
    rows = ["params,tokens,loss,n_counts"] + [
        f"{n},{d},{law['E'] + law['A'] / n ** law['alpha'] + law['B'] / d ** law['beta']},flops"
        for n in (1e4, 3e4, 1e5, 3e5)
        for d in (1e6, 4e6, 1.6e7)
    ]
    runs.write_text("\n".join(rows) + "\n")
    law_file = tmp_path / "ladder-law.json"
    assert main(["fit", str(runs), "--bootstrap", "0", "--out", str(law_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_counts"] == "flops"
    recipe_file = tmp_path / "recipe.yaml"
    args = ["plan", "--compute", "1e12", "--law", str(law_file), "--seq-len", "128"]
    assert main([*args, "--vocab-size", "256", "--emit-config", str(recipe_file), "--json"]) == 0
    recipe = json.loads(capsys.readouterr().out)
    out = tmp_path / "run"
    assert main(["train", str(recipe_file), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the trained shape's own FLOPs per token / 6 is near the law's N, and the run costs C
    n_flops = result["flops"] / (result["steps"] * recipe["tokens_per_step"]) / 6
    assert 0.7 < n_flops / recipe["n_params"] < 1.4
    assert result["flops"] == pytest.approx(1e12, rel=0.05)
    # the fit's n_counts is refused when it is not one kind
    runs.write_text(runs.read_text().replace(",flops\n", ",total\n", 1))
    assert main(["fit", str(runs), "--bootstrap", "0"]) == 2
    assert "n_counts column has ['flops', 'total']" in capsys.readouterr().err


def test_a_law_keeps_only_its_finite_bootstrap_refits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a refit can overflow (A to inf); the law file must still load (JSON has no inf)
    import dataclasses

    import numpy as np

    import planner.fit

    real_fit = planner.fit.fit_law

    def one_overflows(*args: object, **options: object) -> object:
        result = real_fit(*args, **options)  # type: ignore[arg-type]
        samples = np.array(result.bootstrap)
        samples[0, 1] = np.inf
        return dataclasses.replace(result, bootstrap=samples)

    monkeypatch.setattr(planner.fit, "fit_law", one_overflows)
    runs = tmp_path / "runs.csv"
    rows = ["params,tokens,loss"] + [
        f"{n},{d},{1.0 + 50.0 / n**0.4 + 300.0 / d**0.35}"
        for n in (1e4, 3e4, 1e5)
        for d in (1e6, 4e6, 1.6e7)
    ]
    runs.write_text("\n".join(rows) + "\n")
    law = tmp_path / "law.json"
    assert main(["fit", str(runs), "--bootstrap", "20", "--out", str(law), "--json"]) == 0
    capsys.readouterr()
    assert len(json.loads(law.read_text())["bootstrap"]) == 19
    assert main(["plan", "--compute", "1e12", "--law", str(law), "--json"]) == 0

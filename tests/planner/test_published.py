"""Published laws reproduce the papers' numbers; law files round-trip and reject bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.allocate import compute_optimal
from planner.errors import InputError
from planner.published import PUBLISHED, Law, load_law, published_law, save_law

GOPHER_FLOPS = 5.76e23


def test_hoffmann2022_gives_40b_at_the_gopher_budget() -> None:
    # Hoffmann et al. 2022, sec. 3.3: Approach 3 gives 40B parameters at Gopher's compute.
    row = compute_optimal(published_law("hoffmann2022"), [GOPHER_FLOPS])[0]
    assert row["n_params"] == pytest.approx(40e9, rel=0.02)


@pytest.mark.parametrize(
    ("name", "billions"), [("hoffmann2022-approach1", 67), ("hoffmann2022-approach2", 63)]
)
def test_approach_1_and_2_allocations_match_the_paper(name: str, billions: float) -> None:
    law = published_law(name)
    row = compute_optimal(law, [GOPHER_FLOPS])[0]
    assert row["n_params"] == pytest.approx(billions * 1e9, rel=1e-9)
    assert row["loss"] is None  # allocation rules predict no loss
    doubled = compute_optimal(law, [4 * GOPHER_FLOPS])[0]["n_params"] / row["n_params"]
    assert doubled == pytest.approx(4**law.allocation.n_exponent)  # type: ignore[union-attr]


def test_kaplan2020_uses_its_c_to_the_073_allocation() -> None:
    law = published_law("kaplan2020")
    pf_day = 8.64e19
    rows = compute_optimal(law, [pf_day, 10 * pf_day])
    assert rows[0]["n_params"] == pytest.approx(1.3e9)  # Kaplan et al. 2020, Fig. 14
    assert rows[1]["n_params"] / rows[0]["n_params"] == pytest.approx(10**0.73)
    assert law.n_counts == "non-embedding"


def test_epoch2024_gives_about_18_tokens_per_parameter() -> None:
    # Besiroglu et al. 2024: about 18 tokens per parameter at 5.88e23 FLOPs (vs ~20 for Chinchilla).
    row = compute_optimal(published_law("epoch2024"), [5.88e23])[0]
    assert row["tokens_per_param"] == pytest.approx(18.4, abs=0.5)


def test_every_published_law_has_a_citation_and_valid_numbers() -> None:
    assert {"hoffmann2022", "hoffmann2022-rounded", "epoch2024", "kaplan2020"} <= set(PUBLISHED)
    for name in PUBLISHED:
        law = published_law(name)
        assert "arXiv" in law.citation
        rows = compute_optimal(law, [1e20, 1e24])
        assert rows[1]["n_params"] > rows[0]["n_params"] > 0


def test_law_file_round_trip(tmp_path: Path) -> None:
    law = published_law("hoffmann2022")
    path = save_law(law, tmp_path / "law.json")
    assert load_law(path) == law
    assert [p.name for p in tmp_path.iterdir()] == ["law.json"]  # no temp files left behind


def test_bad_law_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="neither a published law"):
        load_law("chinchilla2099")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="not a readable law file"):
        load_law(broken)
    missing = tmp_path / "missing.json"
    missing.write_text(
        json.dumps(
            {"name": "x", "form": "chinchilla", "citation": "me", "params": {"E": 1.0, "A": 1.0}}
        )
    )
    with pytest.raises(InputError, match="missing: B, alpha, beta"):
        load_law(missing)


def test_law_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="extra"):
        Law.model_validate(
            {
                "name": "x",
                "form": "allocation",
                "citation": "c",
                "colour": "red",
                "allocation": {"n_coefficient": 1.0, "n_exponent": 0.5},
            }
        )

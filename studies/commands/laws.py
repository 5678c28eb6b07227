"""`scaleplan laws`: the published scaling laws with their citations."""

from __future__ import annotations

import argparse

from studies.commands import output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _summary(law: object) -> str:
    from planner.published import Law

    assert isinstance(law, Law)
    if law.form == "allocation":
        assert law.allocation is not None
        return f"N_opt ∝ C^{law.allocation.n_exponent:g}"
    text = ", ".join(f"{name}={value:.4g}" for name, value in law.params.items())
    if law.allocation is not None:
        text += f"; N_opt ∝ C^{law.allocation.n_exponent:g}"
    return text


def run(args: argparse.Namespace) -> int:
    from planner.published import PUBLISHED, published_law

    laws = [published_law(name) for name in PUBLISHED]
    if args.json:
        output.print_json(
            [law.model_dump(exclude={"bootstrap"}, exclude_none=True) for law in laws]
        )
        return 0
    rows = [[law.name, law.form, law.n_counts, _summary(law), law.citation] for law in laws]
    output.print_table(
        "Published scaling laws (use with --law NAME)",
        ["name", "form", "N counts", "parameters", "source"],
        rows,
        caption="Notes and intervals: scaleplan laws --json",
    )
    return 0

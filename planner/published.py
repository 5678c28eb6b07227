"""Scaling laws as data: the law file model, and the published laws by name.

A law is either a parametric loss surface L(N, D) (``form`` chinchilla or kaplan), optionally with a
power-law allocation rule that overrides the surface's own optimum (Kaplan's C^0.73), or an
allocation rule alone (``form`` allocation: Hoffmann et al.'s Approaches 1 and 2, or an Approach 2
fit of your own), which answers N and D but predicts no loss.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from planner.errors import InputError
from planner.laws import FORMS, Form

PF_DAY_FLOPS = 1e15 * 24 * 3600  # one petaflop/s-day, Kaplan et al.'s compute unit


class Allocation(BaseModel):
    """Compute-optimal size as a power law: N_opt = n_coefficient * (C / compute_unit_flops)^a."""

    model_config = ConfigDict(extra="forbid")

    n_coefficient: float = Field(gt=0, description="N_opt at one compute unit.")
    n_exponent: float = Field(gt=0, lt=1, description="a in N_opt ∝ C^a; D_opt = C / 6N ∝ C^(1-a).")
    compute_unit_flops: float = Field(1.0, gt=0, description="FLOPs in one compute unit.")
    n_exponent_interval: tuple[float, float] | None = Field(
        None, description="Published or bootstrap interval on the exponent a."
    )
    d_exponent: float | None = Field(None, description="b in D_opt ∝ C^b, when fitted separately.")
    d_exponent_interval: tuple[float, float] | None = Field(None, description="Interval on b.")

    def n_opt(self, compute_flops: np.ndarray) -> np.ndarray:
        return np.asarray(
            self.n_coefficient * (compute_flops / self.compute_unit_flops) ** self.n_exponent
        )


class Law(BaseModel):
    """A scaling law as stored in a law file (JSON) or built in."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short name, e.g. hoffmann2022 or the stem of a fitted file.")
    form: Literal["chinchilla", "kaplan", "allocation"] = Field(description="Parametric form.")
    params: dict[str, float] = Field(default_factory=dict, description="The form's parameters.")
    citation: str = Field(description="Where the numbers come from.")
    n_counts: Literal["total", "non-embedding", "flops"] = Field(
        "total",
        description="What N counts: all parameters, the non-embedding ones, or flops: training "
        "FLOPs per token / 6 (a ladder's N, planner.shape.flop_params).",
    )
    loss_units: str = Field("nats/token", description="What the predicted loss measures.")
    allocation: Allocation | None = Field(
        None, description="Power-law allocation used instead of the surface's own optimum."
    )
    interval_level: float | None = Field(None, gt=0, lt=1, description="Level of `intervals`.")
    intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="Published or bootstrap intervals per parameter."
    )
    standard_errors: dict[str, float] = Field(
        default_factory=dict, description="Published standard errors per parameter."
    )
    bootstrap: list[list[float]] | None = Field(
        None, description="Bootstrap parameter samples, columns in the form's parameter order."
    )
    fit: dict[str, object] | None = Field(None, description="How a fitted law was obtained.")
    notes: str = Field("", description="Caveats a user should read.")

    @model_validator(mode="after")
    def _check(self) -> Law:
        if self.form == "allocation":
            if self.allocation is None:
                raise ValueError("form 'allocation' needs an 'allocation' block")
            return self
        form = FORMS[self.form]
        form.check_params(self.params, f"law '{self.name}'")
        if self.bootstrap is not None:
            widths = {len(row) for row in self.bootstrap}
            if widths != {len(form.param_names)}:
                raise ValueError(
                    f"bootstrap rows must have {len(form.param_names)} values"
                    f" ({', '.join(form.param_names)})"
                )
        return self

    @property
    def surface(self) -> Form | None:
        """The loss surface, or None for an allocation-only law."""
        return None if self.form == "allocation" else FORMS[self.form]

    def bootstrap_params(self) -> list[dict[str, float]]:
        form = self.surface
        if form is None or not self.bootstrap:
            return []
        return [dict(zip(form.param_names, row, strict=True)) for row in self.bootstrap]


# Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", arXiv 2203.15556).
_HOFFMANN = "Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, arXiv:2203.15556"
_BESIROGLU = "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt, arXiv:2404.10102"
_KAPLAN = "Kaplan et al. 2020, Scaling Laws for Neural Language Models, arXiv:2001.08361"
_MASSIVETEXT = "nats/token on MassiveText (Chinchilla's data)"
_GOPHER_FLOPS = 5.76e23


def _anchored(n_at_gopher: float, exponent: float) -> float:
    """Coefficient k of N = k C^a that passes through the paper's Gopher-budget estimate."""
    return n_at_gopher / _GOPHER_FLOPS**exponent


_LAWS: tuple[Law, ...] = (
    Law(
        name="hoffmann2022",
        form="chinchilla",
        params={
            "E": 1.69337368,
            "A": 406.401018,
            "B": 410.722827,
            "alpha": 0.33917084,
            "beta": 0.2849083,
        },
        citation=f"{_HOFFMANN}, Approach 3 (eq. 10), unrounded values",
        loss_units=_MASSIVETEXT,
        notes="Besiroglu et al. 2024 could not reproduce these values from the paper's own data.",
    ),
    Law(
        name="hoffmann2022-rounded",
        form="chinchilla",
        params={"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
        citation=f"{_HOFFMANN}, Approach 3 (eq. 10), as printed",
        loss_units=_MASSIVETEXT,
    ),
    Law(
        name="epoch2024",
        form="chinchilla",
        params={"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658},
        citation=f"{_BESIROGLU}, Table 1 refit of Hoffmann et al.'s Figure 4 data",
        loss_units=_MASSIVETEXT,
        standard_errors={"E": 0.03, "A": 124.58, "B": 1293.23, "alpha": 0.02, "beta": 0.02},
        notes=(
            "Standard errors as published (Table 1). The bootstrap samples behind plan's "
            "intervals come from scaleplan's own replication of the refit "
            "(benchmarks/epoch_bootstrap.py), since the paper publishes no samples."
        ),
    ),
    Law(
        name="kaplan2020",
        form="kaplan",
        params={"N_c": 6.4e13, "D_c": 1.8e13, "alpha_N": 0.076, "alpha_D": 0.095},
        citation=f"{_KAPLAN}, eq. 1.5 (L(N, D)) and Fig. 14 (N_opt = 1.3e9 C^0.73, C in PF-days)",
        n_counts="non-embedding",
        loss_units="nats/token on WebText2 (GPT-2 tokenizer, context 1024)",
        allocation=Allocation(
            n_coefficient=1.3e9, n_exponent=0.73, compute_unit_flops=PF_DAY_FLOPS
        ),
        notes=(
            "The C^0.73 allocation comes from early-stopped runs with a fixed LR schedule; "
            "Hoffmann et al. 2022 attribute the gap to their 0.5 to that."
        ),
    ),
    Law(
        name="hoffmann2022-approach1",
        form="allocation",
        citation=f"{_HOFFMANN}, Approach 1 (Table 2: a = 0.50; Table 3: 67B at the Gopher budget)",
        allocation=Allocation(
            n_coefficient=_anchored(67e9, 0.50),
            n_exponent=0.50,
            n_exponent_interval=(0.488, 0.502),
            d_exponent=0.50,
            d_exponent_interval=(0.501, 0.512),
        ),
        notes="Allocation only: predicts N and D, not the loss.",
    ),
    Law(
        name="hoffmann2022-approach2",
        form="allocation",
        citation=f"{_HOFFMANN}, Approach 2 (Table 2: a = 0.49; 63B at the Gopher budget)",
        allocation=Allocation(
            n_coefficient=_anchored(63e9, 0.49),
            n_exponent=0.49,
            n_exponent_interval=(0.462, 0.534),
            d_exponent=0.51,
            d_exponent_interval=(0.483, 0.529),
        ),
        notes="Allocation only: predicts N and D, not the loss.",
    ),
)

PUBLISHED: dict[str, Law] = {law.name: law for law in _LAWS}

_DATA_DIR = Path(__file__).with_name("data")


def published_law(name: str) -> Law:
    """A built-in law by name (see ``scaleplan laws``), with bootstrap samples where shipped."""
    try:
        law = PUBLISHED[name]
    except KeyError:
        raise InputError(
            f"--law: '{name}' is neither a published law ({', '.join(PUBLISHED)}) nor a law file"
        ) from None
    samples = _DATA_DIR / f"{name}_bootstrap.json"
    if law.bootstrap is None and samples.is_file():
        law = law.model_copy(update={"bootstrap": json.loads(samples.read_text())["bootstrap"]})
    return law


def load_law(name_or_path: str | os.PathLike[str]) -> Law:
    """A published law by name, or a law file written by ``scaleplan fit``."""
    text = str(name_or_path)
    if text in PUBLISHED:
        return published_law(text)
    path = Path(text)
    if not path.exists():
        published_law(text)  # raises the error that lists the published names
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable law file ({err})") from None
    if isinstance(raw, dict) and raw.get("kind") == "hparams":
        raise InputError(
            f"{path}: a hyperparameter law (kind hparams), not a loss law; it goes to "
            "--hparams (`scaleplan fit` without --approach hparams writes loss laws)"
        )
    try:
        return Law.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "law"
        raise InputError(f"{path}: {where}: {first['msg']}") from None


def save_law(law: Law, path: str | os.PathLike[str]) -> Path:
    """Write a law file atomically (temp file in the same folder, then rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, law.model_dump_json(indent=2, exclude_none=True) + "\n")
    return target


def write_atomic(target: Path, text: str) -> None:
    """Write text so that ``target`` is either absent, the old file, or complete."""
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a law or result file is meant to be shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

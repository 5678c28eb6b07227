"""Studies: hyperparameter sweeps and scaling ladders over the trainer, and the `scaleplan` CLI.

>>> from studies import prepare_study, run_sweep  # doctest: +SKIP
>>> study = prepare_study("quickstart.yaml", ["stages.fine.trials=4"])  # doctest: +SKIP
>>> summary = run_sweep(study, runs_dir="runs")  # doctest: +SKIP
>>> summary["best_value"], summary["best_params"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from studies.errors import StudyError
from trainer.exports import lazy_getattr

if TYPE_CHECKING:
    from studies.backends import load_stage_reports
    from studies.config import StudyConfig
    from studies.study_file import load_study
    from studies.sweep import prepare_study, run_study, run_sweep

# Public names and the module that defines each; imported on first use, so that the CLI's
# `import studies` stays light (`scaleplan plan` never imports torch, optuna or ray).
_EXPORTS = {
    "StudyConfig": "studies.config",
    "load_study": "studies.study_file",
    "load_stage_reports": "studies.backends",
    "prepare_study": "studies.sweep",
    "run_study": "studies.sweep",
    "run_sweep": "studies.sweep",
}

__all__ = [
    "StudyConfig",
    "StudyError",
    "load_stage_reports",
    "load_study",
    "prepare_study",
    "run_study",
    "run_sweep",
]

__getattr__ = lazy_getattr("studies", _EXPORTS)

"""The Ray Tune backend, by concern:

- `studies.backends.ray.runner`: a stage as a Tune experiment (start or connect to Ray, run or
  restore the stage, one trial in a worker);
- `studies.backends.ray.adapters`: the search algorithm and schedulers as Tune subclasses, and
  the atomic storage filesystem;
- `studies.backends.ray.pbt`: Population Based Training's trials and checkpoints;
- `studies.backends.ray.records`: Tune's results as trial records, the stage files beside each
  experiment, reading a study back without Ray;
- `studies.backends.ray.trial`: what a trial carries into a worker.

Ray is imported inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from studies.config import StudyConfig
    from studies.mlflow_study import StudyTracker
    from studies.records import StageReport, SweepView, TrialOutcome

__all__ = ["BACKEND", "RayBackend"]


class RayBackend:
    """The `studies.backends.Backend` on Ray Tune."""

    name = "ray"

    def preflight(self, study: StudyConfig, runs_dir: Path, ray_address: str | None) -> None:
        import importlib.util

        from studies.backends.ray.runner import check_ray_address
        from studies.errors import StudyError

        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.tune") is None:
            raise StudyError(
                "backend ray: Ray Tune is not installed (pip install 'ray[tune]'); "
                "use backend optuna"
            )
        check_ray_address(ray_address)

    def study_exists(self, study: StudyConfig, runs_dir: Path) -> bool:
        return True  # Tune restores what it finds, stage by stage; the MLflow parent resumes

    def run(
        self,
        study: StudyConfig,
        *,
        runs_dir: Path,
        view: SweepView,
        tracker: StudyTracker | None,
        ray_address: str | None,
        trial_fn: Callable[..., TrialOutcome] | None,
    ) -> list[StageReport]:
        from studies.backends.ray.runner import run_ray

        return run_ray(
            study,
            runs_dir=runs_dir,
            view=view,
            tracker=tracker,
            ray_address=ray_address,
            trial_fn=trial_fn,
        )

    def load_reports(self, name: str, storage: str) -> list[StageReport]:
        from studies.backends.ray.records import load_stage_reports

        return load_stage_reports(name, storage)


BACKEND = RayBackend()

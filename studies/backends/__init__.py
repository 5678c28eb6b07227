"""Search backends: one small `Backend` contract, and a table from name to backend.

A backend runs a study's stages on its engine and reads a stored study back; everything else
(the study file, the objective, what each stage's space and start points are, the summary,
MLflow, the plots) is the same for every backend and lives outside this folder. Only this folder
knows which engine runs.

- ``optuna`` (`studies.backends.optuna`): one Optuna study per stage in a journal file, SQLite or
  an RDB; trials by ask and tell, in this process or ``workers`` spawned ones.
- ``ray`` (`studies.backends.ray`): one Ray Tune experiment per stage; Optuna's samplers choose,
  Tune's schedulers stop.

Adding a backend is one module with a ``BACKEND`` object that satisfies `Backend`, and one row
in `BACKENDS`. Importing this package is cheap: a backend's module (and its engine) is imported
on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from studies.errors import StudyError

if TYPE_CHECKING:
    from studies.config import StudyConfig
    from studies.mlflow_study import StudyTracker
    from studies.records import StageReport, SweepView, TrialOutcome

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendInfo",
    "backend_for_storage",
    "backend_info",
    "get_backend",
    "load_stage_reports",
    "locate_study",
]


class Backend(Protocol):
    """What the sweep asks of a search backend."""

    name: str

    def preflight(self, study: StudyConfig, runs_dir: Path, ray_address: str | None) -> None:
        """Everything the backend can check before a trial starts (its storage opens, its
        cluster answers); StudyError naming the field."""

    def study_exists(self, study: StudyConfig, runs_dir: Path) -> bool:
        """Whether the storage already holds this study (a resumed sweep)."""

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
        """Run (or resume) every stage; one report per stage, in order."""

    def load_reports(self, name: str, storage: str) -> list[StageReport]:
        """The stages of study `name` in `storage`, without the study file."""


@dataclass(frozen=True)
class BackendInfo:
    """What is known of a backend without importing it."""

    name: str
    engine: str  # what runs the trials, as users know it
    module: str  # holds BACKEND
    storage_schemes: tuple[str, ...]  # URL schemes its storage takes; no scheme: a local path
    default_storage: str  # under runs/<study>/
    storage_is_folder: bool  # a local storage of this backend is a folder (else a file)
    install: str  # what to install when its engine is missing
    pruners: tuple[str, ...]  # the stage pruners it runs
    in_process: bool  # with one worker, trials run in the sweep's own process


# schemes SQLAlchemy (hence Optuna's RDBStorage) speaks; a value without a scheme is a journal
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
# what Ray Tune's storage_path accepts through pyarrow; a value without a scheme is a folder
RAY_STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "abfs", "abfss", "az")

BACKENDS: dict[str, BackendInfo] = {
    "optuna": BackendInfo(
        name="optuna",
        engine="Optuna",
        module="studies.backends.optuna",
        storage_schemes=RDB_SCHEMES,
        default_storage="optuna.journal",
        storage_is_folder=False,
        install="optuna",
        pruners=("asha", "hyperband", "median", "none"),
        in_process=True,
    ),
    "ray": BackendInfo(
        name="ray",
        engine="Ray Tune",
        module="studies.backends.ray",
        storage_schemes=RAY_STORAGE_SCHEMES,
        default_storage="ray",
        storage_is_folder=True,
        install="'ray[tune]'",
        pruners=("asha", "hyperband", "median", "pbt", "none"),
        in_process=False,
    ),
}


def backend_info(name: str) -> BackendInfo:
    if name not in BACKENDS:
        raise StudyError(f"backend: '{name}' is not one of: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def get_backend(name: str) -> Backend:
    """The backend called `name`; StudyError when it is unknown or its engine is missing."""
    info = backend_info(name)
    try:
        module = importlib.import_module(info.module)
    except ImportError as error:  # ModuleNotFoundError, or None in sys.modules
        missing = error.name or ""
        if missing == info.module or missing.split(".")[0] == name:
            raise StudyError(
                f"backend {name}: {info.engine} is not installed (pip install {info.install}); "
                f"use backend {next(n for n in BACKENDS if n != name)}"
            ) from None
        raise
    backend: Any = module.BACKEND
    return backend


def backend_for_storage(storage: str) -> str:
    """Which backend a storage value belongs to: a URL by its scheme, a local path by whether
    it is a folder (Ray's) or a file (an Optuna journal)."""
    scheme, sep, _ = storage.partition("://")
    if sep:
        for info in BACKENDS.values():
            if scheme.split("+")[0].lower() in info.storage_schemes:
                return info.name
        return "optuna"
    is_folder = Path(storage).is_dir()
    return next(info.name for info in BACKENDS.values() if info.storage_is_folder == is_folder)


def locate_study(name: str, storage: str | None, runs_dir: Path) -> tuple[str, str]:
    """(storage, backend) of the stored study `name`: `storage`'s backend, else the default
    storage of each backend under ``runs_dir/<name>/``, whichever exists."""
    if storage is not None:
        return storage, backend_for_storage(storage)
    found = [
        (info.name, (runs_dir / name / info.default_storage).absolute())
        for info in BACKENDS.values()
    ]
    present = [(backend, path) for backend, path in found if path.exists()]
    if len(present) > 1:
        raise StudyError(
            f"study: {runs_dir / name} holds studies of several backends "
            f"({', '.join(b for b, _ in present)}); name the study file or --storage"
        )
    backend, path = present[0] if present else found[0]
    return str(path), backend


def load_stage_reports(name: str, storage: str, backend: str | None = None) -> list[StageReport]:
    """The stages of study `name` in `storage` (a journal, database URL, folder or URI; its
    backend told from it when not given), in order, without the study file."""
    return get_backend(backend or backend_for_storage(storage)).load_reports(name, storage)

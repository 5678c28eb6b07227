"""The packages' public names: `from trainer import train` and `from studies import run_sweep`
resolve on first use (that `import studies` imports no torch or optuna is checked by
tests/studies/test_cli.py::test_plan_imports_no_torch_ray_or_optuna)."""

from __future__ import annotations

import pytest


def test_lazy_names_are_the_defining_modules_objects() -> None:
    import studies
    import studies.sweep
    import trainer
    import trainer.loop

    assert trainer.train is trainer.loop.train
    assert studies.run_sweep is studies.sweep.run_sweep
    for package in (trainer, studies):
        assert set(package.__all__) >= set(package._EXPORTS)
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)


def test_an_unknown_name_is_an_attribute_error_naming_the_package() -> None:
    import studies

    with pytest.raises(AttributeError, match="module 'studies' has no attribute 'run_swep'"):
        studies.run_swep  # noqa: B018

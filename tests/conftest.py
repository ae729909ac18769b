"""Shared fixtures: paths to the reference models and a CLI runner that keeps stdout and stderr apart."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


@pytest.fixture
def models_dir() -> Path:
    return MODELS


@pytest.fixture
def cli():
    """Run the onnxcomp CLI in-process: ``cli("inspect", path)`` -> click Result."""
    from onnxcomp.cli import main

    def invoke(*args):
        try:
            runner = CliRunner(mix_stderr=False)
        except TypeError:  # click >= 8.2 keeps stderr apart by default
            runner = CliRunner()
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def pytest_collection_modifyitems(config, items):
    """Tests marked ``timing`` assert wall-clock ratios, which a loaded machine breaks: they run
    only when the ``-m`` expression names them (``pytest -m timing``), whatever else it selects."""
    if "timing" in (config.getoption("markexpr") or ""):
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("timing") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def feature_cache(tmp_path, monkeypatch):
    """Transfer tests: features cached in the test's own folder, not in ~/.cache."""
    monkeypatch.setenv("ONNXCOMP_FEATURE_CACHE", str(tmp_path / "features"))

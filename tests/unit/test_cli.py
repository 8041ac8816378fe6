"""The fp8train command and train.py's checks on their arguments: bad input is a message and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp8train.cli.train import run_dir_problems


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("a file, not a folder")
    return path


@pytest.mark.parametrize("suffix", ["", "/run", "/run_${model.name}", "/${now:%Y-%m-%d}/run"])
def test_a_run_dir_in_or_at_a_file_is_named(a_file, suffix):
    (problem,) = run_dir_problems([f"hydra.run.dir={a_file}{suffix}", "optim.lr=1e-3"])
    assert problem.startswith(f"hydra.run.dir={a_file}{suffix}: {a_file} is a file, not a folder")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
@pytest.mark.parametrize("value", ["/proc/fp8train_run", "/proc/${now:%H-%M}"])
def test_a_run_dir_that_cannot_be_created_is_named(value):
    (problem,) = run_dir_problems([f"hydra.run.dir={value}"])
    assert "cannot create folders in /proc" in problem


@pytest.mark.parametrize("value", ["new/run", "new/run_${model.name}", "${now:%Y}", "."])
def test_a_run_dir_that_can_be_created_passes_and_nothing_is_made(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    assert run_dir_problems([f"hydra.run.dir={value}"]) == []
    assert list(tmp_path.iterdir()) == []

"""tests/mutants.py stays runnable: each defect it puts back still matches the code exactly once,
and each test it cites exists (running the mutants themselves is the script's job, ≈ 1 min)."""

from __future__ import annotations

from pathlib import Path

import pytest

import mutants  # tests/ is on the path, as for bench_scripts

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_each_mutant_applies_once_and_cites_tests_that_exist(name):
    mutant = mutants.MUTANTS[name]
    assert (ROOT / mutant.path).read_text().count(mutant.old) == 1
    for cited in mutant.tests:
        path, _, function = cited.partition("::")
        assert (ROOT / path).is_file()
        assert not function or f"def {function}(" in (ROOT / path).read_text()

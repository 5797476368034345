"""The default recipes ship inside the package (YAML package data); configs/ holds copies as
examples. Every packaged default has its copy in configs/, byte for byte, and reads back into the
config the library uses when nothing else is said."""

from __future__ import annotations

from pathlib import Path

import pytest

import kronlm
from kronlm.compression import BudgetConfig, default_budget_config
from kronlm.compression.budget import DEFAULT_BUDGET
from kronlm.distill.stages import DEFAULT_RECIPE, RecoveryConfig

PACKAGE = Path(kronlm.__file__).resolve().parent
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PACKAGED = sorted(PACKAGE.rglob("defaults/*.yaml"))


def test_the_package_ships_its_defaults():
    assert {p.name for p in PACKAGED} == {"budget.yaml", "recover.yaml"}
    assert DEFAULT_BUDGET in PACKAGED and DEFAULT_RECIPE in PACKAGED


@pytest.mark.parametrize("packaged", PACKAGED, ids=lambda p: p.name)
def test_configs_holds_a_copy_of_each_packaged_default(packaged):
    example = CONFIGS / packaged.name
    assert example.is_file(), f"configs/{packaged.name} is missing: copy {packaged.relative_to(PACKAGE.parent)} there"
    assert example.read_text() == packaged.read_text()


def test_the_budget_defaults_are_the_library_defaults():
    # BudgetConfig() is what `kronlm compress --budget` and kronlm.compress(model, BudgetConfig(...)) start from.
    assert default_budget_config() == BudgetConfig() == BudgetConfig.from_file(CONFIGS / "budget.yaml")
    assert BudgetConfig().sensitivity_sequences == 32 and BudgetConfig().check_rounds == 2


def test_the_recovery_defaults_read_as_stages():
    stages = RecoveryConfig.from_file(CONFIGS / "recover.yaml").stages
    assert [s.mode for s in stages] == ["local", "blockwise", "end_to_end"]
    assert {s.recipe for s in stages} == {"kd"}

"""infantino.settings: configuration by environment, including the list of served tasks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infantino.settings import Settings


def test_tasks_default_to_expression_alone():
    settings = Settings()
    assert settings.tasks == ["expression"] and settings.default_task == "expression"


def test_tasks_come_from_a_comma_list_in_the_environment(monkeypatch):
    monkeypatch.setenv("INFANTINO_TASKS", " expression, age_group ,")
    settings = Settings()
    assert settings.tasks == ["expression", "age_group"] and settings.default_task == "expression"


@pytest.mark.parametrize("value", ["", " , ", "expression,expression"])
def test_empty_or_repeated_tasks_are_refused(monkeypatch, value):
    monkeypatch.setenv("INFANTINO_TASKS", value)
    with pytest.raises(ValidationError, match="tasks"):
        Settings()

"""infantino.settings: configuration by environment, including the list of served tasks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from infantino.settings import Settings


def test_tasks_default_to_expression_alone():
    settings = Settings()
    assert settings.models.tasks == ["expression"] and settings.models.default_task == "expression"


def test_tasks_come_from_a_comma_list_in_the_environment(monkeypatch):
    monkeypatch.setenv("INFANTINO_TASKS", " expression, age_group ,")
    settings = Settings()
    assert settings.models.tasks == ["expression", "age_group"] and settings.models.default_task == "expression"


@pytest.mark.parametrize("value", ["", " , ", "expression,expression"])
def test_empty_or_repeated_tasks_are_refused(monkeypatch, value):
    monkeypatch.setenv("INFANTINO_TASKS", value)
    with pytest.raises(ValidationError, match="tasks"):
        Settings()


def test_flat_names_reach_their_group_and_unknown_names_are_refused(tmp_path):
    settings = Settings(home=tmp_path, update_min_items=3, max_faces=2)
    assert settings.storage.home == tmp_path and settings.online.update_min_items == 3 and settings.faces.max_faces == 2
    with pytest.raises(ValidationError, match="unknown setting"):
        Settings(update_min_itemz=3)


def test_reading_settings_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("INFANTINO_HOME", str(tmp_path / "not-yet"))
    assert Settings().storage.database_url.endswith("not-yet/feedback.db")
    assert not (tmp_path / "not-yet").exists()


def test_the_readme_table_is_the_settings_table():
    """The README's configuration table is generated from the settings (`infantino settings`)."""
    from infantino.settings import markdown_table
    from testkit.server import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text()
    table = readme.split("<!-- settings-table:start -->\n", 1)[1].split("\n<!-- settings-table:end -->", 1)[0]
    assert table == markdown_table(), "README.md is out of date: paste the output of `infantino settings`"

"""The configuration reference is generated from the models and must be current."""

from __future__ import annotations

from conftest import REPO

from liverpipe.config_docs import reference_markdown
from liverpipe.settings import Settings, load_settings


def test_configuration_reference_is_current() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    assert text == reference_markdown(), (
        "run: python -m liverpipe.config_docs > docs/configuration.md"
    )
    for section in Settings.model_fields:
        assert f"## `[{section}]`" in text


def test_nested_environment_variables_reach_nested_settings() -> None:
    env = {"LIVERPIPE_TRAIN__AUGMENT__ELASTIC": "true", "LIVERPIPE_INGEST__MIN_NEW_CASES": "2"}
    settings = load_settings(None, None, env)
    assert settings.train.augment.elastic is True and settings.ingest.min_new_cases == 2

"""The configuration reference is generated from the models and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from liverpipe.config_docs import reference_markdown
from liverpipe.errors import ConfigError
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


def test_a_misspelt_model_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    """``model`` is one of the three architectures: "manett" fails when the config loads
    (and so in `liverpipe config`), not hours later when training starts."""
    config = tmp_path / "c.toml"
    config.write_text('[tumour]\nmodel = "manett"\n')
    with pytest.raises(
        ConfigError, match=r"tumour\.model.*'unetplusplus', 'manet' or 'deeplabv3plus'"
    ):
        load_settings(config)
    result = subprocess.run(
        [sys.executable, "-m", "liverpipe.cli", "config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "manett" in result.stderr and str(config) in result.stderr
    assert load_settings(None, {"train": {"model": "manet"}}).train.model == "manet"

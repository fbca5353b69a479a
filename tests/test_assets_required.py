"""Under ``make test`` (LIBORTHO_REQUIRE_ASSETS=1) a missing asset fails its tests; elsewhere it skips them."""

import pytest

from conftest import REQUIRE_ASSETS_ENV, require_fortunes, require_smollm2
from libortho.data import corpora


@pytest.fixture
def no_assets(tmp_path, monkeypatch):
    """An empty cache and no fortunes directory."""
    monkeypatch.setenv("LIBORTHO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "no-fortunes")
    return tmp_path / "cache"


def test_missing_smollm2_fails_under_make_test_and_skips_otherwise(no_assets, monkeypatch) -> None:
    monkeypatch.delenv(REQUIRE_ASSETS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="SmolLM2 cache absent"):
        require_smollm2()
    monkeypatch.setenv(REQUIRE_ASSETS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="SmolLM2 cache absent.*make assets"):
        require_smollm2()


@pytest.mark.parametrize("record,required", [(None, False), ("not installed", False), ("installed", True)])
def test_fortunes_required_only_where_make_assets_installed_it(no_assets, monkeypatch, record, required) -> None:
    monkeypatch.setenv(REQUIRE_ASSETS_ENV, "1")
    if record is not None:
        no_assets.mkdir()
        (no_assets / ".fortunes").write_text(record + "\n")
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(expected, match="fortunes` not found"):
        require_fortunes()
    monkeypatch.delenv(REQUIRE_ASSETS_ENV)
    with pytest.raises(pytest.skip.Exception):
        require_fortunes()


def test_present_fortunes_are_returned(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path)
    assert require_fortunes() == tmp_path

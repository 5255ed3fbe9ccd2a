"""A store is a folder a user may move, copy or lose part of: its manifest (store.json) says
what it holds and where it was made, so a moved or partial store is refused in one line that
says what to do, and a moved one works again after `imgcls-hpo relocate`."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config.store import Manifest, Store
from imgcls.errors import ConfigError

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _ok(*args: str) -> str:
    code, out = _run(*args)
    assert code == 0, out
    return out


def _refused(*args: str) -> str:
    """The one line a refused command prints."""
    code, out = _run(*args)
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store that holds one finished, promoted study; each test takes a copy of its own."""
    from tests.conftest import TINY_STUDY, make_image_folder

    root = tmp_path_factory.mktemp("searched")
    study = root / "tiny.yaml"
    study.write_text(TINY_STUDY.format(data=make_image_folder(root / "data", per_class=6),
                                       trials=1).replace("max_epochs: 2", "max_epochs: 1"))
    _ok("search", str(study), "--store", str(root / "store"))
    _ok("promote", "tiny", "--store", str(root / "store"))
    return root


def test_a_search_writes_the_manifest_with_its_studies(searched: Path) -> None:
    store = searched / "store"
    data = json.loads((store / "store.json").read_text())
    assert data["root"] == str(store) and data["studies"] == ["tiny"]
    assert data["tracking"] == f"sqlite:///{store}/mlflow.db"
    assert str(store / "optuna.journal") in data["storage"]
    assert Store.resolve(store).check_manifest() == Manifest.read(store / "store.json")


@pytest.mark.slow
@pytest.mark.parametrize("how", [shutil.move, shutil.copytree], ids=["moved", "copied"])
def test_a_moved_or_copied_store_is_refused_until_relocated_then_works(
        searched: Path, tmp_path: Path, how) -> None:  # type: ignore[no-untyped-def]
    made = tmp_path / "made"
    shutil.copytree(searched / "store", made)
    _ok("relocate", "--store", str(made))  # a store made in `made`, pointing nowhere else
    now = tmp_path / "elsewhere" / "store"
    now.parent.mkdir()
    how(str(made), str(now))

    for command in (["results", "tiny"], ["promote", "tiny"]):
        line = _refused(*command, "--store", str(now))
        assert line == (f"error: the store {now} was made in {made} and has been moved or "
                        "copied since: its MLflow artifact locations still point there; run "
                        f"`imgcls-hpo relocate --store {now}` once to point them here")

    out = " ".join(_ok("relocate", "--store", str(now)).split())
    assert out.startswith(f"Relocated the store from {made} to {now}:")
    assert "nothing to relocate" in _ok("relocate", "--store", str(now))  # once is enough

    shutil.rmtree(made, ignore_errors=True)  # nothing of the old folder is left to read
    _ok("results", "tiny", "--store", str(now))
    _ok("promote", "tiny", "--store", str(now))
    images = searched / "data" / "ants"
    out = _ok("predict", "models:/tiny-classifier@champion", str(images), "--store", str(now))
    assert f"{len(list(images.iterdir()))} images" in out


def test_a_store_whose_mlflow_database_is_gone_says_so_in_one_line(searched: Path,
                                                                   tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(searched / "store", store)
    Store.resolve(store).record_study("tiny")
    (store / "mlflow.db").unlink()  # the trial journal stays
    with pytest.raises(ConfigError, match=r"^the store .* holds studies tiny but its MLflow "
                                          r"database mlflow.db is missing while their trials "
                                          r"are still here: restore it from a backup, or "
                                          r"search into a new --store$"):
        Store.resolve(store).check_manifest()
    assert "mlflow.db is missing" in _refused("results", "tiny", "--store", str(store))


def test_an_unreadable_or_newer_manifest_is_one_line(tmp_path: Path) -> None:
    store = Store.resolve(tmp_path)
    store.manifest_path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"manifest .*store.json is unreadable"):
        store.check_manifest()
    store.manifest_path.write_text(json.dumps({"format": 99, "root": str(tmp_path),
                                               "tracking": "", "storage": "", "studies": []}))
    with pytest.raises(ConfigError, match=r"has format 99, newer than this imgcls-hpo reads"):
        store.check_manifest()

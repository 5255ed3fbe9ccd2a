"""Bad input, of every command: one line naming the problem, exit 2, no traceback, no credential
shown, and nothing already recorded in the store changed.

One store holds a finished study (the tiny study, one trial); each case runs a command against
it and the store's recorded files (the MLflow database, the Optuna journal, the artifacts and
checkpoints; not the image cache, where the full list of unusable files is written) are compared
byte for byte before and after.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hpo.cli import app
from tests.conftest import TINY_STUDY, make_image_folder

runner = CliRunner()
SECRET = "hunter2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A store with a finished study, and the bad inputs the cases name."""
    root = tmp_path_factory.mktemp("bad-input")
    data = make_image_folder(root / "data")
    study = root / "tiny.yaml"
    study.write_text(TINY_STUDY.format(data=data, trials=1))
    store = root / "store"
    for command in (["search", str(study), "--max-epochs", "1"], ["promote", "tiny"]):
        done = runner.invoke(app, [*command, "--store", str(store)])
        assert done.exit_code == 0, done.output

    (root / "empty").mkdir()
    noimages = make_image_folder(root / "noimages")
    for file in (noimages / "bees").iterdir():
        file.unlink()
    (noimages / "bees" / "notes.txt").write_text("no images here")
    corrupt = make_image_folder(root / "corrupt")
    for i in range(5):
        (corrupt / "ants" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    csv_dir = make_image_folder(root / "csvdata")
    (csv_dir / "header.csv").write_text("file,class\nants/000.png,ants\n")
    (csv_dir / "latin.csv").write_bytes("path,label\nants/000.png,fourmi\xe9\n".encode("latin-1"))
    (csv_dir / "outside.csv").write_text("path,label\n../data/ants/000.png,ants\n")
    np.savez(root / "nokeys.npz", images=np.zeros((4, 8, 8), np.uint8))
    (root / "latin.yaml").write_bytes("description: café\ndata: {source: digits}\n"
                                      .encode("latin-1"))
    (root / "broken.yaml").write_text("data: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "unknown.yaml").write_text("data: {source: digits}\ncolour: red\n")
    (root / "notes.txt").write_text("not a store")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(images / "one.png")
    (root / "fake.png").write_text("not an image")
    (root / "existing.yaml").write_text("mine\n")
    return {name: str(value) for name, value in {
        "root": root, "store": store, "study": study, "data": data, "empty": root / "empty",
        "noimages": noimages, "corrupt": corrupt, "csvdir": csv_dir, "images": images,
        "port": _free_port(), "secret": SECRET,
    }.items()}


def recorded(store: Path) -> dict[str, str]:
    """Each recorded file of the store and the SHA-256 of its bytes."""
    return {p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*"))
            if p.is_file() and p.relative_to(store).parts[0] != "cache"}


# (what is wrong, the command with {placeholders} from `world`, what the one line says)
CASES = [
    # the study
    ("unknown study", "search digitz", "unknown study 'digitz' (known: brain-mri, digits, "
                                       "insects, tb, tissue)"),
    ("study file not found", "search {root}/nowhere.yaml", "study file not found:"),
    ("study not UTF-8", "search {root}/latin.yaml --store {store}", "not UTF-8 text (byte"),
    ("study not YAML", "search {root}/broken.yaml --store {store}", "not valid YAML"),
    ("study a list", "search {root}/list.yaml --store {store}",
     "a study file must be a mapping of settings"),
    ("unknown setting in the file", "search {root}/unknown.yaml --store {store}",
     "colour: Extra inputs are not permitted"),
    # the search space
    ("lr not a number", "search digits --lr abc", "lr: 'abc' is not a number"),
    ("LOW above HIGH", "search digits --lr 0.1..0.01", "lr: LOW 0.1 is above HIGH 0.01"),
    ("batch size not an integer", "search digits --batch-size 16..x",
     "batch_size: 'x' is not an integer"),
    ("dropout out of range", "search digits --dropout 0..2", "dropout: Input should be less "
                                                            "than 1"),
    ("param without =", "search digits --param optimizer", "expected NAME=SPEC"),
    ("unknown hyperparameter", "search digits --param colour=red",
     "unknown hyperparameter 'colour'"),
    ("unknown architecture", "search digits --arch resnet19",
     "unknown architecture 'resnet19'; did you mean 'resnet18'?"),
    ("size an architecture cannot take", "search digits --arch vit_b_16 --image-size 40",
     "vit_b_16 needs an image side that is a multiple of 16px"),
    ("unknown optimizer", "search digits --param optimizer=lbfgs",
     "unknown optimizer 'lbfgs' (known: sgd, adam, adamw)"),
    ("unknown sampler", "search digits --sampler annealing", "unknown sampler 'annealing' "
                                                            "(known:"),
    ("unknown pruner", "search digits --pruner guillotine",
     "unknown pruner 'guillotine' (known:"),
    ("enqueued value off the space", "search {study} --store {store} --enqueue lr=abc",
     "lr: 'abc' is not a number"),
    ("pretrained weights missing offline",
     "search {study} --store {store} --arch resnet18 --param pretrained=true --image-size 32",
     "pretrained resnet18 needs resnet18-f37072fd.pth, not found in"),
    # study settings
    ("set without =", "search {study} --set data.split", "expected KEY=VALUE"),
    ("set of a space entry", "search {study} --set space.lr=0.1",
     "search-space entries take --param"),
    ("unknown split", "search {study} --set data.split=halves", "unknown split method 'halves'"),
    ("one class", "search {study} --set data.classes=[ants]", "must be at least two distinct"),
    ("bad group pattern", "search {study} --set data.group_pattern=(unclosed",
     "not a valid regular expression"),
    ("given split without one", "search {study} --store {store} --set data.split=given",
     "split 'given' needs train/ and val/ folders"),
    ("impossible operating point", "search {study} --operating-point sens=2",
     "operating point 'sens=2': use argmax, youden"),
    ("one fold", "search {study} --folds 1", "folds 1 is not cross-validation"),
    ("more folds than a class has images", "search {study} --store {store} --folds 20",
     "folds 20: class 'ants' has"),
    ("folds with PBT", "search {study} --folds 3 --backend ray --pruner pbt",
     "folds and pruner 'pbt' do not go together"),
    ("binary objective on ten classes", "search digits --objective val_sens --store {store}",
     "objective metric 'val_sens' needs two classes but the data has 10"),
    ("zero trials", "search {study} --trials 0",
     "trials: Input should be greater than or equal to 1"),
    ("bad timeout", "search {study} --timeout soon",
     "--timeout 'soon': expected a duration such as 90m"),
    ("GPU that is not there", "search {study} --gpus 7", "asked for GPU 7, but"),
    ("trials per GPU without a GPU", "search {study} --trials-per-gpu 2 --store {store}",
     "--trials-per-gpu 2 needs GPUs"),
    ("unknown backend", "search {study} --backend dask", "unknown backend 'dask' (known:"),
    # the data
    ("study needing data without it", "search tissue", "needs a data folder: pass --data PATH"),
    ("missing data folder", "search tissue --data {root}/nowhere", "data folder not found"),
    ("empty data folder", "search tissue --data {empty}", "has no class sub-folders"),
    ("class folder without images", "search {study} --store {store} --data {noimages}",
     "class folder 'bees'"),
    ("unusable images", "search {study} --store {store} --data {corrupt}",
     "5 of 25 files are not usable images"),  # all listed in a file: test_search.py
    ("CSV without its columns",
     "search {study} --store {store} --set data.source=csv --data {csvdir}/header.csv",
     "has no path or label column"),
    ("CSV not UTF-8",
     "search {study} --store {store} --set data.source=csv --data {csvdir}/latin.csv",
     "is not UTF-8 text"),
    ("CSV path outside its folder",
     "search {study} --store {store} --set data.source=csv --data {csvdir}/outside.csv",
     "../data/ants/000.png is outside the data folder"),
    ("npz without its arrays", "search {study} --store {store} --set data.source=npz "
                               "--data {root}/nokeys.npz",
     "has no train_images and train_labels arrays"),
    # the store and the servers
    ("store that is a file", "search digits --store {root}/notes.txt", "is a file, not a folder"),
    ("unreachable tracking server", "search digits --tracking-uri http://127.0.0.1:{port}",
     "cannot reach the MLflow tracking server at http://127.0.0.1:"),
    ("tracking URI of an unknown scheme",
     "search digits --store {store} --tracking-uri postgress://u:{secret}@db/mlflow",
     "tracking URI 'postgress://u:***@db/mlflow': unknown scheme 'postgress'"),
    ("Optuna storage that cannot open",
     "search {study} --store {store} --storage sqlite:////nonexistent/folder/optuna.db",
     "cannot open the Optuna storage sqlite:////nonexistent/folder/optuna.db"),
    ("database where nothing listens",
     "search {study} --store {store} --storage postgresql://optuna:{secret}@127.0.0.1:{port}/o",
     "cannot open the Optuna storage postgresql://optuna:***@127.0.0.1:"),
    # after a search
    ("results of no store", "results digits --store {root}/none", "no MLflow store at"),
    ("results of an unknown study", "results nosuch --store {store}",
     "no study 'nosuch' in the tracking store"),
    ("promote by an unknown metric", "promote tiny --store {store} --metric val_nonsense",
     "no COMPLETE trial of study 'tiny' logged the metric 'val_nonsense'"),
    ("promote an unknown study", "promote nosuch --store {store}",
     "no study 'nosuch' in the tracking store"),
    ("predict with no store", "predict digits . --store {root}/none", "no MLflow store at"),
    ("predict a missing image folder", "predict tiny {root}/nowhere --store {store}",
     "image path not found:"),
    ("predict with a threshold over 1", "predict tiny {images} --store {store} --threshold 1.5",
     "Invalid value for '--threshold'"),
    ("predict an unknown run", "predict runs:/0123456789abcdef/model {images} --store {store}",
     "no run '0123456789abcdef' in the tracking store"),
    ("predict an unregistered model", "predict models:/nosuch@champion {images} "
                                      "--store {store}",
     "no registered model 'nosuch' in the tracking store"),
    ("explain with no store", "explain digits . --out x --store {root}/none",
     "no MLflow store at"),
    ("ui with no store", "ui --store {root}/none", "no MLflow store at"),
    ("samples of a study without data", "samples tissue --store {store}",
     "needs a data folder"),
    # the other commands
    ("models for one class", "models --classes 1", "--classes must be at least 2"),
    ("unknown command", "serch digits", "No such command 'serch'"),
    ("unknown option", "search digits --trails 5", "No such option: --trails"),
    ("missing argument", "predict digits --store {store}",
     "Missing argument 'paths'. (see imgcls-hpo predict --help)"),
    ("option value of the wrong type", "search digits --trials many",
     "Invalid value for '--trials': Input should be a valid integer"),
    ("init of a missing folder", "init {root}/nowhere", "data not found"),
    ("init over an existing study file", "init {data} --out {root}/existing.yaml",
     "existing.yaml exists; pass --force"),
    ("init of a file that is no data", "init {root}/notes.txt",
     "is neither a folder, a .csv manifest nor an .npz archive"),
]


@pytest.mark.parametrize(("command", "message"), [(c, m) for _, c, m in CASES],
                         ids=[what for what, _, _ in CASES])
def test_bad_input_is_one_line_and_changes_nothing_recorded(
        world: dict[str, str], command: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", world["root"])  # no weights file, whatever this machine has
    store = Path(world["store"])
    before = recorded(store)
    args = [part.format(**world) for part in command.split()]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output  # one line, no traceback
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert SECRET not in result.output
    assert recorded(store) == before


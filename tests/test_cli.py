"""The command line: its exit codes, its one-line errors, and its output."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from hpo.cli import app

runner = CliRunner()


def _bad_input(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output  # one line, no traceback
    assert lines[0].startswith("error: ")
    assert message in lines[0], lines[0]


def test_models_json_reports_parameters_and_flops() -> None:
    result = runner.invoke(app, ["models", "--classes", "2", "--image-size", "224",
                                 "--channels", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"simplecnn", "resnet18", "resnet50", "vgg11_bn", "densenet121"} <= set(rows)
    assert set(rows["resnet50"]) == {"name", "params", "flops", "macs"}
    assert rows["resnet50"]["params"] == 23_512_130
    assert rows["resnet50"]["flops"] == 2 * rows["resnet50"]["macs"] > 8e9


def test_models_table_skips_what_cannot_take_the_image_size() -> None:
    result = runner.invoke(app, ["models", "--image-size", "16", "--classes", "10"])
    assert result.exit_code == 0, result.output
    assert "vgg11_bn" in result.output and "needs images of at least 32px" in result.output
    assert "resnet18" in result.output


@pytest.mark.slow
def test_search_command_runs_and_summarises(study_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", str(study_file), "--store", str(tmp_path / "s"),
                                 "--lr", "0.05", "--param", "optimizer=sgd,adamw"])
    assert result.exit_code == 0, result.output
    assert "best 2 trials by val_f1" in result.output
    assert "2 trials in study tiny: 2 complete, 0 pruned, 0 failed" in result.output
    assert f"imgcls-hpo ui --store {tmp_path / 's'}" in result.output
    assert (tmp_path / "s" / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()  # nothing outside the store


@pytest.mark.slow
def test_console_script_exits_2_on_bad_input() -> None:
    script = Path(sys.executable).parent / "imgcls-hpo"
    done = subprocess.run([str(script), "search", "no-such-study"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown study 'no-such-study' (known: brain-mri, digits, insects, tb, tissue); "
        "or give a path to a YAML file"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_store_with_its_artifacts(study_file: Path, tmp_path: Path) -> None:
    store = tmp_path / "s"
    assert runner.invoke(app, ["search", str(study_file), "--store", str(store),
                               "--trials", "1"]).exit_code == 0
    port = _free_port()
    script = Path(sys.executable).parent / "imgcls-hpo"
    server = subprocess.Popen([str(script), "ui", "--store", str(store), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError("the MLflow UI did not start") from None
                time.sleep(0.5)
        query = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny"
        experiment = json.load(urllib.request.urlopen(query))["experiment"]
        body = json.dumps({"experiment_ids": [experiment["experiment_id"]],
                           "filter": "tags.imgcls_hpo.role = 'trial'"}).encode()
        request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                         headers={"Content-Type": "application/json"})
        (trial,) = json.load(urllib.request.urlopen(request))["runs"]
        png = urllib.request.urlopen(f"{base}/get-artifact?path=confusion_matrix_val.png"
                                     f"&run_uuid={trial['info']['run_id']}").read()
        assert png.startswith(b"\x89PNG")
        workers = _descendants(server.pid)
        assert workers  # the MLflow server and its workers
    finally:
        server.terminate()  # SIGTERM, as a service manager or `kill` stops it
        server.wait(timeout=30)
    left = [pid for pid in workers if _alive(pid)]
    for pid in left:  # what the command failed to stop, stopped here
        os.kill(pid, signal.SIGKILL)
    assert left == []  # nothing left serving


def _descendants(pid: int) -> set[int]:
    """The processes below `pid` in the process tree, now."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces, never the last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_unexpected_failures_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("hpo.search.run.run_search", broken)
    result = runner.invoke(app, ["search", "digits"])
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


@pytest.mark.slow
def test_a_search_where_no_trial_completes_exits_1(study_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", str(study_file), "--store", str(tmp_path / "s"),
                                 "--lr", "1e20"])
    assert result.exit_code == 1
    assert result.output.count("FAIL     diverged at epoch") == 2  # each trial says why
    last = result.output.strip().splitlines()[-1]  # and the end lists the reasons
    assert last.startswith("error: no trial completed: diverged at epoch ")
    assert last.count("(1 trial)") + 2 * last.count("(2 trials)") == 2


def test_unusable_images_are_named_with_the_way_out(study_file: Path,
                                                    image_folder: Path) -> None:
    Image.new("RGB", (4, 4)).save(image_folder / "bees" / "thumb.png")
    _bad_input(["search", str(study_file)], "bees/thumb.png (placeholder")
    _bad_input(["search", str(study_file)], "Pass --skip-bad-images to leave them out")


def test_a_redis_storage_without_its_client_says_what_to_install(
        study_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # as if not installed: import fails
    _bad_input(["search", str(study_file), "--store", str(tmp_path / "s"),
                "--storage", "redis://:hunter2@localhost:6379"],
               "--storage redis://***@localhost:6379 needs the redis package: "
               "pip install 'imgcls-hpo[redis]'")


def test_a_missing_database_driver_names_the_extra_that_installs_it() -> None:
    from hpo.search.backends.optuna.storage import missing_driver

    url = "postgresql://optuna:hunter2@db/optuna"
    refused = ImportError(f"Failed to import DB access module for the specified storage {url}")
    assert missing_driver(url, refused) == (
        "no driver for postgresql:// is installed; pip install 'imgcls-hpo[postgres]'")
    assert missing_driver(url, RuntimeError(f"connection to {url} refused")) == \
        "connection to postgresql://optuna:***@db/optuna refused"


def test_every_option_of_every_command_says_what_it_does() -> None:
    import typer.main

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    options = [(name, param) for name, command in commands.items() for param in command.params
               if param.param_type_name == "option"]
    assert {"search", "results", "promote", "predict", "explain", "models", "ui", "relocate"} <= \
        set(commands) and len(options) > 40
    assert [f"{name} {param.opts[0]}" for name, param in options
            if not (param.help or "").strip()] == []


def test_search_help_offers_only_what_runs() -> None:
    from hpo.search.backends.optuna.pruners import PRUNERS
    from hpo.search.backends.ray.schedulers import SCHEDULERS

    text = " ".join(runner.invoke(app, ["search", "--help"], env={"COLUMNS": "300"}).output.split())
    assert f"Optuna: {', '.join(PRUNERS.names())}; Ray: {', '.join(SCHEDULERS.names())}" in text
    assert "Architecture (imgcls-hpo models lists them): A,B,C or a fixed value." in text
    assert "Learning rate: LOW..HIGH, LOW..HIGH:log, A,B,C or a fixed value." in text


def test_help_answers_without_loading_the_heavy_libraries() -> None:
    code = ("import sys\nfrom hpo.cli import main\nsys.argv = ['imgcls-hpo', 'search', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', *[m for m in ('torch', 'mlflow', 'optuna', 'ray', 'sklearn')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "LOADED"


def test_a_study_file_that_is_not_utf8(tmp_path: Path) -> None:
    study = tmp_path / "latin.yaml"
    study.write_bytes("description: café\ndata: {source: digits}\n".encode("latin-1"))
    _bad_input(["search", str(study), "--store", str(tmp_path / "s")], "not UTF-8 text")
    assert not (tmp_path / "s").exists()


def test_a_tracking_uri_of_an_unknown_scheme_names_the_known_ones_and_hides_its_password(
        tmp_path: Path) -> None:
    _bad_input(["search", "digits", "--store", str(tmp_path / "s"),
                "--tracking-uri", "postgress://optuna:hunter2@db/mlflow"],
               "tracking URI 'postgress://optuna:***@db/mlflow': unknown scheme 'postgress'; "
               "give one of sqlite://, postgresql://")
    assert not (tmp_path / "s").exists()


def test_a_read_only_store_is_one_line_and_nothing_is_written(tmp_path: Path) -> None:
    """A store on a read-only folder: as root (who may write anywhere) the folder is bound
    read-only in a mount namespace of the command's own."""
    folder = tmp_path / "ro"
    folder.mkdir()
    command = [str(Path(sys.executable).parent / "imgcls-hpo"), "search", "digits",
               "--store", str(folder / "store"), "--trials", "1"]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare to make a read-only folder as root")
        mount = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"
        command = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *command]
    else:
        folder.chmod(0o555)
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if "unshare" in done.stderr or "mount" in done.stderr:
        pytest.skip(f"no mount namespace here: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: the store {folder / 'store'} cannot be written to ({folder} is read-only); "
        "pass --store with a folder you can write to"]
    assert list(folder.iterdir()) == []


def test_what_is_shown_and_recorded_of_a_storage_hides_its_password(tmp_path: Path) -> None:
    from hpo.config.store import Store, mask_uri

    store = Store.resolve(tmp_path, "postgresql://mlflow:s3cret@db:5432/mlflow",
                          "postgresql+psycopg://optuna:hunter2@db/optuna")
    assert store.describe_storage() == "postgresql+psycopg://optuna:***@db/optuna"  # the tag
    assert mask_uri(store.tracking_uri) == "postgresql://mlflow:***@db:5432/mlflow"
    assert mask_uri("http://mlflow-host:5000") == "http://mlflow-host:5000"
    assert mask_uri("sqlite:////data/mlruns/mlflow.db") == "sqlite:////data/mlruns/mlflow.db"


def test_samples_writes_held_out_images_of_each_class_that_predict_can_read(
        tmp_path: Path) -> None:
    out = tmp_path / "samples"
    result = runner.invoke(app, ["samples", "digits", "--out", str(out), "--count", "12",
                                 "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.png"))
    assert len(files) == 12
    assert {f.name.split("_")[0] for f in files} == {str(d) for d in range(10)}  # every class
    with Image.open(files[0]) as image:
        assert (image.size, image.mode) == ((32, 32), "L")  # as the study's model sees them
    assert "12 test images of study digits written to" in result.output


@pytest.mark.parametrize("first_done", [False, True], ids=["none ended yet", "one complete"])
def test_a_machine_that_finds_nothing_left_to_run_says_so_and_exits_0(
        study_file: Path, tmp_path: Path, first_done: bool) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    store, wanted = tmp_path / "s", 1
    if first_done:
        done = runner.invoke(app, ["search", str(study_file), "--store", str(store),
                                   "--trials", "1", "--max-epochs", "1"])
        assert done.exit_code == 0, done.output
        wanted = 2
    store.mkdir(exist_ok=True)
    # another machine is running the last trial the study wants
    journal = JournalStorage(JournalFileBackend(str(store / "optuna.journal")))
    study = optuna.create_study(study_name="tiny", storage=journal, direction="maximize",
                                load_if_exists=True)
    running = study.ask()
    running.set_user_attr("host", "another-machine")
    running.set_user_attr("pid", 1)
    result = runner.invoke(app, ["search", str(study_file), "--store", str(store), "--trials",
                                 str(wanted), "--max-epochs", "1"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"{wanted} trials in study tiny:" in out and "0 of them ran in this search" in out
    assert ("Nothing was left to run here: the study's other trials are running elsewhere"
            in out) is not first_done

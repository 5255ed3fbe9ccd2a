"""The README's commands, run as a new user would type them, in order, in a fresh folder.

Every line of a README code block that runs a command (`imgcls-hpo ...`, `mlflow ...`, `curl
...`) is run as written, through bash, in one temporary folder that plays the fresh clone (the
store is ./mlruns there, as for a user). Two things differ, both said here: the digits study
trains 1 epoch a trial instead of 8 (a copy in ./studies/, which `search` reads before the
shipped one, so that the whole README runs in about a minute; the commands are what is under
test, not the training), and the model server's port is a free one instead of 5001. Lines that
need what no fresh machine has (a data set under /data, a database server, a GPU) or that run
until stopped are skipped, each for the reason SKIP gives; the servers and the UI have tests of
their own (test_servers.py, test_cli.py).

Then the model references the README lists are tried beyond its blocks: `predict` and `explain`
with `runs:/ID/model` against the local store and against an `mlflow server`.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import servers

pytestmark = pytest.mark.slow

README = Path(__file__).parents[1] / "README.md"
BIN = Path(sys.executable).parent
COMMANDS = ("imgcls-hpo ", "mlflow ", "curl ", "MLFLOW_TRACKING_URI=")
# What a fresh clone on a CPU machine cannot run, and why.
SKIP = {
    "/data/": "a data set the user has, not the clone",
    "organs.npz": "a data set the user has, not the clone",
    "postgresql://": "a database server: tests/test_servers.py runs this recipe on loopback",
    "imgcls-hpo ui": "runs until stopped: tests/test_cli.py stops it and checks nothing is left",
    "--trials 24": "48 more trials of the same study: as `--trials 12` is, twice over",
}
TIMEOUT_S = 600


def readme_commands() -> list[str]:
    """Each command of the README's code blocks, in order: backslash-continued lines joined,
    the shell's own comments kept (bash ignores them)."""
    commands, block, pending = [], False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith(COMMANDS):
            commands.append(line)
    return commands


def _skipped(command: str) -> str | None:
    return next((why for marker, why in SKIP.items() if marker in command), None)


def _short_digits(folder: Path) -> None:
    """The shipped digits study, 1 epoch a trial, where `search digits` looks first."""
    shipped = Path(__file__).parents[1] / "hpo" / "studies" / "digits.yaml"
    study = yaml.safe_load(shipped.read_text())
    study["max_epochs"] = 1
    (folder / "studies").mkdir()
    (folder / "studies" / "digits.yaml").write_text(yaml.safe_dump(study, sort_keys=False))


def _env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IMGCLS_HPO_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(folder / "home"),
               COLUMNS="200")
    return env


def _run(command: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stdout + done.stderr, command
    return done.stdout


class Server:
    """`mlflow models serve` started from the README's line, in its own process group."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], port: int) -> None:
        self.log = (cwd / "serve.log").open("w")
        self.proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return True

        try:
            servers.wait_for(ready, self.proc, "the model server", cwd / "serve.log")
        except RuntimeError as exc:
            self.stop()
            pytest.fail(str(exc))

    def stop(self) -> None:
        servers.stop_group(self.proc)
        self.log.close()


def _check_writes(command: str, cwd: Path, out: str) -> None:
    """What the README says each command writes."""
    words = shlex.split(command.split("#")[0])
    if words[:2] == ["imgcls-hpo", "results"]:
        folder = cwd / "mlruns" / "results" / words[2]
        assert (folder / "hparams_3d.html").exists() and (folder / "optuna.html").exists()
        with (folder / "trials.csv").open() as f:
            assert len(list(csv.DictReader(f))) >= 4
    elif words[:2] == ["imgcls-hpo", "promote"]:
        assert f"models:/{words[2]}-classifier@champion" in out
    elif words[:2] == ["imgcls-hpo", "samples"]:
        assert len(list((cwd / "samples").glob("*.png"))) == 8
    elif words[:2] == ["imgcls-hpo", "predict"] and "--out" in words:
        with (cwd / words[words.index("--out") + 1]).open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 8 and all(r["prediction"] and not r["error"] for r in rows)
    elif words[:2] == ["imgcls-hpo", "explain"]:
        folder = cwd / words[words.index("--out") + 1]
        assert len(list(folder.glob("*.png"))) == 8 + ("--embed" in words)
    elif words[0] == "curl":
        assert '"predictions"' in out and '"p_0"' in out


def test_every_command_of_the_readme_runs_as_written(tmp_path: Path) -> None:
    commands = readme_commands()
    assert len(commands) >= 15  # the parser found the blocks
    cwd = tmp_path / "clone"
    cwd.mkdir()
    _short_digits(cwd)
    env = _env(cwd)
    port = servers.free_port()
    server: Server | None = None
    ran, skipped = [], []
    try:
        for command in commands:
            if (why := _skipped(command)) is not None:
                skipped.append((command, why))
                continue
            command = re.sub(r"(-p |localhost:)5001\b", rf"\g<1>{port}", command)
            if " models serve " in command:
                server = Server(command, cwd, env, port)
                continue
            out = _run(command, cwd, env)
            _check_writes(command, cwd, out)
            ran.append(command)
    finally:
        if server is not None:
            server.stop()
    assert server is not None and any(c.startswith("curl") for c in ran)
    assert not (cwd / "mlflow.db").exists()  # nothing outside the store
    assert len(ran) >= 12, (ran, skipped)


def test_runs_references_predict_and_explain_on_the_store_and_on_a_server(
        tmp_path: Path) -> None:
    cwd = tmp_path / "clone"
    cwd.mkdir()
    _short_digits(cwd)
    env = _env(cwd)
    with servers.mlflow_server(tmp_path / "server") as url:
        for where in ([], ["--tracking-uri", url, "--store", "on-server"]):
            flags = " ".join(where)
            _run(f"imgcls-hpo search digits --trials 1 {flags}", cwd, env)
            _run(f"imgcls-hpo results digits --out table {flags}", cwd, env)
            with (cwd / "table" / "trials.csv").open() as f:
                run_id = next(r["run_id"] for r in csv.DictReader(f) if r["state"] == "COMPLETE")
            _run("imgcls-hpo samples digits --count 4", cwd, env)
            out = _run(f"imgcls-hpo predict runs:/{run_id}/model samples/ {flags}", cwd, env)
            assert f"4 images with runs:/{run_id}/model" in " ".join(out.split())
            _run(f"imgcls-hpo explain runs:/{run_id}/model samples/ --out cams {flags}", cwd,
                 env)
            assert len(list((cwd / "cams").glob("*.png"))) == 4
    assert not (cwd / "mlflow.db").exists()  # the lookups used the project's store, not ./


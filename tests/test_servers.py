"""Several machines, one study, against real servers on 127.0.0.1 (tests/servers.py): two
`imgcls-hpo search` processes started at the same instant on an empty storage (PostgreSQL or
Redis) and one MLflow server, `--trials 6` each, as the README's "Scaling out" tells users to
run them. Each process has its own store folder (its own machine's cache and checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import servers
from tests.conftest import TINY_STUDY, make_image_folder

TRIALS = 6
SEARCH_TIMEOUT_S = 240
CLI = [str(Path(sys.executable).with_name("imgcls-hpo"))]


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    with servers.mlflow_server(tmp_path / "mlflow-server") as url:
        yield url


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with servers.postgres(tmp_path / "pg") as server:
        yield server.url


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with servers.redis(tmp_path / "redis") as url:
        yield url


def _study(tmp_path: Path) -> Path:
    """The tiny study, one epoch a trial: what is tested is the count and the layout."""
    path = tmp_path / "tiny.yaml"
    data = make_image_folder(tmp_path / "data", per_class=6)
    path.write_text(TINY_STUDY.format(data=data, trials=TRIALS)
                    .replace("max_epochs: 2", "max_epochs: 1"))
    return path


def _two_machines(tmp_path: Path, storage: str, tracking: str) -> list[str]:
    """Two searches started together; both must exit 0. Returns their outputs."""
    study = _study(tmp_path)
    procs = [subprocess.Popen([*CLI, "search", str(study), "--trials", str(TRIALS),
                               "--store", str(tmp_path / f"machine{k}"), "--storage", storage,
                               "--tracking-uri", tracking],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=SEARCH_TIMEOUT_S)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
    return outputs


def _check_one_study(tmp_path: Path, storage: str, tracking: str, outputs: list[str]) -> None:
    """Exactly TRIALS finished trials, all distinct; one study run holding them all; results
    reports them all; the password nowhere."""
    import optuna
    from mlflow import MlflowClient

    from hpo.config.store import Store
    from hpo.search.backends.optuna.storage import make_storage

    study = optuna.load_study(study_name="tiny",
                              storage=make_storage(Store.resolve(tmp_path, tracking, storage)))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == len(study.trials) == TRIALS
    configs = {tuple(sorted(t.params.items())) for t in finished}
    assert len(configs) == TRIALS, "two trials sampled the same configuration"

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    study_runs = [r for r in runs if r.data.tags.get("imgcls_hpo.role") == "study"]
    assert len(study_runs) == 1
    parent = study_runs[0].info.run_id
    trial_runs = [r for r in runs if r.data.tags.get("imgcls_hpo.role") == "trial"]
    assert len(trial_runs) == TRIALS
    assert all(r.data.tags.get("mlflow.parentRunId") == parent for r in trial_runs)
    assert study_runs[0].data.metrics["trials_complete"] == TRIALS  # the whole study's count

    report = subprocess.run([*CLI, "results", "tiny", "--tracking-uri", tracking,
                             "--store", str(tmp_path / "machine0")],
                            capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"{TRIALS} trials" in " ".join(report.stdout.split()), report.stdout

    recorded = [str(r.data.params) + str(r.data.tags) + str(r.info.run_name) for r in runs]
    for text in (*outputs, report.stdout, report.stderr, *recorded):
        assert servers.PASSWORD not in text


@pytest.mark.slow
def test_two_machines_on_an_empty_postgres_and_one_mlflow_server_share_one_study(
        tmp_path: Path, postgres_url: str, tracking_server: str) -> None:
    outputs = _two_machines(tmp_path, postgres_url, tracking_server)
    _check_one_study(tmp_path, postgres_url, tracking_server, outputs)


@pytest.mark.slow
def test_two_machines_on_redis_and_one_mlflow_server_share_one_study(
        tmp_path: Path, redis_url: str, tracking_server: str) -> None:
    outputs = _two_machines(tmp_path, redis_url, tracking_server)
    _check_one_study(tmp_path, redis_url, tracking_server, outputs)


OPEN_AT_ONCE = """\
import sys, time
from hpo.search.backends.optuna import storage
storage.CREATE_ATTEMPTS = int(sys.argv[3])
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
storage._rdb_storage(sys.argv[1])
"""


def _open_at_once(url: str, processes: int, attempts: int) -> list[subprocess.CompletedProcess]:
    """`processes` processes that each open the RDB storage at `url` at the same instant."""
    import time

    at = time.time() + 8  # past every process's imports
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, url, str(at), str(attempts)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(processes)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=60), p.communicate()[0], "")
            for p in procs]


def test_processes_opening_an_empty_postgres_at_once_all_open_it(postgres_url: str) -> None:
    from hpo.search.backends.optuna.storage import CREATE_ATTEMPTS

    done = _open_at_once(postgres_url, 4, CREATE_ATTEMPTS)
    assert [p.returncode for p in done] == [0] * 4, [p.stdout[-400:] for p in done]


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[servers.RayHead]:
    with servers.ray_head(tmp_path / "ray", workers=1) as head:
        yield head


@pytest.mark.slow
def test_joining_a_token_authenticated_ray_cluster_of_two_nodes_says_what_is_wrong(
        tmp_path: Path, ray_cluster: servers.RayHead) -> None:
    """A cluster started with token authentication (Ray 2.60's default), joined by address: a
    wrong token is refused in one line; with the cluster's token the join succeeds, and a
    local store on a cluster of several nodes is refused in one line."""
    study = _study(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    search = [*CLI, "search", str(study), "--backend", "ray", "--ray-address",
              ray_cluster.address, "--trials", "2"]

    def run(args: list[str], **more: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, env={**env, **more},
                              timeout=SEARCH_TIMEOUT_S)

    wrong = run([*search, "--store", str(tmp_path / "wrong")], RAY_AUTH_TOKEN="f" * 32)
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    (line,) = wrong.stderr.strip().splitlines()
    assert "cannot join the Ray cluster" in line and "token" in line, line

    local = run([*search, "--store", str(tmp_path / "local")],
                RAY_AUTH_TOKEN_PATH=str(ray_cluster.token_path))
    assert local.returncode == 2, local.stdout + local.stderr
    (line,) = local.stderr.strip().splitlines()
    assert "has 2 nodes" in line and "--tracking-uri" in line, line


def test_a_ray_address_where_nothing_listens_is_one_line_at_once(tmp_path: Path) -> None:
    study = _study(tmp_path)
    done = subprocess.run([*CLI, "search", str(study), "--backend", "ray", "--ray-address",
                           f"127.0.0.1:{servers.free_port()}", "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "cannot join the Ray cluster" in line and "nothing answers there" in line, line


@pytest.mark.slow
def test_a_search_on_a_token_authenticated_ray_cluster_of_two_nodes(
        tmp_path: Path, ray_cluster: servers.RayHead, tracking_server: str) -> None:
    """The README's recipe on a cluster: the cluster's token found where its admin put it
    (RAY_AUTH_TOKEN_PATH), one MLflow server. Each node has one core, so each trial asks for
    one (a trial asking for the cluster's two would wait forever: no node has them); they are
    recorded in the usual layout on the server."""
    from mlflow import MlflowClient

    study = _study(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [*CLI, "search", str(study), "--backend", "ray", "--ray-address", ray_cluster.address,
         "--trials", "2", "--store", str(tmp_path / "store"), "--tracking-uri", tracking_server],
        capture_output=True, text=True, timeout=SEARCH_TIMEOUT_S,
        env={**env, "RAY_AUTH_TOKEN_PATH": str(ray_cluster.token_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 trials in study tiny: 2 complete" in " ".join(done.stdout.split()), done.stdout
    client = MlflowClient(tracking_server)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("imgcls_hpo.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("imgcls_hpo.role") == "trial"]
    assert sorted(r.data.tags["imgcls_hpo.state"] for r in trials) == ["COMPLETE", "COMPLETE"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert all(r.data.tags["imgcls_hpo.worker"].endswith("/ray-cpu") for r in trials)
    assert parent.data.metrics["trials_complete"] == 2

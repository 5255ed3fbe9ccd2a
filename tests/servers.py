"""Real servers on 127.0.0.1 for the integration tests: PostgreSQL, Redis, an MLflow tracking
server and a Ray head (with more nodes where asked), each on a free port, in a temporary
folder, and stopped by the process group it was started in, even when the test fails. A test
skips only where the server's binary is missing (`.ci/run` installs PostgreSQL and Redis, so CI
never skips)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

# Debian's PostgreSQL binaries, the newest version first (not on PATH)
PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                 key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
START_TIMEOUT_S = 60.0
PASSWORD = "s3cret-Pw-71"  # what a test then looks for in every output and MLflow record


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str, *folders: Path) -> str:
    """The path of `name` (on PATH or in `folders`); the test skips, saying so, without it."""
    for folder in folders:
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install postgresql redis-server)")
    return found


def wait_for(ready: Callable[[], bool], proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {log.read_text()[-2000:]}")
        with suppress(OSError):
            if ready():
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in {START_TIMEOUT_S}s: {log.read_text()[-2000:]}")


def port_open(port: int) -> bool:
    with closing(socket.create_connection(("127.0.0.1", port), timeout=1)):
        return True


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL what is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
            with suppress(ProcessLookupError):  # children that outlived their leader
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def started(command: list[str], log: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen]:
    """`command` in its own process group, its output in `log`; the group stopped after."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    try:
        yield proc
    finally:
        stop_group(proc)


def as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run its binaries as the postgres user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str = "optuna"
    database: str = "optuna"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{PASSWORD}@127.0.0.1:{self.port}/{self.database}"


@contextmanager
def postgres(root: Path) -> Iterator[Postgres]:
    """A PostgreSQL server with an empty database `optuna` owned by role `optuna` (password
    PASSWORD), on a free port. As root its data go to a folder of /tmp that the postgres user
    owns (pytest's folders are root's alone), removed after; its log is `root`/postgres.log."""
    initdb, server = binary("initdb", *PG_BINS), binary("postgres", *PG_BINS)
    root.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="imgcls-hpo-pg-"))
    try:
        data, sockets = home / "data", home / "sockets"
        sockets.mkdir()
        if os.geteuid() == 0:
            for path in (home, sockets):
                shutil.chown(path, "postgres")
        init = subprocess.run([*as_postgres(), initdb, "-D", str(data), "-U", "postgres",
                               "-A", "trust", "--no-sync", "-E", "UTF8"],
                              capture_output=True, text=True)
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stdout}{init.stderr}")
        info = Postgres(free_port())
        log = root / "postgres.log"
        with started([*as_postgres(), server, "-D", str(data), "-p", str(info.port),
                      "-h", "127.0.0.1", "-k", str(sockets), "-c", "fsync=off"], log) as proc:
            wait_for(lambda: _pg_ready(info.port), proc, "postgres", log)
            import psycopg

            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{info.port}/postgres",
                                 autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {info.user} LOGIN PASSWORD '{PASSWORD}'")
                conn.execute(f"CREATE DATABASE {info.database} OWNER {info.user}")
            yield info
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _pg_ready(port: int) -> bool:
    import psycopg

    try:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                        connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@contextmanager
def redis(root: Path) -> Iterator[str]:
    """A Redis server on a free port, nothing saved to disk; yields its URL."""
    server = binary("redis-server")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with started([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--dir", str(root)], root / "redis.log") as proc:
        wait_for(lambda: port_open(port), proc, "redis-server", root / "redis.log")
        yield f"redis://127.0.0.1:{port}"


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """An `mlflow server` (this venv's) with a SQLite backend and artifacts in `root`; yields
    its URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200

    with started(command, root / "mlflow.log") as proc:
        wait_for(ready, proc, "mlflow server", root / "mlflow.log")
        yield url


@dataclass(frozen=True)
class RayHead:
    address: str  # HOST:PORT, what --ray-address takes
    token_path: Path  # the cluster's token (RAY_AUTH_TOKEN_PATH)


@contextmanager
def ray_head(root: Path, workers: int = 0) -> Iterator[RayHead]:
    """A Ray head on 127.0.0.1 with token authentication (its token a file in `root`, as a
    cluster's admin would hand it out), 1 CPU, no dashboard; and `workers` more nodes of 1 CPU
    joined to it. Each `ray start --block` runs in its own process group, stopped after."""
    ray = str(Path(sys.executable).with_name("ray"))
    root.mkdir(parents=True, exist_ok=True)
    token = root / "auth_token"
    token.write_text("0123456789abcdef0123456789abcdef")
    # Ray's sockets live in its temporary folder: a short path (pytest's are long)
    temp = Path(tempfile.mkdtemp(prefix="imgcls-hpo-ray-"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    port = free_port()
    head = [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(port), "--num-cpus", "1", "--num-gpus", "0",
            "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"]
    try:
        with started(head, root / "ray-head.log", env) as proc, ExitStack() as nodes:
            wait_for(lambda: port_open(port), proc, "ray head", root / "ray-head.log")
            for k in range(workers):
                nodes.enter_context(started(
                    [ray, "start", "--block", "--address", f"127.0.0.1:{port}",
                     "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
                     "--disable-usage-stats"], root / f"ray-node{k}.log", env))
            _wait_nodes(port, 1 + workers, env, proc, root / "ray-head.log")
            yield RayHead(f"127.0.0.1:{port}", token)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _wait_nodes(port: int, count: int, env: dict[str, str], proc: subprocess.Popen,
                log: Path) -> None:
    """Until the cluster at `port` has `count` nodes alive (asked in a process of its own)."""
    address = f"127.0.0.1:{port}"
    ask = (f"import ray, logging; ray.init(address={address!r}, logging_level=logging.ERROR, "
           "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))")

    def ready() -> bool:
        out = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True,
                             env=env, timeout=60)
        return out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]

    wait_for(ready, proc, f"a Ray cluster of {count} nodes", log)

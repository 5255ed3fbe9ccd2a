"""The Ray runtime a search uses: a cluster it joins, or a local one it starts and shuts down;
and Tune kept quiet, with Python's Ctrl-C handler given back afterwards."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

from imgcls.errors import ConfigError, first_line
from imgcls.train.runtime import available_cores

if TYPE_CHECKING:
    from hpo.config.store import Store
    from hpo.config.study import StudySpec
    from hpo.search.devices import Slot

# Seconds between saves of Tune's experiment state: what a restore after a crash starts from.
CHECKPOINT_EVERY_S = "1"
# Seconds to wait for the head's port to answer before joining a cluster.
JOIN_TIMEOUT_S = 10
NOTHING_ANSWERS = "nothing answers there; check --ray-address (HOST:PORT of the head, e.g. :6379)"


@contextmanager
def ray_runtime(spec: StudySpec, slots: list[Slot] | None, store: Store) -> Iterator[None]:
    """Join the cluster at spec.ray_address, or start a local runtime on this machine's cores
    and the study's GPUs (quietly: no dashboard, workers' output not relayed); shut down
    what was started here. An already running runtime (e.g. a test's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Ray's start-up notes (token authentication, the local address) are not the user's news
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    with contextlib.ExitStack() as stack:
        if spec.ray_address:
            stack.enter_context(environment(**_auth_mode()))
            _join(spec.ray_address, quiet)
        else:
            gpus = sorted({s.cuda_visible_devices or "" for s in slots or [] if s.gpu is not None})
            with environment(CUDA_VISIBLE_DEVICES=",".join(gpus)):  # Ray sees the study's GPUs
                ray.init(num_cpus=available_cores(), num_gpus=len(gpus), **quiet)  # type: ignore[arg-type]
        try:
            if spec.ray_address:
                _check_cluster(spec.ray_address, store)
            yield
        finally:
            ray.shutdown()


def _auth_mode() -> dict[str, str]:
    """Token authentication for joining a cluster where this machine has a token (as Ray does
    for `ray start` and `--address auto`, though not for an address given): RAY_AUTH_TOKEN,
    the file at RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token. RAY_AUTH_MODE set by the user wins."""
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return {"RAY_AUTH_MODE": "token"} if os.environ.get("RAY_AUTH_TOKEN") or \
        Path(path).is_file() else {}


def _join(address: str, quiet: dict[str, object]) -> None:
    """ray.init on the cluster at `address`, or one line saying why it cannot be joined: Ray's
    own account of a failed join (dozens of lines from its core, on the process's stderr) is
    kept out of sight and read for the cause."""
    import ray

    host, _, port = address.rpartition(":")
    if host and port.isdigit():  # Ray retries for minutes where nothing listens: ask first
        try:
            socket.create_connection((host, int(port)), timeout=JOIN_TIMEOUT_S).close()
        except OSError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address} "
                              f"({exc.strerror or exc}): {NOTHING_ANSWERS}") from None
    if "RAY_AUTH_MODE" in os.environ:  # Ray reads its configuration once: read it again
        with contextlib.suppress(Exception):
            from ray._raylet import Config

            Config.initialize("")
    with tempfile.TemporaryFile(mode="w+b") as said:
        try:
            with _stderr_to(said):
                ray.init(address=address, **quiet)  # type: ignore[arg-type]
            return
        except Exception as exc:  # Ray raises many kinds here: one line for each
            said.seek(0)
            why = _join_failure(exc, said.read().decode(errors="replace"))
    raise ConfigError(f"cannot join the Ray cluster at {address}: {why}")


def _join_failure(exc: BaseException, said: str) -> str:
    """The cause of a failed join, in a few words, with what to do."""
    text = f"{exc}\n{said}"
    if any(k in text for k in ("InvalidAuthToken", "Unauthenticated", "AuthenticationError",
                               "authentication token", "auth token")):
        how = ("this machine's token is not the cluster's" if os.environ.get("RAY_AUTH_MODE")
               == "token" else "it asks for a token and this machine has none")
        return (f"{how}; copy the head's ~/.ray/auth_token here, or set RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH) to it")
    if isinstance(exc, ConnectionError) or "Failed to connect to GCS" in text:
        return NOTHING_ANSWERS
    return f"{first_line(exc)}; check --ray-address"


@contextmanager
def _stderr_to(file: IO[bytes]) -> Iterator[None]:
    """The process's stderr (file descriptor 2, where Ray's core writes) sent to `file`."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(file.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _check_cluster(address: str, store: Store) -> None:
    """Refuse a cluster of several nodes with a store only this machine can reach: each node's
    trials would write their runs into their own copy of a local MLflow database."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and store.tracking_is_local:
        raise ConfigError(
            f"the Ray cluster at {address} has {len(nodes)} nodes, and a local store "
            f"({store.root}) would be written on each; use --tracking-uri with an MLflow "
            "tracking server, and a --store folder every node shares")


@contextmanager
def environment(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def quiet_tune() -> Iterator[None]:
    """Tune without its console tables and with its experiment state saved every second; and
    Ctrl-C handled by Python again afterwards (Tune leaves its own handler installed)."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)} if main else {}
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.ERROR)  # "trials did not complete" and the like: ours to say
    try:
        with environment(RAY_AIR_NEW_OUTPUT="0", TUNE_GLOBAL_CHECKPOINT_S=CHECKPOINT_EVERY_S,
                          TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
            yield
    finally:
        tune_log.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


"""The Ray runtime a search uses: a cluster it joins, or a local one it starts and shuts down;
and Tune kept quiet, with Python's Ctrl-C handler given back afterwards."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from imgcls.errors import ConfigError, first_line
from imgcls.train.runtime import available_cores

if TYPE_CHECKING:
    from hpo.config.study import StudySpec
    from hpo.search.devices import Slot

# Seconds between saves of Tune's experiment state: what a restore after a crash starts from.
CHECKPOINT_EVERY_S = "1"


@contextmanager
def ray_runtime(spec: StudySpec, slots: list[Slot] | None) -> Iterator[None]:
    """Join the cluster at spec.ray_address, or start a local runtime on this machine's cores
    and the study's GPUs (quietly: no dashboard, workers' output not relayed); shut down
    what was started here. An already running runtime (e.g. a test's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Ray's start-up notes (token authentication, the local address) are not the user's news
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if spec.ray_address:
        try:
            ray.init(address=spec.ray_address, **quiet)  # type: ignore[arg-type]
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at {spec.ray_address}: "
                              f"{first_line(exc)}; check --ray-address") from None
    else:
        gpus = sorted({s.cuda_visible_devices or "" for s in slots or [] if s.gpu is not None})
        with environment(CUDA_VISIBLE_DEVICES=",".join(gpus)):  # Ray sees the study's GPUs
            ray.init(num_cpus=available_cores(), num_gpus=len(gpus), **quiet)  # type: ignore[arg-type]
    try:
        yield
    finally:
        ray.shutdown()


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


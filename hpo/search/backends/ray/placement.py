"""How a study's trials are placed on Ray: slots, each trial's share of the cores and GPUs, and
what a trial actor needs to rebuild the study's context where it runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpo.config.study import StudySpec

if TYPE_CHECKING:
    from hpo.search.devices import Slot


@dataclass(frozen=True)
class TrialSetup:
    """What a trial actor needs to rebuild the study's context: sent once per Tune run."""

    spec: StudySpec  # with the data path made absolute: actors run in their own folders
    cache_dir: str  # the store's decoded-image cache: actors read it, never decode
    tracking_uri: str
    artifact_root: str | None
    experiment_id: str
    study_run_id: str
    use_gpu: bool
    threads: int  # torch intra-op threads per trial: its share of the cores
    pbt: bool = False  # Population Based Training: trials log what it perturbs, each epoch


@dataclass(frozen=True)
class Placement:
    slots: int  # trials at a time
    resources: dict[str, float]  # per trial: {"cpu": cores share, "gpu": 1 / trials_per_gpu}
    threads: int

    @property
    def use_gpu(self) -> bool:
        return self.resources.get("gpu", 0) > 0


def plan_placement(spec: StudySpec, cluster: Mapping[str, float], slots: list[Slot] | None
                   ) -> Placement:
    """Slots and per-trial resources. `slots`: this machine's plan (a local runtime), None for
    a cluster, whose resources (`cluster`: ray.cluster_resources()) decide instead."""
    cores = float(cluster.get("CPU", 1))
    if slots is not None:
        count, use_gpu = len(slots), slots[0].gpu is not None
    else:
        gpus = int(cluster.get("GPU", 0)) if spec.gpus != "none" else 0
        use_gpu = gpus > 0
        count = gpus * spec.trials_per_gpu if use_gpu else spec.workers
    resources = {"cpu": cores / count}
    if use_gpu:
        resources["gpu"] = 1 / spec.trials_per_gpu
    return Placement(count, resources, max(1, int(cores // count)))


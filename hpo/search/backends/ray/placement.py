"""How a study's trials are placed on Ray: slots, each trial's share of the cores and GPUs, and
what a trial actor needs to rebuild the study's context where it runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def plan_placement(spec: StudySpec, nodes: Sequence[Mapping[str, float]],
                   slots: list[Slot] | None) -> Placement:
    """Slots and per-trial resources. `nodes`: each live node's resources (ray.nodes()).
    `slots`: this machine's plan (a local runtime), None for a cluster, whose nodes decide:
    `workers` trials on each node without GPUs (or `trials_per_gpu` on each GPU), each asking
    for a share of the cores that the smallest such node has, so that every trial fits on one
    node (a request no node can meet would wait forever)."""
    if slots is not None:
        cores = sum(n.get("CPU", 0.0) for n in nodes) or 1.0
        count, use_gpu = len(slots), slots[0].gpu is not None
        cpu = cores / count
    else:
        with_cpu = [n for n in nodes if n.get("CPU", 0.0) > 0] or [{"CPU": 1.0}]
        gpu_nodes = [n for n in with_cpu if n.get("GPU", 0.0) >= 1] if spec.gpus != "none" else []
        use_gpu = bool(gpu_nodes)
        if use_gpu:
            count = sum(int(n["GPU"]) for n in gpu_nodes) * spec.trials_per_gpu
            cpu = min(n["CPU"] / (int(n["GPU"]) * spec.trials_per_gpu) for n in gpu_nodes)
        else:
            count = spec.workers * len(with_cpu)
            cpu = min(n["CPU"] for n in with_cpu) / spec.workers
    resources = {"cpu": cpu}
    if use_gpu:
        resources["gpu"] = 1 / spec.trials_per_gpu
    return Placement(count, resources, max(1, int(cpu)))

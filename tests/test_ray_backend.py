"""The Ray Tune backend's own parts: the space in Ray's terms, its settings, placement, and (slow,
with one Ray runtime for the module) pruning by a scheduler, interruption and restore."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from hpo.config.space import Choice, FloatRange, IntRange, SearchSpace
from hpo.config.store import Store
from hpo.config.study import StudyError, load_study
from hpo.config.trial import TrialOutcome, TrialState
from hpo.search import devices
from hpo.search.backends.optuna.pruners import PRUNERS
from hpo.search.backends.ray import backend as ray_backend
from hpo.search.backends.ray.backend import RayBackend
from hpo.search.backends.ray.placement import plan_placement
from hpo.search.backends.ray.schedulers import SCHEDULERS, make_scheduler
from hpo.search.backends.ray.space import from_ray, to_ray
from hpo.search.events import NullObserver
from hpo.search.run import run_search
from imgcls.errors import ConfigError
from tests.conftest import InterruptAt

SPACE = SearchSpace((
    FloatRange("lr", 1e-4, 1e-1, log=True),
    FloatRange("dropout", 0.0, 0.5),
    IntRange("batch_size", 8, 12),
    IntRange("lr_step_epochs", 1, 9, log=True),
    Choice("arch", ("simplecnn", "resnet18")),
    Choice("nesterov", (True, False)),
))


def _runs(store: Store, role: str) -> list[Any]:
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.imgcls_hpo.role = '{role}'")


# --- the space ---------------------------------------------------------------------------------


def test_ray_domains_draw_only_values_of_the_declared_space_bounds_included() -> None:
    domains = to_ray(SPACE)
    assert set(domains) == {p.name for p in SPACE.searched}
    rng = np.random.default_rng(0)
    for name, domain in domains.items():
        drawn = [from_ray(SPACE, {name: v})[name] for v in domain.sample(size=2000,
                                                                          random_state=rng)]
        assert all(SPACE.contains(name, v) for v in drawn), name
        param = SPACE[name]
        if isinstance(param, IntRange):  # both ends drawn: HIGH too, though Ray's is exclusive
            assert (min(drawn), max(drawn)) == (param.low, param.high), name
        if isinstance(param, Choice):
            assert set(drawn) == set(param.choices), name


def test_the_searcher_sees_the_declared_bounds() -> None:
    """OptunaSearch reads Ray's exclusive integer bound back as the inclusive one."""
    from ray.tune.search.optuna import OptunaSearch

    distributions = OptunaSearch.convert_search_space(to_ray(SPACE))
    assert (distributions["batch_size"].low, distributions["batch_size"].high) == (8, 12)
    assert (distributions["lr_step_epochs"].high, distributions["lr_step_epochs"].log) == (9, True)
    assert (distributions["lr"].low, distributions["lr"].high, distributions["lr"].log) == \
        (1e-4, 1e-1, True)
    assert distributions["nesterov"].choices == (True, False)


def test_a_trial_config_comes_back_typed_and_inside_the_bounds() -> None:
    config = {"lr": np.float64(0.10000000000000002), "batch_size": np.int64(12),
              "dropout": 0.25, "nesterov": np.bool_(True), "arch": "resnet18", "other": 3}
    values = from_ray(SPACE, config)
    assert values == {"lr": 0.1, "batch_size": 12, "dropout": 0.25, "nesterov": True,
                      "arch": "resnet18"}
    assert type(values["batch_size"]) is int and type(values["nesterov"]) is bool


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ({"sampler": "cmaes"}, "the Ray backend samples with tpe or random, not 'cmaes'"),
    ({"pruner": "median"}, r"pruner 'median' is not available with the Ray backend: Tune has "
                           r"no scheduler .*; use --pruner sha, hyperband, pbt, none"),
    ({"pruner": "patient"}, r"pruner 'patient' is not available with the Ray backend"),
    ({"pruner": "asha"}, r"unknown Ray pruner 'asha'; did you mean 'sha'\? \(known: sha, "
                          r"hyperband, pbt, none"),
    ({"objective": ["val_f1:max", "flops:min"]}, "Pareto.* runs on the Optuna backend"),
    ({"ray_address": "10.0.0.1:6379", "gpus": "0,1"},
     "--gpus 0,1 names this machine's GPUs, but trials run on the Ray cluster"),
    ({"ray_address": "ray://head:10001"}, r"is a Ray Client address; run `imgcls-hpo search` "
                                          r"on a node of the cluster"),
])
def test_settings_ray_cannot_honour_fail_before_any_data_is_read(
        study_file: Path, override: dict[str, Any], message: str) -> None:
    spec = load_study(str(study_file), {"backend": "ray", **override})
    with pytest.raises(ConfigError, match=message):
        RayBackend().check(spec)


def _optuna_rungs(pruner: Any, max_epochs: int) -> list[list[int]]:
    """The epochs at which each bracket of an Optuna successive-halving or HyperBand pruner
    compares trials, read from its own objects (Optuna 5's private attributes)."""
    import optuna

    study = optuna.create_study(pruner=pruner)
    pruner._try_initialization(study) if hasattr(pruner, "_try_initialization") else None
    halvings = getattr(pruner, "_pruners", None) or [pruner]
    rungs = []
    for sha in halvings:
        low, factor = sha._min_resource, sha._reduction_factor
        start = sha._min_early_stopping_rate
        rungs.append([low * factor ** (start + k) for k in range(8)
                      if low * factor ** (start + k) < max_epochs])
    return rungs


@pytest.mark.parametrize(("name", "max_epochs"), [("sha", 3), ("sha", 10), ("sha", 30),
                                                  ("hyperband", 9), ("hyperband", 27)])
def test_a_pruner_name_compares_at_the_same_epochs_on_both_backends(
        study_file: Path, name: str, max_epochs: int) -> None:
    spec = load_study(str(study_file), {"backend": "ray", "pruner": name,
                                        "max_epochs": max_epochs})
    tune = make_scheduler(spec)
    optuna_rungs = _optuna_rungs(PRUNERS.get(name)(max_epochs), max_epochs)
    if name == "sha":  # ASHA
        assert (tune._time_attr, tune._max_t) == ("epoch", max_epochs)
        # the epochs before the last, where a trial can be stopped early (after its last epoch
        # it completes on both)
        assert [sorted(rung for rung, _ in bracket._rungs if rung < max_epochs)
                for bracket in tune._brackets] == optuna_rungs
    else:  # synchronous HyperBand: bracket s starts at max_epochs / 3**s, then x3
        assert (type(tune).__name__, tune._time_attr, tune._max_t_attr) == (
            "HyperBandScheduler", "epoch", max_epochs)
        s_max = len(optuna_rungs) - 1
        ray_rungs = [[round(max_epochs / 3 ** s) * 3 ** k for k in range(s)]
                     for s in range(s_max, -1, -1)]
        assert ray_rungs == optuna_rungs


def test_only_pruners_both_backends_mean_alike_run_on_ray_and_pbt_on_ray_only(
        study_file: Path) -> None:
    from hpo.search.backends.optuna.backend import OptunaBackend

    assert set(SCHEDULERS.names()) - set(PRUNERS.names()) == {"pbt"}
    spec = load_study(str(study_file), {"backend": "ray", "pruner": "none"})
    assert type(make_scheduler(spec)).__name__ == "FIFOScheduler"
    with pytest.raises(ConfigError, match="pruner 'pbt' runs on the Ray backend only: "
                                          "Population Based Training"):
        OptunaBackend().check(spec.model_copy(update={"pruner": "pbt"}))


def test_pbt_perturbs_what_may_change_within_the_declared_space(study_file: Path) -> None:
    spec = load_study(str(study_file), {"backend": "ray", "pruner": "pbt", "max_epochs": 8})
    pbt = make_scheduler(spec)
    assert type(pbt).__name__ == "PopulationBasedTraining"
    assert pbt._perturbation_interval == 2  # a quarter of max_epochs
    assert set(pbt._hyperparam_mutations) == {"lr"}  # batch_size and dropout stay put
    with pytest.raises(ConfigError, match="searches none it may change"):
        RayBackend().check(spec.model_copy(update={"space": SearchSpace(
            (IntRange("batch_size", 4, 8),))}))


def test_a_stored_ray_study_keeps_its_objective(study_file: Path, store: Store) -> None:
    backend = RayBackend()
    study = backend.open(load_study(str(study_file), {"backend": "ray"}), store)
    study.set_attr("mlflow_run_id", "abc")
    assert (store.root / "ray" / "tiny" / "imgcls_hpo.json").is_file()
    assert RayBackend().open(load_study(str(study_file)), store).get_attr("mlflow_run_id") == "abc"
    with pytest.raises(StudyError, match="optimizes val_f1, not val_loss"):
        backend.open(load_study(str(study_file), {"objective": "val_loss"}), store)


# --- placement -----------------------------------------------------------------------------------


def _two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [devices.GpuInfo(0, "test GPU", 8 << 30), devices.GpuInfo(1, "test GPU", 8 << 30)]
    monkeypatch.setattr(devices, "discover_gpus", lambda: gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_trials_share_the_gpus_and_the_cores(study_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _two_gpus(monkeypatch)
    spec = load_study(str(study_file), {"backend": "ray", "gpus": "all", "trials_per_gpu": 2})
    slots = devices.plan_slots(spec.gpus, spec.trials_per_gpu, spec.workers, cpu_count=8)
    placement = plan_placement(spec, [{"CPU": 8.0, "GPU": 2.0}], slots)
    assert placement.slots == 4
    assert placement.resources == {"cpu": 2.0, "gpu": 0.5} and placement.threads == 2
    # a cluster: its own GPUs decide, whatever this machine has
    assert plan_placement(spec, [{"CPU": 64.0, "GPU": 8.0}], None).slots == 16
    cpu = load_study(str(study_file), {"backend": "ray", "gpus": "none", "workers": 3})
    on_cpu = plan_placement(cpu, [{"CPU": 6.0, "GPU": 8.0}], None)
    assert (on_cpu.slots, on_cpu.resources, on_cpu.use_gpu) == (3, {"cpu": 2.0}, False)


def test_on_a_cluster_every_trial_fits_on_one_node(study_file: Path) -> None:
    """Two 1-core nodes: two trials of one core each, not one of two cores that no node has."""
    spec = load_study(str(study_file), {"backend": "ray"})
    two = plan_placement(spec, [{"CPU": 1.0}, {"CPU": 1.0}], None)
    assert (two.slots, two.resources) == (2, {"cpu": 1.0})
    # GPU nodes of different sizes: each trial asks what the smallest can give per GPU
    mixed = plan_placement(spec, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 16.0, "GPU": 4.0},
                                  {"CPU": 2.0}], None)
    assert (mixed.slots, mixed.resources) == (5, {"cpu": 4.0, "gpu": 1.0})


def test_a_local_runtime_is_planned_before_search_pins_its_process(
        study_file: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    _two_gpus(monkeypatch)
    backend = RayBackend()
    spec = load_study(str(study_file), {"backend": "ray", "gpus": "1"})
    backend.check(spec)  # run_search checks, then pins itself to GPU 1, then opens the study
    monkeypatch.setattr(devices, "discover_gpus",
                        lambda: [devices.GpuInfo(0, "test GPU", 8 << 30)])
    (slot,) = backend.open(spec, store).slots  # type: ignore[misc]
    assert (slot.gpu, slot.cuda_visible_devices) == (1, "1")


@pytest.mark.slow
def test_importing_hpo_does_not_import_ray() -> None:
    code = ("import sys, hpo, hpo.search.backends, hpo.search.run\n"
            "from hpo.search.backends.ray.schedulers import SCHEDULERS\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- whole searches ------------------------------------------------------------------------------


class Events(NullObserver):
    def __init__(self) -> None:
        self.finished: list[TrialOutcome] = []
        self.epochs: list[tuple[int, int]] = []

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        self.epochs.append((number, epoch))

    def trial_finished(self, outcome: TrialOutcome) -> None:
        self.finished.append(outcome)


def _stop_trial_0_after_epoch_1() -> Any:
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class StopFirst(FIFOScheduler):
        """Stops the first trial it hears of after its first epoch, like a pruner would."""

        first: str | None = None

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]
                            ) -> str:
            self.first = self.first or trial.trial_id
            stop = trial.trial_id == self.first and result["epoch"] == 1
            return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    return StopFirst()


@pytest.mark.slow
def test_a_trial_the_scheduler_stops_ends_pruned(study_file: Path, store: Store,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 ray_runtime: None) -> None:
    monkeypatch.setattr(ray_backend, "make_scheduler", lambda spec: _stop_trial_0_after_epoch_1())
    events = Events()
    spec = load_study(str(study_file), {"backend": "ray", "trials": 2, "max_epochs": 3})
    result = run_search(spec, store, events)
    assert [(t.number, t.state, t.epochs) for t in result.trials] == [
        (0, "PRUNED", 1), (1, "COMPLETE", 3)]
    assert [(t.number, t.state) for t in events.finished] == [(0, "PRUNED"), (1, "COMPLETE")]
    assert events.finished[0].test["test_f1"] == result.trials[0].test["test_f1"]
    client = MlflowClient(store.tracking_uri)
    pruned = client.get_run(result.trials[0].run_id)  # type: ignore[arg-type]
    assert (pruned.info.status, pruned.data.tags["imgcls_hpo.state"]) == ("FINISHED", "PRUNED")
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val_f1")] == [1]
    assert pruned.data.metrics["best_val_f1"] == pytest.approx(result.trials[0].value)
    assert pruned.data.tags["imgcls_hpo.device"] == "cpu"
    assert pruned.data.tags["imgcls_hpo.worker"] == f"{socket.gethostname()}/ray-cpu"


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_counting_the_interrupted_trial(
        study_file: Path, store: Store, ray_runtime: None) -> None:
    spec = load_study(str(study_file), {"backend": "ray", "trials": 2})
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, store, InterruptAt(trial=1))
    (study_run,) = _runs(store, "study")
    assert study_run.info.status == "KILLED"

    result = run_search(spec, store)
    assert [(t.number, t.state, t.fail_reason) for t in result.trials] == [
        (0, "COMPLETE", None), (1, TrialState.INTERRUPTED, "interrupted"), (2, "COMPLETE", None)]
    (study_run,) = _runs(store, "study")
    assert study_run.info.status == "FINISHED"
    assert sorted(r.info.status for r in _runs(store, "trial")) == [
        "FINISHED", "FINISHED", "KILLED"]
    # and a timeout already passed starts nothing more
    late = run_search(load_study(str(study_file), {"backend": "ray", "trials": 5,
                                                   "timeout": 1e-6}), store)
    assert len(late.trials) == 3


DRIVER = """\
import sys, time
from pathlib import Path
from hpo.search.events import NullObserver
from hpo.search.run import run_search
from hpo.config.store import Store
from hpo.config.study import load_study

class SlowTrial1(NullObserver):  # trial 1 trains for seconds: long enough to be killed in
    def epoch_finished(self, number, epoch, metrics):
        if number == 1:
            Path(sys.argv[4]).touch()
            time.sleep(0.5)

spec = load_study(sys.argv[1], {"backend": "ray", "trials": 2, "max_epochs": 12,
                               "ray_address": sys.argv[3]})
run_search(spec, Store.resolve(sys.argv[2]), SlowTrial1())
"""


@pytest.mark.slow
@pytest.mark.parametrize("replaced", [False, True], ids=["as-left", "checkpoint-replaced"])
def test_a_killed_search_is_restored_and_its_trials_go_on_from_their_checkpoints(
        study_file: Path, store: Store, tmp_path: Path, ray_runtime: None,
        replaced: bool) -> None:
    import ray

    marker = tmp_path / "trial-1-training"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(study_file),
         str(store.root), ray.get_runtime_context().gcs_address, str(marker)])
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "trial 1 never started training"
        time.sleep(3)  # Tune saves its state every second
    finally:
        driver.kill()  # the search dies with trial 1 half-trained: no cleanup at all
        driver.wait()
    (lost,) = [r for r in _runs(store, "trial") if r.data.tags["imgcls_hpo.trial_number"] == "1"]
    assert lost.data.tags["imgcls_hpo.state"] == "RUNNING"
    if replaced:  # killed after Tune replaced the checkpoint its saved state names
        for folder in sorted((store.root / "ray").glob("*/*/checkpoint_*"), reverse=True):
            number = int(folder.name.removeprefix("checkpoint_"))
            folder.rename(folder.with_name(f"checkpoint_{number + 1:06d}"))

    spec = load_study(str(study_file), {"backend": "ray", "trials": 2, "max_epochs": 12})
    result = run_search(spec, store)
    # Tune restored trial 1 from its checkpoint: it went on in its own run, to its end
    assert [(t.number, t.state) for t in result.trials] == [
        (0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert result.trials[1].run_id == lost.info.run_id
    steps = [m.step for m in MlflowClient(store.tracking_uri).get_metric_history(
        lost.info.run_id, "val_f1")]
    assert steps == list(range(1, 13))  # each epoch logged once
    statuses = {r.data.tags["imgcls_hpo.trial_number"]: r.info.status
                for r in _runs(store, "trial")}
    assert statuses == {"0": "FINISHED", "1": "FINISHED"}


class Resumes(Events):
    def __init__(self) -> None:
        super().__init__()
        self.resumed: list[tuple[int, int, str | None]] = []

    def trial_resumed(self, number: int, epochs: int, why_not: str | None) -> None:
        self.resumed.append((number, epochs, why_not))


def _each_epoch_once(store: Store) -> None:
    client = MlflowClient(store.tracking_uri)
    for run in _runs(store, "trial"):
        assert run.info.status == "FINISHED", run.data.tags
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps == sorted(set(steps)) and steps[0] == 1, steps


@pytest.mark.slow
def test_pbt_restarts_the_worst_trials_from_the_best_with_perturbed_values(
        study_file: Path, store: Store, ray_runtime: None) -> None:
    events = Resumes()
    spec = load_study(str(study_file), {"backend": "ray", "pruner": "pbt", "trials": 4,
                                        "workers": 4, "max_epochs": 6,
                                        "perturbation_interval": 2, "objective": "val_loss"})
    result = run_search(spec, store, events)
    assert [t.number for t in result.trials] == [0, 1, 2, 3]
    assert {t.state for t in result.trials} == {TrialState.COMPLETE}
    exploits = {r.data.tags["imgcls_hpo.trial_number"]: {k: v for k, v in r.data.tags.items()
                                                        if k.startswith("imgcls_hpo.exploit.")}
                for r in _runs(store, "trial")}
    tagged = [tags for tags in exploits.values() if tags]
    assert tagged, "no trial was restarted from another's checkpoint"
    assert all(v.startswith("from trial ") and "lr=" in v and "momentum" not in v
               for tags in tagged for v in tags.values())  # what the study searches
    client = MlflowClient(store.tracking_uri)
    for run in _runs(store, "trial"):  # the values PBT may change, epoch by epoch
        assert [m.step for m in client.get_metric_history(run.info.run_id, "pbt_lr")][:1] == [1]
    _each_epoch_once(store)


@pytest.mark.slow
def test_hyperband_pauses_trials_at_its_rungs_and_resumes_them_from_checkpoints(
        study_file: Path, store: Store, ray_runtime: None) -> None:
    events = Resumes()
    spec = load_study(str(study_file), {"backend": "ray", "pruner": "hyperband", "trials": 6,
                                        "workers": 2, "max_epochs": 9})
    result = run_search(spec, store, events)
    assert len(result.trials) == 6
    assert {t.state for t in result.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert any(epochs > 0 and why is None for _, epochs, why in events.resumed)
    _each_epoch_once(store)
    assert not list((store.root / "ray" / "tiny").glob("*/checkpoint_*"))  # removed at the end

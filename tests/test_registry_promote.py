"""Promotion to the Model Registry and the registered pyfunc, on a real 3-trial study.

The search runs once per module; each test gets its own copy of the tracking database, so
promotions in one test do not show in another (artifacts are shared: they are write-once)."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from hpo.after.ensemble import TAG_MEMBERS, promote_ensemble
from hpo.after.models import DEFAULT_ALIAS, resolve_model
from hpo.after.promote import PREVIOUS_ALIAS, choose_trial, promote, version_tags
from hpo.after.serving import CLASSIFIER, image_inputs, prediction_frame
from hpo.config.store import Store
from hpo.config.study import StudyError, load_study
from hpo.config.trial import TrialOutcome, Trials, TrialState
from hpo.search.run import run_search
from hpo.tracking.client import Tracker, fluent_tracking_uri
from hpo.tracking.records import StudyRecord, load_record
from hpo.tracking.tags import MODEL_NAME, TAG_STUDY, TAG_TRIAL
from imgcls.errors import ConfigError, DataError
from imgcls.metrics import metric_goal
from tests.conftest import TINY_STUDY, make_image_folder


@dataclasses.dataclass(frozen=True)
class Searched:
    store: Store  # the store the search wrote; its database is the template each test copies
    images: Path  # the study's image folder (class folders ants/ and bees/)


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path) -> Searched:
    root = tmp_path_factory.mktemp("promote")
    images = make_image_folder(root / "data")
    (root / "tiny.yaml").write_text(TINY_STUDY.format(data=images, trials=3))
    (root / "store").mkdir()
    shutil.copy(_empty_mlflow_db, root / "store" / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        store = Store.resolve(root / "store")
        result = run_search(load_study(str(root / "tiny.yaml"), {"trials": 3}), store)
    assert [t.state for t in result.trials] == ["COMPLETE"] * 3
    return Searched(store, images)


@pytest.fixture
def tracker(searched: Searched, tmp_path: Path) -> Tracker:
    """A tracker on this test's own copy of the searched study's database."""
    database = tmp_path / "mlflow.db"
    shutil.copy(searched.store.root / "mlflow.db", database)
    return Tracker(f"sqlite:///{database}", searched.store.artifact_root)


@pytest.fixture
def record(tracker: Tracker) -> StudyRecord:
    return load_record(tracker, "tiny")


def _best(record: StudyRecord, key: str) -> TrialOutcome:
    """The trial a user expects: best value of `key`, the lowest trial number on a tie."""
    trials = [t for t in record.trials if t.state == "COMPLETE"]
    pick = max if metric_goal(key) == "max" else min
    return pick(trials, key=lambda t: t.metrics[key])


def _logged(tracker: Tracker, record: StudyRecord, run_id: str, name: str) -> int:
    found = tracker.client.search_logged_models(
        [record.experiment_id], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    return len(found)


def _aliases(tracker: Tracker, name: str = "tiny-classifier") -> dict[str, int]:
    return {k: int(v) for k, v in tracker.client.get_registered_model(name).aliases.items()}


def _file(searched: Searched, cls: str, i: int = 0) -> Path:
    return searched.images / cls / f"{i:03d}.png"


# -- promote -----------------------------------------------------------------------------------

def test_promote_registers_the_best_trial_behind_the_alias(tracker: Tracker,
                                                           record: StudyRecord) -> None:
    best = _best(record, "best_val_f1")
    before = tracker.client.get_run(best.run_id).info

    promotion = promote(tracker, record)

    assert (promotion.name, promotion.version, promotion.alias) == ("tiny-classifier", 1,
                                                                   DEFAULT_ALIAS)
    assert promotion.uri == "models:/tiny-classifier@champion"
    assert (promotion.run_id, promotion.trial) == (best.run_id, best.number)
    assert promotion.metric == "best_val_f1" and promotion.value == best.metrics["best_val_f1"]
    assert promotion.previous_version is None and promotion.created
    version = tracker.client.get_model_version_by_alias("tiny-classifier", DEFAULT_ALIAS)
    assert (int(version.version), version.run_id) == (1, best.run_id)
    # the classifier joins the trial's run; the finished run is not reopened
    assert _logged(tracker, record, best.run_id, CLASSIFIER) == 1
    after = tracker.client.get_run(best.run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time)


def test_promoting_the_same_run_again_reuses_its_version(tracker: Tracker,
                                                         record: StudyRecord) -> None:
    first = promote(tracker, record)
    again = promote(tracker, record, run_id=first.run_id)
    assert (again.version, again.created, again.previous_version) == (first.version, False, None)
    assert len(tracker.client.search_model_versions("name = 'tiny-classifier'")) == 1
    assert _logged(tracker, record, first.run_id, CLASSIFIER) == 1
    assert _aliases(tracker) == {DEFAULT_ALIAS: first.version}


def test_another_run_takes_the_alias_and_the_old_version_becomes_previous(
        tracker: Tracker, record: StudyRecord) -> None:
    first = promote(tracker, record)
    other = next(t for t in record.trials if t.run_id != first.run_id)

    second = promote(tracker, record, run_id=other.run_id)
    assert (second.version, second.trial) == (2, other.number)
    assert second.previous_version == first.version
    assert _aliases(tracker) == {DEFAULT_ALIAS: 2, PREVIOUS_ALIAS: first.version}
    assert tracker.client.get_model_version("tiny-classifier", "1").run_id == first.run_id

    # promoting the first run again is a rollback: its version comes back, none is added
    back = promote(tracker, record, run_id=first.run_id)
    assert (back.version, back.created, back.previous_version) == (first.version, False, 2)
    assert _aliases(tracker) == {DEFAULT_ALIAS: first.version, PREVIOUS_ALIAS: 2}


def test_promote_by_another_metric_ranks_by_that_metric(tracker: Tracker,
                                                        record: StudyRecord) -> None:
    # a metric whose best trial differs from the objective's, so that the alias must move
    objective_best = _best(record, "best_val_f1")
    candidates = ["min_val_loss", "test_log_loss", "val_loss", "train_loss", "train_seconds"]
    metric = next((m for m in candidates if _best(record, m).run_id != objective_best.run_id),
                  None)
    assert metric is not None, "every metric picked the same trial; change the tiny study"
    first = promote(tracker, record)

    by_metric = promote(tracker, record, metric=metric)
    expected = _best(record, metric)
    assert (by_metric.run_id, by_metric.metric) == (expected.run_id, metric)
    assert by_metric.value == expected.metrics[metric]
    assert _aliases(tracker) == {DEFAULT_ALIAS: by_metric.version,
                                 PREVIOUS_ALIAS: first.version}


def test_choose_trial_follows_each_metrics_direction(record: StudyRecord) -> None:
    for metric in ("min_val_loss", "test_acc", "flops", "val_f1"):
        key = "best_val_f1" if metric == "val_f1" else metric  # the objective means its best
        trial, used = choose_trial(record, metric=metric)
        assert used == key
        assert trial.metrics[key] == _best(record, key).metrics[key]


def test_promote_by_peak_memory_takes_the_trial_that_used_the_least(
        tracker: Tracker, record: StudyRecord) -> None:
    # a cost ranks lowest first, as every cost a trial logs does (imgcls.metrics.COSTS)
    memory = {0: 300.0, 1: 100.0, 2: 200.0}
    crafted = dataclasses.replace(record, trials=Trials(record.objective, (
        dataclasses.replace(t, metrics={**t.metrics, "peak_memory_mb": memory[t.number]})
        for t in record.trials)))
    done = promote(tracker, crafted, metric="peak_memory_mb")
    assert (done.trial, done.metric, done.value) == (1, "peak_memory_mb", 100.0)


def test_the_version_is_tagged_with_what_it_is(tracker: Tracker, record: StudyRecord) -> None:
    promotion = promote(tracker, record)
    trial = next(t for t in record.trials if t.run_id == promotion.run_id)
    tags = tracker.client.get_model_version("tiny-classifier", str(promotion.version)).tags
    assert tags[TAG_STUDY] == "tiny" and tags[TAG_TRIAL] == str(trial.number)
    assert set(record.searched) == {"lr", "batch_size", "dropout"}
    for name in record.searched:
        assert tags[name] == str(trial.params[name])
    assert float(tags["best_val_f1"]) == trial.metrics["best_val_f1"]
    test_metrics = {k for k in trial.metrics if k.startswith("test_")}
    assert {"test_f1", "test_f1_ci_low", "test_f1_ci_high"} <= test_metrics
    assert {k for k in tags if k.startswith("test_")} == test_metrics
    assert all(float(tags[k]) == trial.metrics[k] for k in test_metrics)
    assert version_tags(record, trial) == tags


def test_promote_errors_name_the_problem(tracker: Tracker, record: StudyRecord) -> None:
    pruned = dataclasses.replace(record, trials=Trials(record.objective, (
        dataclasses.replace(t, state=TrialState.PRUNED if t.number else TrialState.FAILED)
        for t in record.trials)))
    with pytest.raises(StudyError, match=r"no COMPLETE trial to promote \(1 failed, 2 pruned\)"):
        promote(tracker, pruned)
    with pytest.raises(StudyError, match=r"metric 'val_fi'; did you mean 'val_f1'\? \(logged: "):
        promote(tracker, record, metric="val_fi")
    with pytest.raises(StudyError, match="run 0123abc is not a trial of study 'tiny'"):
        promote(tracker, record, run_id="0123abc")
    with pytest.raises(StudyError, match=r"trial 2 \(run \w+\) of study 'tiny' is PRUNED"):
        promote(tracker, pruned, run_id=pruned.trials[2].run_id)
    with pytest.raises(ConfigError, match="by metric or by run, not both"):
        promote(tracker, record, metric="test_f1", run_id=record.trials[0].run_id)
    with pytest.raises(ConfigError, match="alias 'previous' is set by promotion itself"):
        promote(tracker, record, alias=PREVIOUS_ALIAS)
    with pytest.raises(ConfigError, match="reserved"):
        promote(tracker, record, alias="latest")
    with pytest.raises(ConfigError, match="cannot contain '/'"):
        promote(tracker, record, name="a/b")
    # a COMPLETE trial whose run has no model (logging it failed, or it was deleted)
    run = tracker.client.create_run(record.experiment_id)
    bare = TrialOutcome(7, TrialState.COMPLETE, value=2.0, metrics={"best_val_f1": 2.0},
                        run_id=run.info.run_id)
    with_bare = dataclasses.replace(record, trials=Trials(record.objective,
                                                          (*record.trials, bare)))
    with pytest.raises(StudyError, match=rf"trial 7 \(run {run.info.run_id}\) of study 'tiny' "
                                         "has no logged model 'model'"):
        promote(tracker, with_bare)
    assert tracker.client.search_registered_models() == []  # no error left anything behind


# -- the registered model ----------------------------------------------------------------------

def test_every_reference_loads_the_same_weights(tracker: Tracker, record: StudyRecord,
                                                searched: Searched) -> None:
    promotion = promote(tracker, record)
    files = [_file(searched, "ants"), _file(searched, "bees")]
    refs = ["tiny", promotion.uri, f"models:/tiny-classifier/{promotion.version}",
            f"runs:/{promotion.run_id}/{MODEL_NAME}", f"runs:/{promotion.run_id}/{CLASSIFIER}"]
    probabilities = []
    for ref in refs:
        uri, predictor = resolve_model(tracker, ref)
        assert uri == (promotion.uri if ref == "tiny" else ref)
        assert predictor.classes == ("ants", "bees")
        probabilities.append(predictor.probabilities(files))
    assert probabilities[0].shape == (2, 2)
    np.testing.assert_allclose(probabilities[0].sum(axis=1), 1.0, rtol=1e-6)
    for other in probabilities[1:]:
        np.testing.assert_allclose(other, probabilities[0], rtol=1e-5, atol=1e-6)


def test_unknown_references_say_what_was_looked_for(tracker: Tracker,
                                                    record: StudyRecord) -> None:
    with pytest.raises(ConfigError, match=r"no registered model 'tiny-classifier' in the "
                                          r"tracking store .*; promote a trial first: "
                                          r"`imgcls-hpo promote tiny`"):
        resolve_model(tracker, "tiny")
    promote(tracker, record)
    with pytest.raises(ConfigError, match=r"has no alias 'staging' \(aliases: champion "
                                          r"\(version 1\)\)"):
        resolve_model(tracker, "models:/tiny-classifier@staging")
    with pytest.raises(ConfigError, match=r"has no version 5 \(versions: 1\)"):
        resolve_model(tracker, "models:/tiny-classifier/5")
    with pytest.raises(ConfigError, match="no run 'nope' in the tracking store"):
        resolve_model(tracker, "runs:/nope/model")
    run_id = record.trials[0].run_id
    with pytest.raises(ConfigError, match=rf"run {run_id} has no model 'weights' \(its models: "
                                          r"(classifier, )?model\)"):
        resolve_model(tracker, f"runs:/{run_id}/weights")
    with pytest.raises(ConfigError, match="model reference 's3://b/m' is none of models:/"):
        resolve_model(tracker, "s3://b/m")


class _Payload(mlflow.pyfunc.PythonModel):
    """A pyfunc whose loading runs code: it writes a file when its context is loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def load_context(self, context: object) -> None:
        Path(self.marker).write_text("ran")

    def predict(self, context, model_input):  # type: ignore[no-untyped-def]  # MLflow reads hints
        return model_input


class _PickledPayload(torch.nn.Linear):
    """A module whose pickle, once loaded, opens (creates) a file."""

    marker = ""

    def __reduce_ex__(self, protocol: object) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


def _register(tracker: Tracker, name: str, log: object) -> str:
    """Log a model with `log(name=...)` in a run of its own, register it, alias champion."""
    with fluent_tracking_uri(tracker.uri):
        with mlflow.start_run():
            info = log(name="m")  # type: ignore[operator]
        version = mlflow.register_model(info.model_uri, name)
    tracker.client.set_registered_model_alias(name, DEFAULT_ALIAS, version.version)
    return f"models:/{name}@{DEFAULT_ALIAS}"


def test_a_model_that_is_not_ours_is_refused_before_any_of_its_code_runs(
        tracker: Tracker, record: StudyRecord, tmp_path: Path) -> None:
    metadata = {"imgcls": {"classes": ["ants", "bees"], "image_size": 16, "channels": 3,
                           "arch": "simplecnn", "mean": [0.5] * 3, "std": [0.25] * 3,
                           "normalize": "train"}}  # copied from a real one
    marker = tmp_path / "payload-ran"
    cloudpickled = _register(tracker, "payload", lambda name: mlflow.pyfunc.log_model(
        name=name, python_model=_Payload(str(marker)), metadata=metadata))
    marker.unlink(missing_ok=True)  # MLflow loads a model as it logs it
    with pytest.raises(ConfigError, match="is not an image classifier promoted by imgcls-hpo"):
        resolve_model(tracker, cloudpickled)
    assert not marker.exists()

    module = _PickledPayload(2, 2)
    _PickledPayload.marker = str(tmp_path / "pickle-ran")
    pickled = _register(tracker, "pickled", lambda name: mlflow.pytorch.log_model(
        module, name=name, serialization_format="pickle", metadata=metadata))
    (tmp_path / "pickle-ran").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="saved as a pickle, which could run code"):
        resolve_model(tracker, pickled)
    assert not (tmp_path / "pickle-ran").exists()


def test_code_added_to_a_promoted_model_never_runs_when_it_predicts(
        tracker: Tracker, record: StudyRecord, searched: Searched, tmp_path: Path) -> None:
    promotion = promote(tracker, record)
    with fluent_tracking_uri(tracker.uri):
        location = mlflow.models.get_model_info(promotion.uri).artifact_path
    folder = Path(location.removeprefix("file://"))
    (code,) = [p for p in folder.parent.rglob("*.py") if "set_model" in p.read_text()]
    marker = tmp_path / "appended-ran"
    with code.open("a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    _, predictor = resolve_model(tracker, promotion.uri)
    assert predictor.probabilities([_file(searched, "ants")]).shape == (1, 2)
    assert not marker.exists()


def test_the_pyfunc_takes_paths_bytes_and_base64(tracker: Tracker, record: StudyRecord,
                                                 searched: Searched) -> None:
    promotion = promote(tracker, record)
    ants, bees = _file(searched, "ants"), _file(searched, "bees")
    with fluent_tracking_uri(tracker.uri):
        model = mlflow.pyfunc.load_model(promotion.uri)
    _, predictor = resolve_model(tracker, promotion.uri)
    expected = predictor.probabilities([ants, bees])

    raw = [ants.read_bytes(), bees.read_bytes()]
    text = [base64.b64encode(b).decode() for b in raw]
    inputs = [[str(ants), str(bees)], raw, text, [t.encode() for t in text],
              [f"data:image/png;base64,{text[0]}", str(bees)]]
    for values in inputs:
        out = model.predict(pd.DataFrame({"image": values}))
        assert list(out.columns) == ["class", "probability", "p_ants", "p_bees"]
        np.testing.assert_allclose(out[["p_ants", "p_bees"]].to_numpy(), expected, rtol=1e-5)
        assert list(out["class"]) == [("ants", "bees")[k] for k in expected.argmax(axis=1)]
        np.testing.assert_allclose(out["probability"], expected.max(axis=1), rtol=1e-5)
    # a list or a Series straight to the python model (MLflow's pyfunc wants the column)
    python_model = model.unwrap_python_model()
    for values in ([str(ants), bees], pd.Series(raw)):
        out = python_model.predict(None, values)
        np.testing.assert_allclose(out[["p_ants", "p_bees"]].to_numpy(), expected, rtol=1e-5)
    # what is no image is the request's fault: an MlflowException the server answers with 400
    from mlflow.exceptions import MlflowException

    for bad in ([base64.b64encode(b"not an image").decode()], ["bm90IGFuIGltYWdl!"]):
        with pytest.raises(MlflowException, match="image 0") as refused:
            model.predict(pd.DataFrame({"image": bad}))
        assert refused.value.get_http_status_code() == 400


def test_image_inputs_refuse_what_is_no_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"image 1: 'missing\.png' is neither an existing file "
                                        "nor base64 text"):
        image_inputs(pd.DataFrame({"image": [b"\x89PNG", "missing.png"]}))
    with pytest.raises(DataError, match=r"no 'image' column \(columns: path\)"):
        image_inputs(pd.DataFrame({"path": ["a.png"]}))
    with pytest.raises(DataError, match="image 0 has type int; pass image file paths"):
        image_inputs([3])
    png = tmp_path / "x.png"
    png.write_bytes(b"not really")
    assert image_inputs({"image": [[str(png), "aGk="]]}) == [str(png), b"hi"]


def test_prediction_frame_names_a_column_per_class() -> None:
    probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]], dtype=np.float32)
    out = prediction_frame(probs, ("cat", "dog", "eel"))
    assert list(out.columns) == ["class", "probability", "p_cat", "p_dog", "p_eel"]
    assert list(out["class"]) == ["dog", "cat"]
    np.testing.assert_allclose(out["probability"], [0.7, 0.5], rtol=1e-6)
    assert prediction_frame(np.zeros((0, 3), np.float32), ("cat", "dog", "eel")).empty


# -- ensembles ---------------------------------------------------------------------------------

def test_an_ensemble_of_the_top_trials_predicts_the_mean_of_their_probabilities(
        tracker: Tracker, record: StudyRecord, searched: Searched) -> None:
    done = promote_ensemble(tracker, record, 3)
    ranked = record.ranked(record.objective_key)
    assert done.members == tuple(t.number for t in ranked[:3]) and done.uri == \
        "models:/tiny-classifier@champion"
    version = tracker.client.get_model_version_by_alias("tiny-classifier", DEFAULT_ALIAS)
    assert version.tags[TAG_MEMBERS] == ",".join(map(str, done.members))
    assert version.run_id == done.run_id != ranked[0].run_id  # its own run, under the study's
    run = tracker.run(done.run_id)
    assert run.data.tags["mlflow.parentRunId"] == record.study_run_id
    for key in ("test_f1", "test_f1_ci_low", "test_f1_ci_high", "test_auc"):
        assert run.data.metrics[key] == pytest.approx(done.metrics[key])
    assert done.best["test_f1"] == ranked[0].metrics["test_f1"]
    assert len(load_record(tracker, "tiny").trials) == len(record.trials)  # no trial added

    images = [_file(searched, "ants"), _file(searched, "bees"), _file(searched, "bees", 2)]
    members = [resolve_model(tracker, f"runs:/{t.run_id}/model")[1] for t in ranked[:3]]
    expected = np.mean([m.probabilities(images) for m in members], axis=0)
    _, ensemble = resolve_model(tracker, done.uri)
    np.testing.assert_allclose(ensemble.probabilities(images), expected, rtol=1e-5, atol=1e-7)
    with fluent_tracking_uri(tracker.uri):  # what `mlflow models serve` loads
        served = mlflow.pyfunc.load_model(done.uri).predict(
            pd.DataFrame({"image": [str(p) for p in images]}))
    np.testing.assert_allclose(served[["p_ants", "p_bees"]].to_numpy(), expected, rtol=1e-5,
                               atol=1e-7)
    assert ensemble.explained is ensemble.members[0]  # Grad-CAM reads the best member's network
    assert ensemble.members[0].preprocessing.arch == ranked[0].params.get("arch", "simplecnn")


def test_an_ensemble_needs_as_many_complete_trials(tracker: Tracker,
                                                   record: StudyRecord) -> None:
    with pytest.raises(StudyError, match=r"has 3 COMPLETE trial\(s\) with best_val_f1, fewer "
                                         r"than the 4 to ensemble"):
        promote_ensemble(tracker, record, 4)
    with pytest.raises(ConfigError, match="an ensemble needs at least 2 trials, not 1"):
        promote_ensemble(tracker, record, 1)


# -- serving over REST -------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["one trial", "an ensemble of 3"])
def served(tracker: Tracker, record: StudyRecord, tmp_path: Path,
           request: pytest.FixtureRequest) -> Iterator[str]:
    """`mlflow models serve` of the champion, with this environment (--env-manager local): a
    trial's model, or the study's three trials as one."""
    if request.param == "one trial":
        promote(tracker, record)
    else:
        promote_ensemble(tracker, record, 3)
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracker.uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn lives there
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/tiny-classifier@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the model server did not start:\n"
                                + (tmp_path / "serve.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own group: mlflow and uvicorn
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _post(url: str, body: dict[str, object]) -> list[dict[str, float | str]]:
    import json

    request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return list(json.loads(response.read())["predictions"])


@pytest.mark.slow
def test_the_champion_answers_a_png_over_rest(served: str, tracker: Tracker,
                                              searched: Searched) -> None:
    png = _file(searched, "bees", 3)
    _, predictor = resolve_model(tracker, "models:/tiny-classifier@champion")
    expected = predictor.probabilities([png])[0]
    text = base64.b64encode(png.read_bytes()).decode()
    for body in ({"dataframe_split": {"columns": ["image"], "data": [[text]]}},
                 {"inputs": {"image": [text]}}, {"inputs": [text]}):
        (row,) = _post(served, body)
        got = np.array([row["p_ants"], row["p_bees"]])
        assert got.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert row["class"] == ("ants", "bees")[int(expected.argmax())]
    with pytest.raises(urllib.error.HTTPError) as error:  # not base64: a 400, not a crash
        _post(served, {"dataframe_split": {"columns": ["image"], "data": [["not an image"]]}})
    assert error.value.code == 400

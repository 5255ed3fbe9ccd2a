import dataclasses
from pathlib import Path

import pytest

from hpo.config.hparams import HParams
from hpo.config.space import FloatRange, IntRange, SpaceError
from hpo.config.study import StudyError, find_study, known_studies, load_study
from hpo.config.trial import TrialState
from imgcls.data.augment import Augment
from imgcls.errors import ConfigError
from imgcls.models import MODELS, build_model

SHIPPED = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


@pytest.fixture
def weights_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch hub cache holding a (placeholder) weights file for every architecture: studies
    check that the file exists before any image is read; loading it is tested in test_models."""
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for entry in MODELS:
        if entry.obj.weights_filename is not None:
            (checkpoints / entry.obj.weights_filename).touch()
    return checkpoints


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_study_validates(path: Path, tmp_path: Path, weights_cache: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "a study starts with comments on the data layout it expects"
    spec = load_study(path.stem, {"data.path": str(tmp_path)})
    assert spec.name == path.stem
    assert spec.space.searched, "a study searches something"
    assert {"lr", "batch_size"} <= {p.name for p in spec.space.searched}
    for arch in spec._possible("arch"):
        build_model(str(arch), 2, spec.data.channels, image_size=32)  # the name builds


@pytest.mark.parametrize("path", [p for p in SHIPPED if "pretrained: true" in p.read_text()],
                         ids=lambda p: p.stem)
def test_a_pretrained_study_without_weights_says_where_to_put_them(
        path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(StudyError, match=r"\.pth.*hub/checkpoints"):
        load_study(path.stem, {"data.path": str(tmp_path)})


def test_shipped_studies_are_found_from_any_folder() -> None:
    # the tests run in a temporary folder with no ./studies: the studies shipped with hpo serve
    assert {"digits", "tb"} <= set(known_studies())
    assert find_study("digits").name == "digits.yaml"


def test_command_line_overrides_the_study_file(study_file: Path) -> None:
    spec = load_study(str(study_file), {"trials": 7, "data.image_size": 24,
                                        "space.lr": "0.001..0.01", "space.batch_size": "2..6"})
    assert spec.trials == 7
    assert spec.data.image_size == 24
    assert spec.space["lr"] == FloatRange("lr", 0.001, 0.01)
    assert spec.space["batch_size"] == IntRange("batch_size", 2, 6)
    assert spec.space["arch"].value == "simplecnn"  # untouched entries stay


def test_trial_values_override_fixed_ones_and_defaults(study_file: Path) -> None:
    spec = load_study(str(study_file))
    hp = spec.trial_params({"lr": 0.05, "batch_size": 8})
    assert (hp.lr, hp.batch_size, hp.momentum, hp.hflip) == (0.05, 8, 0.9, 0.5)
    assert hp.weight_decay == HParams().weight_decay  # not in the space: the default


@pytest.mark.parametrize(("overrides", "message"), [
    ({"space.dropout": "0..1.5"}, "dropout: Input should be less than 1"),
    ({"space.lr": "-1..0.1"}, "lr: Input should be greater than 0"),
    ({"space.arch": "resnet18,resnet19"}, "unknown architecture 'resnet19'"),
    ({"space.optimizer": "sgdd"}, "unknown optimizer 'sgdd'"),
    ({"objective": "val_f2"}, "unknown objective metric 'val_f2' (valid: val_loss"),
    ({"space.arch": "vgg11_bn"}, "vgg11_bn needs images of at least 32px"),
    ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
    ({"space.nope": "1"}, "unknown hyperparameter 'nope'"),
])
def test_impossible_settings_fail_before_anything_runs(study_file: Path, overrides: dict,
                                                       message: str) -> None:
    with pytest.raises(StudyError) as err:
        load_study(str(study_file), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_study_lists_the_known_ones() -> None:
    with pytest.raises(StudyError, match=r"unknown study 'digitz' \(known: .*digits"):
        find_study("digitz")


def test_a_study_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(StudyError, match="must be a mapping"):
        load_study(str(bad))


def test_validation_split_cannot_be_empty(study_file: Path) -> None:
    # the objective is a validation metric: without a validation split nothing picks an epoch
    with pytest.raises(StudyError, match=r"data\.val_fraction: Input should be greater than 0"):
        load_study(str(study_file), {"data.val_fraction": 0})


def test_an_unknown_backend_is_refused_before_any_data_is_read(study_file: Path,
                                                               tmp_path: Path) -> None:
    from hpo.config.store import Store
    from hpo.search.run import prepare_search

    spec = load_study(str(study_file), {"backend": "optuner",
                                        "data.path": str(tmp_path / "nowhere")})
    store = Store.resolve(tmp_path / "store")
    with pytest.raises(ConfigError, match=r"unknown backend 'optuner'; did you mean 'optuna'"):
        prepare_search(spec, store)  # not "data folder not found": the backend comes first
    assert not store.root.exists()


AUGMENT_PROBES = (-1.0, 0.0, 1e-9, 0.5, 1.0, 1.5, 10.0, 180.0, 180.5, 1e6)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Augment)])
def test_augmentation_ranges_are_the_ones_imgcls_takes(name: str) -> None:
    # HParams is the one source of ranges: a searched value it allows trains, and one it refuses
    # would have failed in imgcls too
    for value in AUGMENT_PROBES:
        try:
            Augment(**{name: value})
            trains = True
        except ConfigError:
            trains = False
        try:
            HParams.check_value(name, value)
            allowed = True
        except SpaceError:
            allowed = False
        assert allowed == trains, (name, value)


def test_training_settings_are_hyperparameters_of_the_same_name() -> None:
    # every TrainConfig field a trial does not set from the study is a hyperparameter, so that
    # the trial hands them over by name (hpo.search.trial.given) and none is forgotten
    from imgcls.train.engine import TrainConfig

    from_study = {"max_epochs", "patience", "monitor"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields - from_study <= set(HParams.model_fields)


def test_the_pareto_front_keeps_the_trials_nothing_dominates(study_file: Path) -> None:
    from hpo.config.trial import TrialOutcome
    from hpo.search.run import pareto_front

    spec = load_study(str(study_file), {"objective": ["val_f1:max", "flops:min"]})
    assert spec.terms == [("val_f1", "max"), ("flops", "min")]
    points = {0: [0.90, 5e9], 1: [0.80, 1e9], 2: [0.85, 6e9], 3: [0.90, 5e9], 4: [0.70, 2e9]}
    trials = [TrialOutcome(n, TrialState.COMPLETE, value=v[0], values=v)
              for n, v in points.items()]
    trials.append(TrialOutcome(5, TrialState.PRUNED, value=0.99, values=[0.99, 1.0]))
    # 2 is beaten by 0 on both; 4 by 1 on both; 0 and 3 tie (both kept); 1 is the cheapest
    assert [t.number for t in pareto_front(trials, spec)] == [0, 1, 3]


def _study_with_baselines(tmp_path: Path) -> Path:
    path = tmp_path / "baselines.yaml"
    path.write_text("data: {source: digits}\n"
                    "space: {arch: 'simplecnn,resnet18', lr: 0.01..0.1:log, batch_size: '32,64'}\n"
                    "enqueue:\n"
                    "  - {arch: simplecnn, lr: 0.05, batch_size: 64}\n"
                    "  - {arch: resnet18, lr: 0.05}\n")
    return path


def test_the_command_line_narrowing_the_space_leaves_out_the_file_s_baselines_it_rules_out(
        tmp_path: Path) -> None:
    study = str(_study_with_baselines(tmp_path))
    assert load_study(study).enqueue == ({"arch": "simplecnn", "lr": 0.05, "batch_size": 64},
                                         {"arch": "resnet18", "lr": 0.05})
    # --arch resnet18: the simplecnn baseline is out; the other keeps its lr, its arch is fixed
    assert load_study(study, {"space.arch": "resnet18"}).enqueue == ({"lr": 0.05},)
    # --lr 0.001..0.01: neither baseline's lr can be drawn any more
    assert load_study(study, {"space.lr": "0.001..0.01"}).enqueue == ()
    # a wider range keeps both
    assert len(load_study(study, {"space.lr": "0.001..0.1"}).enqueue) == 2


def test_configurations_enqueued_on_the_command_line_are_checked_as_given(tmp_path: Path) -> None:
    study = str(_study_with_baselines(tmp_path))
    with pytest.raises(StudyError, match="enqueue: arch is not searched in this study"):
        load_study(study, {"space.arch": "resnet18", "enqueue": [{"arch": "simplecnn"}]})

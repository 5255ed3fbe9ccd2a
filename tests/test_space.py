import optuna
import pytest

from hpo.config.space import (
    Choice,
    Fixed,
    FloatRange,
    IntRange,
    SearchSpace,
    SpaceError,
    parse_param,
)


@pytest.mark.parametrize(("spec", "kind", "expected"), [
    ("0.001..0.1", float, FloatRange("p", 0.001, 0.1)),
    ("1e-4..1e-1:log", float, FloatRange("p", 1e-4, 1e-1, log=True)),
    ("0..1", float, FloatRange("p", 0.0, 1.0)),  # a float parameter stays float
    ("16..256:log", int, IntRange("p", 16, 256, log=True)),  # integers stay integers
    ("16,32,64", int, Choice("p", (16, 32, 64))),
    ("resnet18,resnet50", str, Choice("p", ("resnet18", "resnet50"))),
    ("0.5", float, Fixed("p", 0.5)),
    ("sgd", str, Fixed("p", "sgd")),
    ("32", int, Fixed("p", 32)),
    ("0.1..0.1", float, Fixed("p", 0.1)),  # an empty range is a fixed value
    ("-1..1", float, FloatRange("p", -1.0, 1.0)),
    ([32, 64], int, Choice("p", (32, 64))),  # YAML list
    (0.9, float, Fixed("p", 0.9)),  # YAML scalar
    ("true,false", bool, Choice("p", (True, False))),
])
def test_spec_forms(spec: object, kind: type, expected: object) -> None:
    param = parse_param("p", spec, kind)
    assert param == expected
    assert type(getattr(param, "low", 0)) is type(getattr(expected, "low", 0))


@pytest.mark.parametrize(("spec", "kind", "message"), [
    ("0.1..0.01", float, "LOW 0.1 is above HIGH 0.01"),
    ("0..1:log", float, "log scale needs LOW > 0"),
    ("1..2:ln", float, "unknown scale 'ln'"),
    ("abc..1", float, "'abc' is not a number"),
    ("16.5..32", int, "'16.5' is not an integer"),
    ("8,x", int, "'x' is not an integer"),
    ("a..b", str, "is a range, but p takes one of a list"),
    ("nan", float, "'nan' is not a number"),
    ([], int, "empty list"),
])
def test_malformed_specs_name_the_problem(spec: object, kind: type, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        parse_param("p", spec, kind)


def test_specs_read_back_from_their_description() -> None:
    kinds = {"lr": float, "batch_size": int, "arch": str, "dropout": float}
    space = SearchSpace.parse({"lr": "1e-4..0.1:log", "batch_size": "16..128",
                               "arch": "a,b", "dropout": 0.25}, kinds)
    again = SearchSpace.parse(space.describe(), kinds)
    assert again == space


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(SpaceError, match=r"unknown hyperparameter 'lrr' \(known: lr"):
        SearchSpace.parse({"lrr": "0.1"}, {"lr": float})


def test_optuna_samples_stay_inside_the_declared_space() -> None:
    kinds = {"lr": float, "batch_size": int, "arch": str, "wd": float, "depth": int,
             "fixed": float}
    space = SearchSpace.parse({"lr": "1e-4..1e-1:log", "batch_size": "16..128:log",
                               "arch": "resnet18,vgg11_bn", "wd": "0..0.5", "depth": "1..4",
                               "fixed": 0.3}, kinds)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    distributions = space.to_optuna()
    assert set(distributions) == {"lr", "batch_size", "arch", "wd", "depth"}  # fixed: not searched
    depths = set()
    for _ in range(200):
        trial = study.ask(distributions)
        for name, value in trial.params.items():
            assert space.contains(name, value), (name, value)
        assert isinstance(trial.params["batch_size"], int)
        depths.add(trial.params["depth"])
        study.tell(trial, 0.0)
    assert depths == {1, 2, 3, 4}  # bounds are inclusive: both ends are drawn

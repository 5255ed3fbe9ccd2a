"""Samplers and pruners by name: draws stay inside the declared space, seeds reproduce them, the
grid is exhaustive and resumable, and each pruner stops a clearly bad trial in a hand-built study.
No training: trials report made-up curves."""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from hpo.config.hparams import HParams
from hpo.config.space import Choice, IntRange, SearchSpace
from hpo.config.trial import TrialState as Trial
from hpo.search.backends.optuna import samplers as optuna_samplers
from hpo.search.backends.optuna.pruners import PRUNERS, WARMUP_EPOCHS
from hpo.search.backends.optuna.samplers import (
    GRID_MAX_INTEGERS,
    SAMPLERS,
    check_space,
    grid_size,
    planned_trials,
    sampler_seed,
)
from imgcls.errors import ConfigError

MIXED = {"lr": "1e-4..1e-1:log", "batch_size": "8..64:log", "dropout": "0..0.5",
         "optimizer": "sgd,adam", "momentum": "0.9"}
GRID = {"optimizer": "sgd,adam,adamw", "batch_size": "16,32", "lr_step_epochs": "1..3",
        "momentum": "0.9"}


def space_of(entries: dict[str, str]) -> SearchSpace:
    return SearchSpace.parse(entries, HParams.kinds())


def score(params: dict[str, object]) -> float:
    """A made-up objective, so that model-based samplers have something to model."""
    lr = float(params.get("lr", 0.01))  # type: ignore[arg-type]
    return -abs(np.log10(lr) + 2) + float(params.get("dropout", 0.0))  # type: ignore[arg-type]


def draw(name: str, space: SearchSpace, seed: int, n: int,
         study: optuna.Study | None = None) -> list[dict[str, object]]:
    """`n` asked-and-told trials of sampler `name`, built as the backend builds it."""
    sampler = SAMPLERS.get(name)(seed, n, space)
    if study is None:
        study = optuna.create_study(direction="maximize", sampler=sampler)
    else:
        study.sampler = sampler
    out = []
    for _ in range(n):
        trial = study.ask(space.to_optuna())
        study.tell(trial, score(trial.params))
        out.append(dict(trial.params))
    return out


@pytest.fixture
def optuna_warnings() -> Iterator[list[logging.LogRecord]]:
    """Warnings Optuna logs (it does not propagate to the root logger), and Python warnings as
    errors: sampling is meant to be warn-free."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("optuna")
    logger.addHandler(handler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield records
    logger.removeHandler(handler)


def needs(name: str) -> None:
    for module in SAMPLERS.entry(name).meta.get("requires", ()):
        pytest.importorskip(module, reason=f"sampler {name} needs {module}")


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "qmc", "nsga2"])
def test_each_sampler_draws_inside_the_space_reproducibly(
        name: str, optuna_warnings: list[logging.LogRecord]) -> None:
    needs(name)
    space = space_of(MIXED)
    searched = {p.name for p in space.searched}
    n = 5 if name == "gp" else 8  # past every start-up phase (3 trials); a GP fit costs ~0.3 s
    first = draw(name, space, seed=3, n=n)
    for params in first:
        assert set(params) == searched
        for key, value in params.items():
            assert space.contains(key, value), (key, value)
    assert draw(name, space, seed=3, n=n) == first
    assert draw(name, space, seed=4, n=n) != first
    # greenlet only speeds up the GP's optimizer; its absence is logged once, at import
    assert [r.getMessage() for r in optuna_warnings if "greenlet" not in r.getMessage()] == []


@pytest.mark.parametrize("name", ["tpe", "random", "gp", "qmc", "nsga2", "grid"])
def test_samplers_search_multi_objective_studies(name: str) -> None:
    needs(name)
    space = space_of(GRID if name == "grid" else MIXED)
    check_space(name, space, objectives=2)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=SAMPLERS.get(name)(0, 6, space))
    for _ in range(6):
        trial = study.ask(space.to_optuna())
        study.tell(trial, [score(trial.params), float(trial.params["batch_size"])])
        assert all(space.contains(k, v) for k, v in trial.params.items())
    assert len(study.best_trials) >= 1


def test_cmaes_is_refused_for_several_objectives_before_any_data_is_read() -> None:
    space = space_of(MIXED)
    with pytest.raises(ConfigError, match=r"'cmaes' optimizes a single objective.* has 2; use "):
        check_space("cmaes", space, objectives=2)


@pytest.mark.parametrize(("name", "module"), [("cmaes", "cmaes"), ("gp", "scipy")])
def test_a_missing_package_is_refused_when_used_with_its_install_hint(
        name: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = optuna_samplers.importlib.util.find_spec
    monkeypatch.setattr(optuna_samplers.importlib.util, "find_spec",
                        lambda m, *a: None if m == module else real(m, *a))
    space = space_of(MIXED)
    check_space("tpe", space)  # the other samplers are not affected
    for use in (lambda: check_space(name, space), lambda: SAMPLERS.get(name)(0, 10, space)):
        with pytest.raises(ConfigError, match=f"sampler '{name}' needs {module}.*"
                                              f"pip install {module}"):
            use()


def test_grid_enumerates_exactly_the_product_of_the_choices() -> None:
    space = space_of(GRID)
    axes = {}
    for p in space.searched:
        assert isinstance(p, Choice | IntRange)
        axes[p.name] = list(p.choices) if isinstance(p, Choice) else [*range(p.low, p.high + 1)]
    product = {tuple(zip(axes, values, strict=True))
               for values in itertools.product(*axes.values())}
    check_space("grid", space)
    assert grid_size(space) == len(product) == 3 * 2 * 3
    assert planned_trials("grid", space, 100) == len(product)  # the grid ends the study
    assert planned_trials("grid", space, 5) == 5
    assert planned_trials("tpe", space, 100) == 100

    drawn = draw("grid", space, seed=0, n=len(product))
    assert len({tuple(sorted(d.items())) for d in drawn}) == len(product)  # no point twice
    assert {tuple((k, d[k]) for k in axes) for d in drawn} == product


def test_grid_refuses_ranges_it_cannot_enumerate() -> None:
    space = space_of({"lr": "1e-4..1e-1:log", "optimizer": "sgd,adam"})
    with pytest.raises(ConfigError, match=r"grid needs choices: lr is a range 0\.0001\.\.0\.1:log"):
        check_space("grid", space)
    with pytest.raises(ConfigError, match="grid needs choices: lr"):
        SAMPLERS.get("grid")(0, 10, space)
    check_space("tpe", space)  # a range is fine for the others

    wide = space_of({"batch_size": f"16..{16 + GRID_MAX_INTEGERS}"})
    with pytest.raises(ConfigError, match=f"batch_size is a range 16..{16 + GRID_MAX_INTEGERS} "
                                          f"of {GRID_MAX_INTEGERS + 1} integers"):
        check_space("grid", wide)
    check_space("grid", space_of({"batch_size": f"16..{15 + GRID_MAX_INTEGERS}"}))


def test_grid_needs_every_searched_parameter_in_an_enqueued_configuration() -> None:
    space = space_of(GRID)
    with pytest.raises(ConfigError, match="leaves batch_size, lr_step_epochs unset"):
        check_space("grid", space, enqueue=({"optimizer": "adam"},))
    check_space("grid", space, enqueue=({"optimizer": "adam", "batch_size": 16,
                                         "lr_step_epochs": 2},))
    check_space("tpe", space, enqueue=({"optimizer": "adam"},))


def test_a_resumed_grid_reruns_the_interrupted_point_and_no_other() -> None:
    space = space_of({"optimizer": "sgd,adam,adamw", "batch_size": "16,32,64"})
    storage = optuna.storages.InMemoryStorage()

    def open_study(seed: int) -> optuna.Study:  # as the backend reopens a study, reseeded
        return optuna.create_study(study_name="g", storage=storage, load_if_exists=True,
                                   direction="maximize",
                                   sampler=SAMPLERS.get("grid")(seed, 9, space))

    study = open_study(0)
    for _ in range(3):
        study.tell(study.ask(space.to_optuna()), 0.5)
    interrupted = study.ask(space.to_optuna())
    interrupted.set_user_attr("fail_reason", Trial.INTERRUPTED.reason)
    study.tell(interrupted, state=TrialState.FAIL)

    study = open_study(4)
    while sum(t.state == TrialState.COMPLETE for t in study.trials) < grid_size(space):
        study.tell(study.ask(space.to_optuna()), 0.5)
    done = [tuple(sorted(t.params.items())) for t in study.trials
            if t.state == TrialState.COMPLETE]
    assert len(study.trials) == grid_size(space) + 1  # the interrupted trial ran once more
    assert len(set(done)) == grid_size(space)
    assert tuple(sorted(interrupted.params.items())) in done


def test_qmc_resumed_with_sampler_seed_continues_its_sequence() -> None:
    space = space_of(MIXED)
    whole = draw("qmc", space, seed=7, n=8)
    study = optuna.create_study(direction="maximize")
    first = draw("qmc", space, seed=sampler_seed("qmc", 7, 1234), n=4, study=study)
    rest = draw("qmc", space, seed=sampler_seed("qmc", 7, 5678), n=4, study=study)
    assert first + rest == whole
    assert sampler_seed("tpe", 7, 1234) == 1234  # random draws must not be replayed


# --- pruners -------------------------------------------------------------------------------


def run_curve(study: optuna.Study, curve: Sequence[float]) -> tuple[str, int]:
    """Report `curve` epoch by epoch (from 1) until the pruner stops it: (state, last epoch)."""
    trial = study.ask()
    for epoch, value in enumerate(curve, start=1):
        trial.report(value, step=epoch)
        if trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return "PRUNED", epoch
    study.tell(trial, curve[-1])
    return "COMPLETE", len(curve)


def rising(level: float, epochs: int = 8) -> list[float]:
    """A learning curve that climbs towards `level` (a validation F1)."""
    return [level * (1 - 0.5 ** e) for e in range(1, epochs + 1)]


def as_direction(curve: list[float], direction: str) -> list[float]:
    return curve if direction == "maximize" else [1 - v for v in curve]  # a loss-like metric


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("name", ["median", "percentile", "patient"])
def test_a_clearly_bad_trial_is_pruned_after_the_warm_up(name: str, direction: str) -> None:
    study = optuna.create_study(direction=direction, pruner=PRUNERS.get(name)(8))
    for level in (0.8, 0.85, 0.9, 0.82, 0.88):
        assert run_curve(study, as_direction(rising(level), direction)) == ("COMPLETE", 8)
    worsening = [0.2 - 0.01 * e for e in range(8)]
    state, epoch = run_curve(study, as_direction(worsening, direction))
    assert state == "PRUNED"
    assert WARMUP_EPOCHS <= epoch < 8
    assert run_curve(study, as_direction(rising(0.95), direction)) == ("COMPLETE", 8)


def test_percentile_prunes_a_trial_that_median_spares() -> None:
    levels = [0.5, 0.6, 0.7, 0.8, 0.9]
    middling = 0.75
    # the premise: above the median, outside the best quarter
    assert np.median(levels) < middling < np.percentile(levels, 75)
    outcomes = {}
    for name in ("median", "percentile"):
        study = optuna.create_study(direction="maximize", pruner=PRUNERS.get(name)(8))
        for level in levels:
            run_curve(study, rising(level))
        outcomes[name] = run_curve(study, rising(middling))[0]
    assert outcomes == {"median": "COMPLETE", "percentile": "PRUNED"}


def test_patient_spares_a_poor_trial_while_it_still_improves() -> None:
    outcomes = {}
    for name in ("median", "patient"):
        study = optuna.create_study(direction="maximize", pruner=PRUNERS.get(name)(8))
        for level in (0.8, 0.85, 0.9, 0.82, 0.88):
            run_curve(study, rising(level))
        outcomes[name] = run_curve(study, rising(0.4))[0]
    assert outcomes == {"median": "PRUNED", "patient": "COMPLETE"}


def test_successive_halving_prunes_at_its_first_rung() -> None:
    study = optuna.create_study(direction="maximize", pruner=PRUNERS.get("sha")(8))
    for _ in range(6):
        assert run_curve(study, rising(0.9)) == ("COMPLETE", 8)
    # rung 0 is epoch 1 (min_resource); 7 values there: the best 7 // 3 go on
    assert run_curve(study, rising(0.3)) == ("PRUNED", 1)
    assert run_curve(study, rising(0.9)) == ("COMPLETE", 8)


@pytest.mark.parametrize("max_epochs", [1, 9])
def test_hyperband_brackets_fit_within_max_epochs(max_epochs: int) -> None:
    """Hyperband runs floor(log3(max_epochs)) + 1 brackets; bracket s first prunes at epoch
    3**s. So every bracket prunes within the study's epochs, a longer study gets the patient
    brackets too, and pruning starts before any trial has finished (trials run side by side,
    as on several GPUs)."""
    study = optuna.create_study(study_name="hb", direction="maximize",
                                pruner=PRUNERS.get("hyperband")(max_epochs))
    good = [study.ask() for _ in range(20)]
    bad = [study.ask() for _ in range(20)]
    pruned_at: dict[int, int] = {}
    for epoch in range(1, max_epochs + 1):
        for trial in good + bad:
            if trial.number in pruned_at:
                continue
            # equal good curves: ties are promoted, so only the bad ones can be pruned
            trial.report((0.9 if trial in good else 0.3) * epoch / max_epochs, step=epoch)
            if trial.should_prune():
                pruned_at[trial.number] = epoch
                study.tell(trial, state=TrialState.PRUNED)
    assert sorted(pruned_at) == [t.number for t in bad]
    brackets = int(np.floor(np.log(max_epochs) / np.log(3) + 1e-9)) + 1
    assert set(pruned_at.values()) == {3 ** s for s in range(brackets)}


def test_no_pruning_runs_even_a_bad_trial_to_its_end() -> None:
    study = optuna.create_study(direction="maximize", pruner=PRUNERS.get("none")(8))
    for level in (0.8, 0.85, 0.9, 0.82, 0.88):
        run_curve(study, rising(level))
    assert run_curve(study, [0.1] * 8) == ("COMPLETE", 8)


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("registry", "typo", "names"), [
    (SAMPLERS, "tpee", ("tpe", "random", "cmaes", "gp", "qmc", "grid", "nsga2")),
    (PRUNERS, "hyperbnd", ("median", "percentile", "hyperband", "sha", "patient", "none")),
])
def test_unknown_names_list_the_known_ones(registry: object, typo: str,
                                           names: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        registry.entry(typo)  # type: ignore[attr-defined]
    message = str(info.value)
    assert "\n" not in message
    assert "did you mean" in message
    for name in names:
        assert name in message.partition("known:")[2]
    for entry in registry:  # type: ignore[attr-defined]
        why = entry.meta["why"]
        assert why and "\n" not in why and len(why) <= 80, entry.name


def test_check_space_refuses_an_unknown_sampler() -> None:
    with pytest.raises(ConfigError, match=r"unknown sampler 'bayes'.*known: .*tpe"):
        check_space("bayes", space_of(MIXED))


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_processes_sharing_a_study_never_draw_the_same_configuration(
        sampler: str, study_file: object) -> None:
    """Two processes started alike on one storage (the several-machines recipe) open the study
    with the same seed; each trial's random draw follows from its number, which the storage
    hands out once: no duplicates, and the draws of one process alone."""
    from hpo.config.study import load_study
    from hpo.search.backends.optuna.storage import open_optuna_study

    spec = load_study(str(study_file), {"sampler": sampler})
    space = spec.space.to_optuna()
    shared = optuna.storages.InMemoryStorage()
    machines = [open_optuna_study(spec, shared, fresh_seed=0) for _ in range(2)]
    together = {}
    for turn in range(6):
        trial = machines[turn % 2].ask(space)
        together[trial.number] = trial.params
    assert len({tuple(sorted(p.items())) for p in together.values()}) == 6
    alone = open_optuna_study(spec, optuna.storages.InMemoryStorage(), fresh_seed=0)
    assert {t.number: t.params for t in (alone.ask(space) for _ in range(6))} == together

"""THE trial: sampled values -> imgcls training -> per-epoch reports -> an outcome.

Every backend calls `run_trial`; backends differ only in how they sample values and decide
pruning. Each trial ends told: COMPLETE, PRUNED, or FAILED with a reason. A failure is recorded
and returned, never raised, so that the study goes on; only an interrupt (Ctrl-C) propagates,
after the trial's run is closed as KILLED, INTERRUPTED.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import ValidationError

from hpo.config.hparams import HParams, first_error
from hpo.config.space import Scalar
from hpo.config.study import StudySpec
from hpo.config.trial import TrialOutcome, TrialState
from hpo.tracking.client import Tracker
from hpo.tracking.runs import TrialRun, start_trial
from imgcls.data.augment import Augment
from imgcls.data.batches import Batches
from imgcls.data.prepare import PreparedData
from imgcls.errors import ImgclsError, first_line
from imgcls.metrics import confusion_matrix, test_metrics
from imgcls.models.build import build_model
from imgcls.predict import Preprocessing
from imgcls.profile import profile_model
from imgcls.report import (
    classification_report,
    plot_confusion_matrix,
    plot_curves,
    plot_roc,
    write_predictions,
)
from imgcls.train.accel import Acceleration, fits_on_device
from imgcls.train.engine import Diverged, FitResult, TrainConfig, evaluate, fit
from imgcls.train.runtime import seed_everything

ShouldPrune = Callable[[int, float], bool]  # (epoch, objective value) -> stop this trial now?
EpochObserver = Callable[[int, int, Mapping[str, float]], None]  # (trial, epoch, metrics)

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 256  # evaluation keeps no activations for backward: larger batches are cheap
Config = TypeVar("Config")


@dataclass
class StudyContext:
    """What every trial of a study shares, prepared once per `search`."""

    spec: StudySpec
    data: PreparedData
    device: torch.device
    tracker: Tracker | None = None  # None: no tracking (benchmarks of the bare training path)
    experiment_id: str = ""
    study_run_id: str = ""

    @cached_property
    def acceleration(self) -> Acceleration:
        """How trials train on this context's device (configures CUDA when first asked)."""
        return Acceleration.for_device(self.device, compile=self.spec.compile,
                                       mixed_precision=self.spec.mixed_precision)

    @cached_property
    def images_on_device(self) -> bool:
        """Whether the images fit this trial's share of its device's memory; else they are
        prefetched from host memory batch by batch."""
        share = self.spec.device_cache / self.spec.trials_per_gpu
        return fits_on_device(self.data.images.nbytes, self.device, share)

    def trial_settings(self, number: int) -> dict[str, Any]:
        """The fixed settings a trial logs beside its hyperparameters."""
        spec, data = self.spec, self.data.config
        accel = self.acceleration
        return {
            "objective": spec.objective, "max_epochs": spec.max_epochs,
            "patience": spec.patience, "seed": trial_seed(spec.seed, number),
            "image_size": data.image_size, "channels": data.channels,
            "normalize": data.normalize, "num_classes": self.data.num_classes,
            "device": str(self.device), "precision": accel.precision,
            "channels_last": accel.channels_last, "compile": accel.compile,
            "images_on_device": self.images_on_device,
        }


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial its own reproducible initialisation and batch order."""
    return study_seed * 100_003 + number


def failure_reason(exc: BaseException, hp: HParams | None) -> str:
    """One line a user can act on."""
    if isinstance(exc, Diverged | ImgclsError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return f"invalid hyperparameters: {first_error(exc)}"
    if isinstance(exc, torch.cuda.OutOfMemoryError) and hp is not None:
        return (f"CUDA out of memory with arch={hp.arch}, batch_size={hp.batch_size}; "
                "search smaller batch sizes or run fewer trials per GPU")
    return f"{type(exc).__name__}: {first_line(exc)}"[:500]


def run_trial(ctx: StudyContext, number: int, sampled: Mapping[str, Scalar],
              should_prune: ShouldPrune | None = None,
              on_epoch: EpochObserver | None = None,
              placement: Mapping[str, str] | None = None) -> TrialOutcome:
    """Train and record one trial. `placement`: tags saying where it runs (imgcls_hpo.device,
    imgcls_hpo.worker), added to its MLflow run."""
    start = time.perf_counter()
    spec, data = ctx.spec, ctx.data
    outcome = TrialOutcome(number, TrialState.FAILED, dict(sampled))
    run: TrialRun | None = None
    hp: HParams | None = None
    try:
        hp = spec.trial_params(sampled)
        outcome.params = hp.model_dump()
        if ctx.tracker is not None:
            run = start_trial(ctx.tracker, ctx.experiment_id, ctx.study_run_id, spec.name,
                              number, {**outcome.params, **ctx.trial_settings(number)},
                              tags=placement)
            outcome.run_id = run.run_id
        result, model, pruned, measured = _train(ctx, number, hp, run, should_prune, on_epoch)
        outcome.epochs = result.epochs
        if result.best_epoch == 0:
            raise RuntimeError(f"no epoch gave a finite {spec.objective}")
        outcome.best_epoch = result.best_epoch
        outcome.value = result.best_metrics[spec.objective]
        if spec.objectives:  # a Pareto search: every objective's value, in the study's order
            scores = {**result.best_metrics, **measured}
            outcome.values = [scores[name] for name, _ in spec.terms]
        outcome.state = TrialState.PRUNED if pruned else TrialState.COMPLETE
        outcome.metrics = {**measured, **_assess(ctx, number, run, result, model)}
        if run is not None:
            if pruned:
                run.finish(TrialState.PRUNED)
            else:
                # in the default layout: a GPU trial's channels_last weights would be exported
                # as such, and a CPU predictor would pay for the layout change on every call
                model = model.to("cpu", memory_format=torch.contiguous_format)
                run.finish_with_model(model, _input_example(data), data.num_classes,
                                      _model_metadata(ctx, hp))
    except KeyboardInterrupt:
        outcome.state, outcome.fail_reason = TrialState.INTERRUPTED, TrialState.INTERRUPTED.reason
        if run is not None:
            _quietly(run.finish, TrialState.INTERRUPTED)
        raise
    except Exception as exc:
        outcome.state, outcome.fail_reason = TrialState.FAILED, failure_reason(exc, hp)
        if run is not None:
            _quietly(run.log_text, traceback.format_exc(), "error.txt")
            _quietly(run.finish, TrialState.FAILED, outcome.fail_reason)
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one
        outcome.seconds = time.perf_counter() - start
    return outcome


def _train(ctx: StudyContext, number: int, hp: HParams, run: TrialRun | None,
           should_prune: ShouldPrune | None, on_epoch: EpochObserver | None
           ) -> tuple[FitResult, torch.nn.Module, bool, dict[str, float]]:
    """Train one trial; also says whether the pruner stopped it, and what it cost: the model's
    parameters, FLOPs and MACs per image, the seconds and the peak memory of its training."""
    spec, data = ctx.spec, ctx.data
    seed = trial_seed(spec.seed, number)
    seed_everything(seed)
    model = build_model(hp.arch, data.num_classes, data.in_channels, hp.dropout,
                        data.config.image_size, pretrained=hp.pretrained, freeze=hp.freeze,
                        weights_dir=spec.weights_dir)
    profile = profile_model(model, hp.arch, data.in_channels, data.config.image_size)
    cost = {"params_count": float(profile.params), "flops": float(profile.flops),
            "macs": float(profile.macs)}
    if run is not None:
        run.log_metrics(cost)
    accel, resident = ctx.acceleration, ctx.images_on_device
    train = data.batches("train", hp.batch_size, augment=given(hp, Augment), seed=seed,
                         device=ctx.device, resident=resident)
    val = data.batches("val", max(hp.batch_size, EVAL_BATCH_SIZE), device=ctx.device,
                       resident=resident)
    config = given(hp, TrainConfig, max_epochs=spec.max_epochs, patience=spec.patience,
                   monitor=spec.objective)

    pruned = False

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> str | None:
        nonlocal pruned
        if run is not None:
            run.log_metrics(metrics, step=epoch)
        if on_epoch is not None:
            on_epoch(number, epoch, metrics)
        # The pruner hears every epoch, but a trial that has trained its last epoch has nothing
        # left to save by stopping: it completes, as on Ray, where a scheduler's stop after the
        # last epoch is no prune either.
        verdict = should_prune is not None and should_prune(epoch, metrics[spec.objective])
        if verdict and epoch < spec.max_epochs:
            pruned = True
            return f"pruned at epoch {epoch}"
        return None

    accel.reset_peak_memory()
    started = time.perf_counter()
    result = fit(model, train, val, config, data.num_classes, on_epoch_end, accel=accel)
    spent = {"train_seconds": time.perf_counter() - started,
             "peak_memory_mb": accel.peak_memory_mb()}
    if run is not None:
        run.log_metrics(spent)
    return result, model, pruned, {**cost, **spent}


def given(hp: HParams, kind: type[Config], **settings: Any) -> Config:
    """imgcls's `kind` (a dataclass: TrainConfig, Augment) with every field that is a
    hyperparameter of the same name taken from `hp`, and the study's `settings` for the rest."""
    fields = dataclasses.fields(kind)  # type: ignore[arg-type]
    names = {f.name for f in fields} & set(HParams.model_fields)
    return kind(**{name: getattr(hp, name) for name in names}, **settings)


def _assess(ctx: StudyContext, number: int, run: TrialRun | None, result: FitResult,
            model: torch.nn.Module) -> dict[str, float]:
    """Evaluate the best epoch's weights once on the test split (never used for selection) and
    record the evaluation: summary and test metrics with bootstrap intervals, curves, confusion
    matrices, ROC, classification report and per-image predictions. Without a test split, the
    report describes the validation split and no test_* metric exists."""
    data, objective = ctx.data, ctx.spec.objective
    held_out = "test" if len(data.split.indices("test")) else "val"
    if held_out == "test":
        batches = data.batches("test", EVAL_BATCH_SIZE, device=ctx.device,
                               resident=ctx.images_on_device)
        evaluation = evaluate(model, batches, data.num_classes, prefix="test",
                              accel=ctx.acceleration)
        scores = test_metrics(evaluation.y_true, evaluation.probs, data.num_classes,
                              seed=trial_seed(ctx.spec.seed, number))
    else:
        evaluation, scores = result.best_evaluation, {}
    val_losses = [h["val_loss"] for h in result.history if h["val_loss"] == h["val_loss"]]
    summary = {f"best_{objective}": result.best_metrics[objective],
               "best_epoch": result.best_epoch, "epochs": result.epochs, **scores}
    if val_losses:
        summary["min_val_loss"] = min(val_losses)
    if run is None or evaluation is None:
        return summary
    run.log_metrics(summary)

    classes = list(data.classes)
    run.log_figure(plot_curves(result.history, best_epoch=result.best_epoch), "curves.png")
    best_val = result.best_evaluation
    if best_val is not None:
        title = f"validation, epoch {result.best_epoch}: {objective} = " \
                f"{result.best_metrics[objective]:.4f}"
        matrix = confusion_matrix(best_val.y_true, best_val.y_pred, data.num_classes)
        run.log_figure(plot_confusion_matrix(matrix, classes, title), "confusion_matrix_val.png")
    if held_out == "test":
        matrix = confusion_matrix(evaluation.y_true, evaluation.y_pred, data.num_classes)
        title = f"test, weights of epoch {result.best_epoch}"
        run.log_figure(plot_confusion_matrix(matrix, classes, title), "confusion_matrix_test.png")
    run.log_figure(plot_roc(evaluation.y_true, evaluation.probs, classes), f"roc_{held_out}.png")
    text, report = classification_report(evaluation.y_true, evaluation.probs, classes)
    run.log_text(text, f"classification_report_{held_out}.txt")
    run.log_dict(report, f"classification_report_{held_out}.json")
    ids = [data.catalog.ids[i] for i in data.split.indices(held_out)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"predictions_{held_out}.csv"
        write_predictions(path, ids, evaluation.probs, classes, labels=evaluation.y_true)
        run.log_artifact(path)
    return summary


def _input_example(data: PreparedData) -> np.ndarray:
    """Two of the study's images, preprocessed as the model sees them (two, so that the
    exported graph keeps a dynamic batch dimension)."""
    batches = Batches(data.images[:2], data.labels[:2], 2, train=False, mean=data.mean,
                      std=data.std)
    x, _ = next(iter(batches))
    return x.numpy()


def _model_metadata(ctx: StudyContext, hp: HParams) -> dict[str, Any]:
    """What predicting needs besides the weights: the model's input contract."""
    return {"imgcls": Preprocessing.from_data(ctx.data, hp.arch).to_metadata()}


def _quietly(record: Callable[..., None], *args: Any) -> None:
    """Record a failure; if tracking fails too, warn, but keep the trial's own reason."""
    try:
        record(*args)
    except Exception as exc:
        log.warning("could not record the trial's failure in MLflow: %s", exc)

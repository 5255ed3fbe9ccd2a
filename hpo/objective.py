"""THE trial: sampled values -> imgcls training -> per-epoch reports -> an outcome.

Every backend calls `run_trial`; backends differ only in how they sample values and decide
pruning. Each trial ends told: COMPLETE, PRUNED, or FAIL with a reason. A failure is recorded and
returned, never raised, so that the study goes on; only an interrupt (Ctrl-C) propagates, after
the trial's run is closed as KILLED with reason "interrupted".
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from hpo.space import Scalar
from hpo.study import HParams, StudySpec, first_error
from hpo.tracking import Tracker, TrialRun
from imgcls.data import Batches, PreparedData
from imgcls.errors import ImgclsError, first_line
from imgcls.metrics import confusion_matrix, test_metrics
from imgcls.models import build_model
from imgcls.predict import Preprocessing
from imgcls.profile import profile_model
from imgcls.report import (
    classification_report,
    plot_confusion_matrix,
    plot_curves,
    plot_roc,
    write_predictions,
)
from imgcls.train import (
    Acceleration,
    Diverged,
    FitResult,
    TrainConfig,
    evaluate,
    fit,
    fits_on_device,
    seed_everything,
)

TrialState = Literal["COMPLETE", "PRUNED", "FAIL"]
ShouldPrune = Callable[[int, float], bool]  # (epoch, objective value) -> stop this trial now?
EpochObserver = Callable[[int, int, Mapping[str, float]], None]  # (trial, epoch, metrics)

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"
# The worker process running the trial died (killed, out of host memory) before telling how the
# trial ended; like an interrupted trial, work still to do, and its parameters are retried once.
WORKER_LOST = "worker lost"
EVAL_BATCH_SIZE = 256  # evaluation keeps no activations for backward: larger batches are cheap


@dataclass
class TrialOutcome:
    number: int
    params: dict[str, Scalar]  # every hyperparameter the trial trained with
    state: TrialState
    value: float | None = None  # the best epoch's objective value
    values: list[float] | None = None  # a Pareto search's objective values, in the study's order
    best_epoch: int = 0
    epochs: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the best epoch's metrics
    test: dict[str, float] = field(default_factory=dict)  # its weights on the test split, CIs
    fail_reason: str | None = None
    run_id: str | None = None
    seconds: float = 0.0

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


def test_counterpart(objective: str) -> str:
    """The test metric that matches a validation objective: val_f1 -> test_f1,
    val_loss -> test_log_loss (both are the cross-entropy of the true class)."""
    name = objective.removeprefix("val_")
    return "test_log_loss" if name == "loss" else f"test_{name}"


def headline_test(test: Mapping[str, float], objective: str) -> dict[str, float]:
    """The objective's test counterpart and its confidence interval, from all test metrics."""
    name = test_counterpart(objective)
    return {k: v for k, v in test.items() if k in (name, f"{name}_ci_low", f"{name}_ci_high")}


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
    outcome = TrialOutcome(number, dict(sampled), "FAIL")
    run: TrialRun | None = None
    hp: HParams | None = None
    try:
        hp = spec.trial_params(sampled)
        outcome.params = hp.model_dump()
        if ctx.tracker is not None:
            run = ctx.tracker.start_trial(ctx.experiment_id, ctx.study_run_id, spec.name, number,
                                          {**outcome.params, **ctx.trial_settings(number)},
                                          tags=placement)
            outcome.run_id = run.run_id
        result, model, pruned, cost = _train(ctx, number, hp, run, should_prune, on_epoch)
        outcome.epochs = result.epochs
        if result.best_epoch == 0:
            raise RuntimeError(f"no epoch gave a finite {spec.objective}")
        outcome.best_epoch = result.best_epoch
        outcome.metrics = result.best_metrics
        outcome.value = result.best_metrics[spec.objective]
        if spec.objectives:  # a Pareto search: every objective's value, in the study's order
            scores = {**result.best_metrics, **cost}
            outcome.values = [scores[name] for name, _ in spec.terms]
        outcome.state = "PRUNED" if pruned else "COMPLETE"
        outcome.test = _assess(ctx, number, run, result, model)
        if run is not None:
            if pruned:
                run.finish("PRUNED")
            else:
                # in the default layout: a GPU trial's channels_last weights would be exported
                # as such, and a CPU predictor would pay for the layout change on every call
                model = model.to("cpu", memory_format=torch.contiguous_format)
                run.finish_with_model(model, _input_example(data), data.num_classes,
                                      _model_metadata(ctx, hp))
    except KeyboardInterrupt:
        outcome.fail_reason = INTERRUPTED
        if run is not None:
            _quietly(run.finish, "FAIL", INTERRUPTED, "KILLED")
        raise
    except Exception as exc:
        outcome.state, outcome.fail_reason = "FAIL", failure_reason(exc, hp)
        if run is not None:
            _quietly(run.log_text, traceback.format_exc(), "error.txt")
            _quietly(run.finish, "FAIL", outcome.fail_reason)
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one
        outcome.seconds = time.perf_counter() - start
    return outcome


def _train(ctx: StudyContext, number: int, hp: HParams, run: TrialRun | None,
           should_prune: ShouldPrune | None, on_epoch: EpochObserver | None
           ) -> tuple[FitResult, torch.nn.Module, bool, dict[str, float]]:
    """Train one trial; also says whether the pruner stopped it, and what the model costs
    (parameters, FLOPs and MACs per image)."""
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
    train = data.batches("train", hp.batch_size, augment=hp.augment(), seed=seed,
                         device=ctx.device, resident=resident)
    val = data.batches("val", max(hp.batch_size, EVAL_BATCH_SIZE), device=ctx.device,
                       resident=resident)
    config = TrainConfig(
        optimizer=hp.optimizer, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
        scheduler=hp.scheduler, warmup_epochs=hp.warmup_epochs,
        lr_step_epochs=hp.lr_step_epochs or None, lr_gamma=hp.lr_gamma,
        weight_decay=hp.weight_decay, l2=hp.l2, label_smoothing=hp.label_smoothing,
        class_weighted=hp.class_weighted, max_epochs=spec.max_epochs, patience=spec.patience,
        monitor=spec.objective,
    )

    pruned = False

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> str | None:
        nonlocal pruned
        if run is not None:
            run.log_metrics(metrics, step=epoch)
        if on_epoch is not None:
            on_epoch(number, epoch, metrics)
        if should_prune is not None and should_prune(epoch, metrics[spec.objective]):
            pruned = True
            return f"pruned at epoch {epoch}"
        return None

    accel.reset_peak_memory()
    started = time.perf_counter()
    result = fit(model, train, val, config, data.num_classes, on_epoch_end, accel=accel)
    if run is not None:
        run.log_metrics({"train_seconds": time.perf_counter() - started,
                         "peak_memory_mb": accel.peak_memory_mb()})
    return result, model, pruned, cost


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
    if run is None or evaluation is None:
        return scores
    val_losses = [h["val_loss"] for h in result.history if h["val_loss"] == h["val_loss"]]
    summary = {f"best_{objective}": result.best_metrics[objective],
               "best_epoch": result.best_epoch, "epochs": result.epochs, **scores}
    if val_losses:
        summary["min_val_loss"] = min(val_losses)
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
        write_predictions(path, ids, evaluation.y_true, evaluation.probs, classes)
        run.log_artifact(path)
    return scores


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

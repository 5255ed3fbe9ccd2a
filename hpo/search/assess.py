"""What a trial records when it ends: its best epoch's weights evaluated once on the test split
(never used for selection), the summary and test metrics with bootstrap intervals, the figures
and reports, and, for a COMPLETE trial, the weights a model is made of.

The summary and the weights are recorded before the trial's run closes; the figures (learning
curves, confusion matrices, ROC: about 0.9 s of rendering a trial) are rendered by a background
thread into the closed run, so that the next trial starts without waiting for them
(hpo.search.artifacts; a search waits for the last of them before it ends).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from imgcls.data.batches import Batches
from imgcls.data.split import Split
from imgcls.metrics import (
    OperatingPoint,
    Reliability,
    apply_temperature,
    calibration_scores,
    choose_threshold,
    confusion_matrix,
    decide,
    fit_temperature,
    reliability,
    test_metrics,
)
from imgcls.predict import Preprocessing
from imgcls.report import (
    classification_report,
    plot_confusion_matrix,
    plot_curves,
    plot_reliability,
    plot_roc,
    write_predictions,
)
from imgcls.train.engine import Evaluation, FitResult, evaluate

if TYPE_CHECKING:
    from hpo.search.context import StudyContext
    from hpo.tracking.runs import TrialRun

EVAL_BATCH_SIZE = 256  # evaluation keeps no activations for backward: larger batches are cheap


def assess(ctx: StudyContext, seed: int, result: FitResult, model: torch.nn.Module | None,
           run: TrialRun | None, validated: Split | None = None) -> dict[str, float]:
    """The trial's summary metrics (best_<objective>, best_epoch, epochs, min_val_loss, test_*
    with intervals, the temperature and the operating point's threshold, calibration before
    and after), logged to `run`, whose figures and reports are queued on the context's
    artifact writer. Without a test split, the reports describe the validation split and no
    test_* metric exists.

    The probabilities are temperature-scaled first (fitted on validation), as the promoted
    model serves them; the threshold is chosen on those, and test metrics are taken on them.

    `validated`: the split whose val images the best evaluation predicted, when not the data's
    own (cross-validation: every train and val image, out of fold). Without a `model` (a
    cross-validated trial pruned before its refit) the test split is not evaluated."""
    data, objective = ctx.data, ctx.spec.objective
    validated = validated or data.split
    held_out = "test" if len(data.split.indices("test")) and model is not None else "val"
    raw_val, scores = result.best_evaluation, {}
    temperature, threshold, val = 1.0, None, None
    if raw_val is not None:  # None only when no epoch was evaluated
        temperature = fit_temperature(raw_val.y_true, raw_val.probs)
        val = calibrated(raw_val, temperature)
        threshold = operating_threshold(ctx, val)
        val = decided(val, threshold)
    evaluation, raw = val, raw_val
    if held_out == "test":
        assert model is not None
        batches = data.batches("test", EVAL_BATCH_SIZE, device=ctx.device,
                               resident=ctx.images_on_device)
        raw = evaluate(model, batches, data.num_classes, prefix="test", accel=ctx.acceleration)
        evaluation = decided(calibrated(raw, temperature), threshold)
        scores = test_metrics(evaluation.y_true, evaluation.probs, data.num_classes, seed=seed,
                              threshold=threshold)
    val_losses = [h["val_loss"] for h in result.history if h["val_loss"] == h["val_loss"]]
    summary = {f"best_{objective}": result.best_metrics[objective],
               "best_epoch": result.best_epoch, "epochs": result.epochs, **scores,
               "temperature": temperature}
    if f"{objective}_std" in result.best_metrics:  # cross-validated: the folds' deviation
        summary[f"best_{objective}_std"] = result.best_metrics[f"{objective}_std"]
    for split, before, after in (("val", raw_val, val), ("test", raw, evaluation)):
        if before is not None and after is not None and (split == "val" or held_out == "test"):
            summary.update(calibration_scores(after.y_true, after.probs, split))
            summary.update({f"{name}_uncalibrated": value for name, value in
                            calibration_scores(before.y_true, before.probs, split).items()})
    if threshold is not None:
        summary["threshold"] = threshold
    if val_losses:
        summary["min_val_loss"] = min(val_losses)
    if run is not None and evaluation is not None and raw is not None:
        run.log_metrics(summary)
        reliable = {"before scaling": reliability(raw.y_true, raw.probs),
                    f"after (T = {temperature:.2f})": reliability(evaluation.y_true,
                                                                  evaluation.probs)}
        ctx.artifacts.submit(lambda: record_reports(ctx, run, result, evaluation, held_out,
                                                    val, reliable, validated))
    return summary


def calibrated(evaluation: Evaluation, temperature: float) -> Evaluation:
    """The evaluation with temperature-scaled probabilities (its decisions do not change)."""
    return replace(evaluation, probs=apply_temperature(evaluation.probs, temperature))


def decided(evaluation: Evaluation, threshold: float | None) -> Evaluation:
    """The evaluation with its predictions taken at the operating point's threshold."""
    return replace(evaluation, y_pred=decide(evaluation.probs, threshold))


def operating_threshold(ctx: StudyContext, val: Evaluation) -> float | None:
    """The study's operating point as a probability threshold on the positive class, chosen
    on the (scaled) validation probabilities at the trial's best epoch; None for argmax."""
    return choose_threshold(val.y_true, val.probs, OperatingPoint.parse(ctx.spec.operating_point))


def record_reports(ctx: StudyContext, run: TrialRun, result: FitResult, evaluation: Evaluation,
                   held_out: str, best_val: Evaluation | None = None,
                   reliable: Mapping[str, Reliability] | None = None,
                   validated: Split | None = None) -> None:
    """Curves, confusion matrices, ROC, classification report and per-image predictions, into
    one folder logged to `run` at once. `validated`: as `assess` says."""
    data, objective = ctx.data, ctx.spec.objective
    split = validated or data.split
    weights = f"weights of epoch {result.best_epoch}"
    if validated is not None:  # cross-validated: the refit model, or the folds' predictions
        weights = (f"refit on train+val for {result.best_epoch} epochs" if held_out == "test"
                   else f"out of fold, epoch {result.best_epoch}")
    classes = list(data.classes)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        figures = {"curves.png": plot_curves(result.history, best_epoch=result.best_epoch)}
        if best_val is not None:
            title = f"validation, epoch {result.best_epoch}: {objective} = " \
                    f"{result.best_metrics[objective]:.4f}"
            matrix = confusion_matrix(best_val.y_true, best_val.y_pred, data.num_classes)
            figures["confusion_matrix_val.png"] = plot_confusion_matrix(matrix, classes, title)
        if held_out == "test":
            matrix = confusion_matrix(evaluation.y_true, evaluation.y_pred, data.num_classes)
            title = f"test, {weights}"
            figures["confusion_matrix_test.png"] = plot_confusion_matrix(matrix, classes, title)
        figures[f"roc_{held_out}.png"] = plot_roc(evaluation.y_true, evaluation.probs, classes)
        if reliable:
            figures[f"reliability_{held_out}.png"] = plot_reliability(
                reliable, title=f"{held_out} split, {weights}")
        for name, figure in figures.items():
            figure.savefig(out / name)
        text, report = classification_report(evaluation.y_true, evaluation.probs, classes)
        (out / f"classification_report_{held_out}.txt").write_text(text)
        (out / f"classification_report_{held_out}.json").write_text(json.dumps(report, indent=2))
        ids = [data.catalog.ids[i] for i in split.indices(held_out)]
        write_predictions(out / f"predictions_{held_out}.csv", ids, evaluation.probs, classes,
                          labels=evaluation.y_true)
        if held_out == "test" and best_val is not None:  # what an ensemble's threshold needs
            ids = [data.catalog.ids[i] for i in split.indices("val")]
            write_predictions(out / "predictions_val.csv", ids, best_val.probs, classes,
                              labels=best_val.y_true)
        run.log_artifacts(out)


def model_metadata(ctx: StudyContext, arch: str, summary: Mapping[str, float] | None = None
                   ) -> dict[str, Any]:
    """What predicting needs besides the weights: the model's input contract, and from the
    trial's `summary`, the temperature its probabilities are scaled by and the decision
    threshold its operating point chose (none: argmax)."""
    summary = summary or {}
    preprocessing = replace(Preprocessing.from_data(ctx.data, arch),
                            decision_threshold=summary.get("threshold"),
                            temperature=summary.get("temperature", 1.0))
    return {"imgcls": preprocessing.to_metadata()}


def input_example(ctx: StudyContext) -> np.ndarray:
    """Two of the study's images, preprocessed as the model sees them (two, so that an exported
    graph keeps a dynamic batch dimension)."""
    data = ctx.data
    batches = Batches(data.images[:2], data.labels[:2], 2, train=False, mean=data.mean,
                      std=data.std)
    x, _ = next(iter(batches))
    return x.numpy()

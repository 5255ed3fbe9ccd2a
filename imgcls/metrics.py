"""Metric names, their directions, and how they are computed.

One name everywhere: `val_f1` is what a study optimizes, what MLflow logs, and what early
stopping and best-epoch selection watch. Epoch metrics are `<split>_<metric>`.

Every score is computed from confusion matrices, per-image losses and weighted ranks, for a
batch of "resamples" at once: the point estimate is the batch of one unweighted sample, and the
bootstrap in `test_metrics` is the same arithmetic on 1,000 resampled weightings, with no
per-resample scikit-learn call. Tests check each value against scikit-learn.

Undefined values are NaN, never an exception: AUC or specificity when the labels hold one class
only, accuracy of an empty set, kappa when chance agreement is 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from imgcls.errors import ConfigError

Direction = Literal["max", "min"]

# The one table of which way is better, for every metric the project logs.
# Scores of a set of images, the same for every split (train_, val_, test_); `loss` is the mean
# cross-entropy of a training or validation epoch, `log_loss` the same on the test images.
SCORES: dict[str, Direction] = {
    "loss": "min", "log_loss": "min", "acc": "max", "bal_acc": "max", "f1": "max",
    "kappa": "max", "auc": "max", "sens": "max", "spec": "max",
    # calibration of the probabilities a model serves (temperature-scaled), and before scaling
    "ece": "min", "brier": "min", "ece_uncalibrated": "min", "brier_uncalibrated": "min",
}
# What a model and its training cost, and how fast it trained.
COSTS: dict[str, Direction] = {
    "params_count": "min", "flops": "min", "macs": "min",  # the model's size, cost per image
    "train_seconds": "min", "peak_memory_mb": "min",  # what training it took
    "train_images_per_s": "max", "data_wait_frac": "min",  # the pace of its epochs
}
# Of those, the model's own cost: what a Pareto search may trade a score against.
MODEL_COSTS = ("flops", "macs", "params_count")

# Every per-epoch metric the engine logs, and which way is better.
EPOCH_METRICS: dict[str, Direction] = {
    name: SCORES[name.split("_", 1)[1]] for name in (
        "train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc", "val_f1", "val_sens",
        "val_spec", "val_auc")
}
# Logged every epoch besides those: each trial's last value describes its last epoch only.
# What a study may optimize and early stopping may watch: validation metrics only, since the
# training metrics reward memorisation and the test split never drives selection.
OBJECTIVE_METRICS = tuple(m for m in EPOCH_METRICS if m.startswith("val_"))
# (A cross-validated trial logs each validation metric's deviation over its folds too.)
EPOCH_LOGGED = frozenset({*EPOCH_METRICS, *(f"{m}_std" for m in OBJECTIVE_METRICS), "lr",
                          "train_images_per_s", "data_wait_frac"})
# Sensitivity and specificity need one positive class: only a two-class task reports them.
BINARY_ONLY = frozenset({"sens", "spec"})


def metric_goal(name: str) -> Direction:
    """Which way is better for any metric a trial logs: an epoch's (val_f1), a summary
    (best_val_f1, min_val_loss), a test score or its interval (test_auc_ci_low), a cost (flops,
    peak_memory_mb). ConfigError for a name with no better side (lr, best_epoch) or unknown."""
    base = name.removeprefix("best_").removeprefix("min_")
    base = base.removesuffix("_ci_low").removesuffix("_ci_high")
    if base in COSTS:
        return COSTS[base]
    split, _, score = base.partition("_")
    if split in ("train", "val", "test") and score in SCORES:
        return SCORES[score]
    raise ConfigError(f"metric {name!r} has no better direction to rank by (rankable: scores "
                      f"such as val_f1, best_val_f1, test_auc; costs: {', '.join(COSTS)})")


def metric_direction(name: str) -> Direction:
    if name not in OBJECTIVE_METRICS:
        raise ConfigError(
            f"unknown objective metric {name!r} (valid: {', '.join(OBJECTIVE_METRICS)})"
        )
    return EPOCH_METRICS[name]


def objective_available(name: str, num_classes: int) -> bool:
    """Whether training on `num_classes` classes reports the objective metric `name`."""
    if name not in OBJECTIVE_METRICS:
        return False
    return num_classes == 2 or name.split("_", 1)[1] not in BINARY_ONLY


def check_objective(name: str, num_classes: int) -> Direction:
    """The direction of `name`, or a ConfigError when the metric is unknown or, like
    `val_sens`, needs a two-class task and the data has `num_classes` classes."""
    direction = metric_direction(name)
    if not objective_available(name, num_classes):
        valid = [m for m in OBJECTIVE_METRICS if objective_available(m, num_classes)]
        raise ConfigError(f"objective metric {name!r} needs two classes but the data has "
                          f"{num_classes}; use one of: {', '.join(valid)}")
    return direction


def is_better(value: float, best: float | None, direction: Direction, min_delta: float = 0.0
              ) -> bool:
    """Strictly better by more than `min_delta`; NaN is never better, anything beats None."""
    if value != value:  # NaN
        return False
    if best is None:
        return True
    return value > best + min_delta if direction == "max" else value < best - min_delta


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, num_classes: int,
                           positive: int = 1) -> dict[str, float]:
    """Scores of softmax probabilities `probs` (N, K) against integer labels `y_true` (N,);
    the prediction is the most probable class.

    `acc`; `bal_acc` (mean recall over the classes present in `y_true`); `f1` (macro: every one
    of the `num_classes` classes weighs the same, however rare, and a class never predicted
    scores 0 rather than raising); `auc` (ROC-AUC: of `probs[:, positive]` for two classes,
    else the macro one-vs-rest mean over the classes present); for two classes only, `sens`
    (recall of class `positive`) and `spec` (recall of the other class).
    """
    y, p = _check_inputs(y_true, probs, num_classes, positive)
    n = len(y)
    pair = y * num_classes + p.argmax(1)
    cm = np.bincount(pair, minlength=num_classes**2).reshape(1, num_classes, num_classes)
    scores = _confusion_scores(cm, positive)
    scores["auc"] = _auc(y, p, np.ones((1, n)), positive)
    names = ["acc", "bal_acc", "f1"] + (["sens", "spec"] if num_classes == 2 else []) + ["auc"]
    return {name: float(scores[name][0]) for name in names}


@dataclass(frozen=True)
class OperatingPoint:
    """How a two-class model turns probabilities into a class: `argmax` (threshold 0.5),
    `youden` (the threshold maximising sensitivity + specificity - 1 on validation), or a
    target `sens` / `spec` that validation must reach (`sens=0.95`)."""

    kind: Literal["argmax", "youden", "sens", "spec"]
    target: float | None = None  # the sensitivity or specificity wanted, for kind sens / spec

    @classmethod
    def parse(cls, text: str) -> OperatingPoint:
        """ "argmax", "youden", "sens=0.95", "spec=0.9"; ConfigError naming the forms else."""
        name, sep, value = text.strip().lower().partition("=")
        if not sep and name in ("argmax", "youden"):
            return cls(name)  # type: ignore[arg-type]
        if sep and name in ("sens", "spec"):
            try:
                target = float(value)
            except ValueError:
                target = float("nan")
            if 0 < target <= 1:
                return cls(name, target)  # type: ignore[arg-type]
        raise ConfigError(f"operating point {text!r}: use argmax, youden, sens=T or spec=T "
                          "with T a share in (0, 1], such as sens=0.95")

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


def check_operating_point(text: str, num_classes: int) -> OperatingPoint:
    """The parsed point; a ConfigError when it needs a threshold and the task has more than
    two classes (a threshold on one class's probability means nothing there)."""
    point = OperatingPoint.parse(text)
    if point.kind != "argmax" and num_classes != 2:
        raise ConfigError(f"operating point {text!r} needs two classes but the data has "
                          f"{num_classes}; use argmax")
    return point


def choose_threshold(y_true: np.ndarray, probs: np.ndarray, point: OperatingPoint,
                     positive: int = 1) -> float | None:
    """The probability of class `positive` at or above which a two-class model predicts it,
    chosen on validation labels and probabilities (N, 2); None for `argmax`.

    Candidates are the distinct scores seen (and one above the highest: predict nothing
    positive). `youden` takes the one with the highest sens + spec (the highest threshold on
    ties, fewer false alarms); `sens=T` the highest threshold whose sensitivity is at least T;
    `spec=T` the lowest whose specificity is at least T. With one class only in `y_true` the
    point is undefined and the result is 0.5, today's argmax.
    """
    if point.kind == "argmax":
        return None
    y, p = _check_inputs(y_true, probs, 2, positive)
    score, is_pos = p[:, positive].astype(np.float64), y == positive
    if is_pos.all() or not is_pos.any():
        return 0.5
    candidates = np.append(np.unique(score), np.nextafter(score.max(), np.inf))
    predicted = score[None, :] >= candidates[:, None]  # (T, N)
    sens = (predicted & is_pos).sum(1) / is_pos.sum()
    spec = (~predicted & ~is_pos).sum(1) / (~is_pos).sum()
    if point.kind == "youden":
        j = sens + spec
        return float(candidates[np.flatnonzero(j == j.max())[-1]])
    if point.kind == "sens":
        return float(candidates[np.flatnonzero(sens >= point.target)[-1]])
    reached = np.flatnonzero(spec >= point.target)  # the top candidate has spec 1: never empty
    return float(candidates[reached[0]])


def decide(probs: np.ndarray, threshold: float | None = None, positive: int = 1) -> np.ndarray:
    """Predicted class per row of probabilities (N, K): the most probable one, or for two
    classes with a `threshold`, `positive` where its probability is at or above it."""
    p = np.asarray(probs)
    if threshold is None:
        return p.argmax(1)
    if p.shape[1] != 2:
        raise ValueError(f"a decision threshold needs two classes, not {p.shape[1]}")
    return np.where(p[:, positive] >= threshold, positive, 1 - positive)


def test_metrics(y_true: np.ndarray, probs: np.ndarray, num_classes: int, *,
                 prefix: str = "test", n_boot: int = 1000, confidence: float = 0.95,
                 seed: int = 0, positive: int = 1, threshold: float | None = None
                 ) -> dict[str, float]:
    """Held-out scores with percentile-bootstrap confidence intervals.

    Point estimates `<prefix>_acc`, `_bal_acc`, `_f1`, `_kappa` (Cohen's), `_log_loss` (nats
    per image), `_auc`, and for two classes `_sens` and `_spec`, as in `classification_metrics`.
    For each, `<name>_ci_low` and `<name>_ci_high`: the central `confidence` share of the
    metric over `n_boot` resamples of the test images drawn with replacement: resample b is
    row b of `np.random.default_rng(seed).integers(0, N, (n_boot, N))`. Resamples where a
    metric is undefined (say, AUC with one class drawn) are left out of that metric's
    interval, and an interval with no defined resample is NaN. `n_boot=0` gives point
    estimates only. With a `threshold` (two classes), the class-decision metrics (acc, bal_acc,
    f1, kappa, sens, spec) are taken at it, as `decide` predicts; auc and log_loss do not
    depend on it.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"bootstrap confidence {confidence} is not between 0 and 1; "
                          "use a share such as 0.95")
    if n_boot < 0:
        raise ConfigError(f"bootstrap resamples n_boot={n_boot} is negative; use 0 for no "
                          "intervals or a count such as 1000")
    y, p = _check_inputs(y_true, probs, num_classes, positive)
    n, k = len(y), num_classes
    names = ["acc", "bal_acc", "f1", "kappa", "log_loss", "auc"]
    names += ["sens", "spec"] if k == 2 else []
    pair = y * k + decide(p, threshold, positive)
    losses = _image_log_losses(y, p)

    def scores(counts: np.ndarray, cm: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for a batch of weightings `counts` (B, N) with confusion matrices
        `cm` (B, K, K)."""
        out = _confusion_scores(cm, positive)
        with np.errstate(invalid="ignore"):  # an empty set has no mean loss: NaN
            out["log_loss"] = counts @ losses / counts.sum(1)
        out["auc"] = _auc(y, p, counts, positive)
        return out

    point = scores(np.ones((1, n)), np.bincount(pair, minlength=k * k).reshape(1, k, k))
    result = {f"{prefix}_{name}": float(point[name][0]) for name in names}
    if n_boot == 0:
        return result

    rng = np.random.default_rng(seed)
    # Resamples per chunk: each chunk holds a few (B, N) arrays of ~4M elements (~32 MB).
    per_chunk = max(1, 4_000_000 // max(n, 1))
    chunks: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot if n else 0, per_chunk):  # no images: nothing to resample
        b = min(per_chunk, n_boot - start)
        picks = rng.integers(0, n, size=(b, n))  # image indices of each resample
        row = np.arange(b)[:, None]
        counts = np.bincount((row * n + picks).ravel(), minlength=b * n).reshape(b, n)
        cm = np.bincount((row * k * k + pair[picks]).ravel(), minlength=b * k * k)
        chunks.append(scores(counts.astype(np.float64), cm.reshape(b, k, k)))
    tail = (1 - confidence) / 2 * 100  # percent of resamples below the interval
    for name in names:
        values = np.concatenate([chunk[name] for chunk in chunks] or [np.empty(0)])
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan,) * 2
        result[f"{prefix}_{name}_ci_low"] = float(low)
        result[f"{prefix}_{name}_ci_high"] = float(high)
    return result


test_metrics.__test__ = False  # type: ignore[attr-defined]  # a library function: pytest, skip it


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (K, K): rows the true class, columns the predicted one, every class listed."""
    pair = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(pair, minlength=num_classes**2).reshape(num_classes, num_classes)


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, num_classes: int, positive: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 (N,) and probabilities as (N, K); shape mismatches are caller bugs."""
    y = np.asarray(y_true).astype(np.int64, copy=False).reshape(-1)
    p = np.asarray(probs)
    if p.ndim != 2 or p.shape != (len(y), num_classes):
        raise ValueError(f"probs has shape {p.shape}; expected ({len(y)}, {num_classes}): "
                         "one row per label, one column per class")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}; got {y.min()}..{y.max()}")
    if num_classes == 2 and positive not in (0, 1):
        raise ValueError(f"positive class {positive} is not 0 or 1")
    return y, p


def _confusion_scores(cm: np.ndarray, positive: int) -> dict[str, np.ndarray]:
    """acc, bal_acc, f1 (macro), kappa and, for two classes, sens and spec: one value per
    confusion matrix in `cm` (B, K, K), rows true, columns predicted."""
    cm = cm.astype(np.float64)
    n = cm.sum((1, 2))
    hits = np.diagonal(cm, axis1=1, axis2=2)  # (B, K) true positives per class
    support = cm.sum(2)  # images per true class
    predicted = cm.sum(1)  # images per predicted class
    with np.errstate(divide="ignore", invalid="ignore"):  # the undefined cases become NaN
        recall = hits / support
        acc = hits.sum(1) / n
        present = support > 0
        bal_acc = np.where(present, recall, 0).sum(1) / present.sum(1)
        f1_denominator = support + predicted
        f1 = np.where(f1_denominator > 0, 2 * hits / f1_denominator, 0).mean(1)
        f1 = np.where(n > 0, f1, np.nan)  # no images: no score, not a score of 0
        chance = (support * predicted).sum(1) / n**2  # agreement expected by chance
        kappa = np.where(chance < 1, (acc - chance) / (1 - chance), np.nan)
    out = {"acc": acc, "bal_acc": bal_acc, "f1": f1, "kappa": kappa}
    if cm.shape[1] == 2:
        out["sens"], out["spec"] = recall[:, positive], recall[:, 1 - positive]
    return out


def _image_log_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """-log p(true class) per image, in nats; probabilities clipped to [eps, 1 - eps] of their
    dtype as scikit-learn does, so a confident mistake costs ~36.7 (float64), not infinity."""
    dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
    eps = np.finfo(dtype).eps
    chosen = p[np.arange(len(y)), y].astype(np.float64)
    return -np.log(np.clip(chosen, eps, 1 - eps))


def _auc(y: np.ndarray, p: np.ndarray, counts: np.ndarray, positive: int) -> np.ndarray:
    """ROC-AUC per weighting in `counts` (B, N): of `p[:, positive]` for two classes, else the
    mean one-vs-rest AUC over the classes defined in that weighting (NaN when none is)."""
    k = p.shape[1]
    if k == 2:
        return _ranked_auc(p[:, positive], y == positive, counts)
    per_class = np.stack([_ranked_auc(p[:, c], y == c, counts) for c in range(k)])  # (K, B)
    defined = ~np.isnan(per_class)
    with np.errstate(invalid="ignore"):
        return np.where(defined, per_class, 0).sum(0) / defined.sum(0)


def _ranked_auc(score: np.ndarray, is_positive: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per weighting (B, N): the weighted share of (positive, negative) pairs
    where the positive scores higher, ties counting one half.

    Where each positive falls among the sorted negative scores does not depend on the weights,
    so it is found once; each weighting then needs one cumulative sum of its negatives' counts
    and a lookup per positive."""
    negatives = np.flatnonzero(~is_positive)
    negatives = negatives[np.argsort(score[negatives], kind="stable")]
    positives = np.flatnonzero(is_positive)
    sorted_scores = score[negatives]
    lower = np.searchsorted(sorted_scores, score[positives], side="left")  # strictly below
    upper = np.searchsorted(sorted_scores, score[positives], side="right")  # below or tied
    cum = np.zeros((len(counts), len(negatives) + 1))
    np.cumsum(counts[:, negatives], axis=1, out=cum[:, 1:])  # cum[:, j]: the j lowest negatives
    pos_counts = counts[:, positives]
    wins = np.einsum("bi,bi->b", pos_counts, cum[:, lower] + cum[:, upper]) / 2
    pairs = pos_counts.sum(1) * cum[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


# Temperatures fit_temperature searches, as 1/T: from T = 0.25 to T = 100. Sharpening is capped
# at 4x: over-confident networks need T > 1 (Guo et al. find 1 to 3), and a T far below 1 comes
# from a validation split too small or too easy to say more than "the model is right here".
_INVERSE_TEMPERATURE_RANGE = (0.01, 4.0)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities (N, K) rescaled as if the logits had been divided by
    `temperature`: log-probabilities are logits up to a per-row constant, which the softmax
    removes, so the probabilities alone suffice. The argmax never changes."""
    p = np.asarray(probs, dtype=np.float64)
    logits = np.log(np.clip(p, np.finfo(np.float64).tiny, None)) / temperature
    logits -= logits.max(1, keepdims=True) if len(p) else 0.0
    out = np.exp(logits)
    return out / out.sum(1, keepdims=True)


def fit_temperature(y_true: np.ndarray, probs: np.ndarray, iterations: int = 60) -> float:
    """The temperature T minimising the mean negative log-likelihood of the labels under
    `apply_temperature(probs, T)`: temperature scaling (Guo et al. 2017), fitted on
    validation. The NLL is convex in 1/T, so a golden-section search over log(1/T) finds the
    minimum to ~1e-9 relative in `iterations` steps. No images, or every image's top class
    right: 1.0, since the NLL then falls without end as T shrinks and there is nothing to fit."""
    y = np.asarray(y_true).astype(np.int64, copy=False).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if not len(y) or (p.argmax(1) == y).all():
        return 1.0
    logp = np.log(np.clip(p, np.finfo(np.float64).tiny, None))

    def nll(log_beta: float) -> float:
        z = logp * np.exp(log_beta)
        top = z.max(1)
        normaliser = top + np.log(np.exp(z - top[:, None]).sum(1))
        return float(np.mean(normaliser - z[np.arange(len(y)), y]))

    low, high = np.log(_INVERSE_TEMPERATURE_RANGE)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return float(1 / np.exp((low + high) / 2))


@dataclass(frozen=True)
class Reliability:
    """Top-label reliability in equal-width confidence bins: what a reliability diagram shows
    and what the expected calibration error sums. Empty bins hold NaN confidence and accuracy."""

    edges: np.ndarray  # (B + 1,) bin edges over [0, 1]
    confidence: np.ndarray  # (B,) mean top probability of the images in each bin
    accuracy: np.ndarray  # (B,) share of them whose top class is the true one
    counts: np.ndarray  # (B,) images per bin

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence|."""
        n = self.counts.sum()
        if not n:
            return float("nan")
        gaps = np.where(self.counts > 0, np.abs(self.accuracy - self.confidence), 0.0)
        return float((self.counts * gaps).sum() / n)


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> Reliability:
    """Each image falls in the bin of its top probability (a bin holds (low, high], the first
    also 0); 15 bins as in Guo et al., so values compare with the literature."""
    y = np.asarray(y_true).astype(np.int64, copy=False).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    top = p.max(1) if len(p) else np.zeros(0)
    hit = (p.argmax(1) == y).astype(np.float64) if len(p) else np.zeros(0)
    which = np.clip(np.searchsorted(edges, top, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        confidence = np.bincount(which, weights=top, minlength=bins) / counts
        accuracy = np.bincount(which, weights=hit, minlength=bins) / counts
    return Reliability(edges, confidence, accuracy, counts)


def calibration_scores(y_true: np.ndarray, probs: np.ndarray, prefix: str) -> dict[str, float]:
    """`<prefix>_ece` (15 bins, top label) and `<prefix>_brier`: the multi-class Brier score,
    the mean over images of sum_k (p_k - [y = k])^2 (0 best, 2 worst; for two classes twice
    scikit-learn's binary brier_score_loss)."""
    y = np.asarray(y_true).astype(np.int64, copy=False).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    onehot = np.eye(p.shape[1])[y] if len(y) else np.zeros_like(p)
    brier = float(((p - onehot) ** 2).sum(1).mean()) if len(y) else float("nan")
    return {f"{prefix}_ece": reliability(y, p).ece, f"{prefix}_brier": brier}

"""THE trial: sampled values -> imgcls training, an epoch at a time -> per-epoch reports -> an
outcome. Both backends drive the same TrialRunner; they differ only in how they sample values,
decide pruning and keep checkpoints.

A trial can stop and go on. After an epoch (as the study's `checkpoint_every` says) the runner's
whole state is checkpointed (hpo.search.checkpoints) before the epoch is logged or reported, so
that a trial killed at any point goes on from its last checkpoint in the same MLflow run
(reopened), no epoch logged twice (with checkpoint_every: 1, at most one trained twice). A trial
whose checkpoint is missing, unreadable or written for other settings starts over from epoch 1
in a new run, and says why.

Each trial ends told: COMPLETE, PRUNED, or FAILED with a reason. A failure is recorded and
returned, never raised, so that the study goes on; only an interrupt (Ctrl-C) propagates, after
the trial's run is closed as KILLED, INTERRUPTED, with its checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from pydantic import ValidationError

from hpo.config.hparams import PERTURBABLE, HParams, first_error
from hpo.config.space import Scalar
from hpo.config.trial import TrialOutcome, TrialState
from hpo.search.assess import EVAL_BATCH_SIZE, assess, input_example, model_metadata
from hpo.search.checkpoints import CheckpointPolicy, state_bytes
from hpo.search.context import StudyContext, trial_seed
from hpo.tracking.models import log_weights
from hpo.tracking.runs import TrialRun, logged_epochs, reopen_trial, start_trial
from hpo.tracking.tags import TAG_EXPLOIT
from imgcls.data.augment import Augment
from imgcls.data.prepare import PreparedData
from imgcls.errors import ImgclsError, first_line
from imgcls.models.build import build_model
from imgcls.profile import profile_model
from imgcls.train.engine import Diverged, TrainConfig
from imgcls.train.folds import FoldTrainer
from imgcls.train.runtime import seed_everything
from imgcls.train.trainer import Trainer

ShouldPrune = Callable[[int, float], bool]  # (epoch, objective value) -> stop this trial now?
Report = Callable[[int, float], None]  # (epoch, objective value) of an epoch trained before
EpochObserver = Callable[[int, int, Mapping[str, float]], None]  # (trial, epoch, metrics)
Resumed = Callable[[int, int, str | None], None]  # (trial, epochs done, why it starts over)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # of the checkpoint around the trainer's state
# What a checkpoint's identity gained since that format, and the value one without it was
# written for (so that an upgrade does not start every paused trial over)
IDENTITY_ADDED = {"folds": 0}

Config = TypeVar("Config")


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


def given(hp: HParams, kind: type[Config], **settings: Any) -> Config:
    """imgcls's `kind` (a dataclass: TrainConfig, Augment) with every field that is a
    hyperparameter of the same name taken from `hp`, and the study's `settings` for the rest."""
    fields = dataclasses.fields(kind)  # type: ignore[arg-type]
    names = {f.name for f in fields} & set(HParams.model_fields)
    return kind(**{name: getattr(hp, name) for name in names}, **settings)


class TrialRunner:
    """One trial from its start (or its checkpoint) to its end: `begin`, `step` until `done`
    (or `stop` for a pruner's verdict), `end`; `interrupted` or `failed` otherwise."""

    def __init__(self, ctx: StudyContext, number: int, sampled: Mapping[str, Scalar],
                 placement: Mapping[str, str] | None = None) -> None:
        self.ctx, self.number = ctx, number
        self.placement = dict(placement or {})  # tags: imgcls_hpo.device, imgcls_hpo.worker
        self.outcome = TrialOutcome(number, TrialState.FAILED, dict(sampled))
        self.seed = trial_seed(ctx.spec.seed, number)
        self.hp: HParams | None = None
        self.run: TrialRun | None = None
        self.trainer: Trainer | FoldTrainer | None = None
        self.cost: dict[str, float] = {}  # the model's params_count, flops, macs
        self.logged = 0  # the epochs the trial's run holds
        self.pruned = False
        self.policy = CheckpointPolicy(ctx.spec.checkpoint_every, ctx.checkpoint_speed)
        self._started = time.perf_counter()

    # -- the trial's life ------------------------------------------------------------------

    def begin(self, checkpoint: Mapping[str, Any] | None = None, *, again: bool = False,
              run_id: str | None = None) -> str | None:
        """Validate the hyperparameters, build the model and its trainer, and go on from
        `checkpoint` if it is this trial's; then open the trial's run: the checkpoint's own (or
        `run_id`), reopened, or a new one (`again`: the trial ran before, and its earlier run
        is replaced). Returns why `checkpoint` could not be used (None when it was, or there
        was none)."""
        spec, data = self.ctx.spec, self.ctx.data
        self.hp = spec.trial_params(self.outcome.params)
        self.outcome.params = self.hp.model_dump()
        seed_everything(self.seed)
        model = self._model()
        profile = profile_model(model, self.hp.arch, data.in_channels, data.config.image_size)
        self.cost = {"params_count": float(profile.params), "flops": float(profile.flops),
                     "macs": float(profile.macs)}
        config = given(self.hp, TrainConfig, max_epochs=spec.max_epochs,
                       patience=spec.patience, monitor=spec.objective)
        self.trainer = (self._fold_trainer(model, config) if self.ctx.folds
                        else self._trainer(model, data, config))
        why = self._why_not(checkpoint) if checkpoint is not None else None
        if checkpoint is not None and why is None:
            self.trainer.load_state_dict(checkpoint["trainer"])
            run_id = checkpoint["trial"].get("run_id")
        self.policy.since = self.trainer.seconds
        self.ctx.acceleration.reset_peak_memory()
        self._open_run(run_id, again=again or checkpoint is not None)
        for h in self.trainer.history:  # trained, checkpointed, but not logged before the stop
            self._log_epoch(int(h["epoch"]), h)
        return why

    def _trainer(self, model: torch.nn.Module, data: PreparedData, config: TrainConfig, *,
                 validate: bool = True, select: bool = True) -> Trainer:
        """A trainer of `model` on `data`'s training split, validated on its val split (or not
        at all: a model refit on train and val together)."""
        assert self.hp is not None
        resident, device = self.ctx.images_on_device, self.ctx.device
        train = data.batches("train", self.hp.batch_size, augment=given(self.hp, Augment),
                             seed=self.seed, device=device, resident=resident)
        val = (data.batches("val", max(self.hp.batch_size, EVAL_BATCH_SIZE), device=device,
                            resident=resident) if validate else None)
        return Trainer(model, train, val, config, data.num_classes,
                       accel=self.ctx.acceleration, select=select)

    def _model(self) -> torch.nn.Module:
        assert self.hp is not None
        data = self.ctx.data
        return build_model(self.hp.arch, data.num_classes, data.in_channels, self.hp.dropout,
                           data.config.image_size, pretrained=self.hp.pretrained,
                           freeze=self.hp.freeze, weights_dir=self.ctx.spec.weights_dir)

    def _fold_trainer(self, model: torch.nn.Module, config: TrainConfig) -> FoldTrainer:
        """The study's folds trained together (the first on `model`, each other on a model
        built the same way), and the refit of a model on all their images: built, seeded as
        the trial, only when the folds have chosen how many epochs it trains."""
        data = self.ctx.data
        members = [self._trainer(model if i == 0 else self._model(),
                                 dataclasses.replace(data, split=fold), config, select=False)
                   for i, fold in enumerate(self.ctx.folds)]

        def refit() -> Trainer:
            seed_everything(self.seed)
            every = dataclasses.replace(data, split=data.split.pooled("train"))
            return self._trainer(self._model(), every, config, validate=False)

        return FoldTrainer(members, [fold.indices("val") for fold in self.ctx.folds], config,
                           refit)

    def step(self) -> dict[str, float]:
        """Train one epoch; checkpoint it when due (into the study's checkpoints, where the
        runner keeps them), then log it. Its metrics."""
        assert self.trainer is not None, "begin() first"
        metrics = self.trainer.step()
        checkpoints = self.ctx.checkpoints
        state = self.due_checkpoint() if checkpoints is not None else None
        if checkpoints is not None and state is not None:
            with self.policy.writing(state, self.trainer.seconds):
                checkpoints.save(self.number, state)
        self._log_epoch(self.trainer.epoch, metrics)
        return metrics

    def due_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint of the epoch just trained when the study's checkpoint_every makes one
        due (built once, and only when its size or its writing needs it); else None."""
        assert self.trainer is not None
        state: dict[str, Any] | None = None

        def size() -> int:
            nonlocal state
            state = self.checkpoint()
            return state_bytes(state)

        if not self.policy.due(self.trainer.epoch, self.trainer.seconds, self.trainer.done, size):
            return None
        return state if state is not None else self.checkpoint()

    @property
    def done(self) -> bool:
        return self.trainer is not None and self.trainer.done

    @property
    def epoch(self) -> int:
        return self.trainer.epoch if self.trainer is not None else 0

    def adopt(self, checkpoint: Mapping[str, Any]) -> int:
        """Population Based Training's exploit: go on from another trial's checkpoint (its
        weights, optimizer, schedule and epochs) with this trial's hyperparameters, which may
        change mid-training (lr, momentum, weight decay, the augmentation). Returns the trial
        taken from; the run gets a tag for it."""
        assert self.trainer is not None and self.hp is not None
        self.trainer.load_state_dict(checkpoint["trainer"])
        self.trainer.stop_reason = None  # the donor's early stop is not this trial's
        self.trainer.set_hyperparameters(lr=self.hp.lr, momentum=self.hp.momentum,
                                         weight_decay=self.hp.weight_decay,
                                         augment=given(self.hp, Augment))
        donor = int(checkpoint["trial"]["number"])
        if self.run is not None:
            changed = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in self.perturbed().items())
            self.run.tracker.set_tags(self.run.run_id, {
                f"{TAG_EXPLOIT}.{self.trainer.epoch}": f"from trial {donor}: {changed}"})
        return donor

    def perturbed(self) -> dict[str, float]:
        """The values, now, of the searched hyperparameters that may change mid-training."""
        assert self.hp is not None
        return {p.name: getattr(self.hp, p.name) for p in self.ctx.spec.space.searched
                if p.name in PERTURBABLE}

    def stop(self, reason: str) -> None:
        """The pruner's verdict: end after this epoch, PRUNED."""
        assert self.trainer is not None
        self.trainer.stop(reason)
        self.pruned = True

    def end(self) -> TrialOutcome:
        """Assess the best epoch and record the trial's end: COMPLETE with its weights, or
        PRUNED. Its checkpoint is removed: everything it keeps is in its run."""
        assert self.trainer is not None and self.hp is not None
        spec, outcome = self.ctx.spec, self.outcome
        result = self.trainer.finish()
        outcome.epochs = result.epochs
        if result.best_epoch == 0:
            raise RuntimeError(f"no epoch gave a finite {spec.objective}")
        outcome.best_epoch, outcome.value = result.best_epoch, result.best_metrics[spec.objective]
        spent = {"train_seconds": self.trainer.seconds,
                 "peak_memory_mb": self.ctx.acceleration.peak_memory_mb()}
        if spec.objectives:  # a Pareto search: every objective's value, in the study's order
            scores = {**result.best_metrics, **self.cost, **spent}
            outcome.values = [scores[name] for name, _ in spec.terms]
        outcome.state = TrialState.PRUNED if self.pruned else TrialState.COMPLETE
        if self.run is not None:
            self.run.log_metrics(spent)
        validated = self.ctx.data.split.pooled("val") if self.ctx.folds else None  # out of fold
        summary = assess(self.ctx, self.seed, result, self.trainer.model, self.run, validated)
        outcome.metrics = {**self.cost, **spent, **summary}
        if self.run is not None:
            if self.pruned:
                self.run.finish(TrialState.PRUNED)
            else:
                self._record_model()
        if self.ctx.checkpoints is not None:
            self.ctx.checkpoints.remove(self.number)
        return self._ended()

    def interrupted(self) -> TrialOutcome:
        """Ctrl-C: the run closes KILLED, INTERRUPTED; the checkpoint stays, to go on from."""
        self.outcome.state = TrialState.INTERRUPTED
        self.outcome.fail_reason = TrialState.INTERRUPTED.reason
        if self.run is not None:
            _quietly(self.run.finish, TrialState.INTERRUPTED)
        return self._ended()

    def failed(self, exc: Exception) -> TrialOutcome:
        """The trial cannot go on: FAILED with its reason, the traceback in its run."""
        self.outcome.state, self.outcome.fail_reason = TrialState.FAILED, failure_reason(exc,
                                                                                      self.hp)
        if self.run is not None:
            _quietly(self.run.log_text, traceback.format_exc(), "error.txt")
            _quietly(self.run.finish, TrialState.FAILED, self.outcome.fail_reason)
        if self.ctx.checkpoints is not None:
            self.ctx.checkpoints.remove(self.number)
        return self._ended()

    # -- state -------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What makes a checkpoint this trial's: a checkpoint of any other settings is not
        resumed from."""
        spec, data = self.ctx.spec, self.ctx.data
        assert self.hp is not None
        return {"study": spec.name, "number": self.number, "params": self.hp.model_dump(),
                "seed": self.seed, "data": data.catalog.fingerprint,
                "image_size": data.config.image_size, "channels": data.config.channels,
                "max_epochs": spec.max_epochs, "patience": spec.patience,
                "objective": spec.objective, "folds": spec.folds}

    def checkpoint(self) -> dict[str, Any]:
        """The trial's whole state: what it is, its run, and its trainer's state."""
        assert self.trainer is not None
        return {"format": CHECKPOINT_FORMAT,
                "trial": {**self.identity(), "run_id": self.run.run_id if self.run else None},
                "trainer": self.trainer.state_dict()}

    def _why_not(self, checkpoint: Mapping[str, Any]) -> str | None:
        if checkpoint.get("format") != CHECKPOINT_FORMAT or "trainer" not in checkpoint:
            return "its checkpoint was written by another version"
        recorded = {**IDENTITY_ADDED, **checkpoint.get("trial", {})}
        for key, value in self.identity().items():
            if recorded.get(key) != value:
                return f"its checkpoint was written for another {key}"
        return None

    # -- recording -------------------------------------------------------------------------

    def _open_run(self, run_id: str | None, *, again: bool) -> None:
        ctx = self.ctx
        if ctx.tracker is None:
            return
        if run_id is not None and ctx.tracker.find_run(run_id, ctx.experiment_id):
            self.run = reopen_trial(ctx.tracker, run_id, self.number, self.placement)
            self.logged = logged_epochs(ctx.tracker, run_id, ctx.spec.objective)
            return
        self.run = start_trial(ctx.tracker, ctx.experiment_id, ctx.study_run_id, ctx.spec.name,
                               self.number, {**self.outcome.params,
                                             **ctx.trial_settings(self.number)},
                               tags=self.placement, again=again)
        self.outcome.run_id = self.run.run_id
        self.run.log_metrics(self.cost)

    def _log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """An epoch's metrics, at step = epoch, unless the run holds that epoch already (it was
        logged before a stop, and trained again from an older checkpoint)."""
        if self.run is not None and epoch > self.logged:
            self.run.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            self.logged = epoch

    def _record_model(self) -> None:
        """A COMPLETE trial's best weights and preprocessing (and, with log_models: all, its
        pt2 model too); then the run closes COMPLETE."""
        assert self.run is not None and self.trainer is not None and self.hp is not None
        # in the default layout: a GPU trial's channels_last weights would be saved as such,
        # and a CPU predictor would pay for the layout change on every call
        model = self.trainer.model.to("cpu", memory_format=torch.contiguous_format)
        metadata = model_metadata(self.ctx, self.hp.arch, self.outcome.metrics)
        # what predict's MC-dropout and flip TTA reuse: the dropout rate and flips trained with
        metadata["imgcls"].update(dropout=self.hp.dropout, hflip=self.hp.hflip, vflip=self.hp.vflip)
        log_weights(self.run.tracker, self.run.run_id, model.state_dict(), metadata["imgcls"])
        if self.ctx.spec.log_models == "all":
            self.run.finish_with_model(model, input_example(self.ctx), self.ctx.data.num_classes,
                                       metadata)
        else:
            self.run.finish(TrialState.COMPLETE)

    def _ended(self) -> TrialOutcome:
        if self.run is not None:
            self.outcome.run_id = self.run.run_id
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one
        self.outcome.seconds = time.perf_counter() - self._started
        return self.outcome


def run_trial(ctx: StudyContext, number: int, sampled: Mapping[str, Scalar],
              should_prune: ShouldPrune | None = None,
              on_epoch: EpochObserver | None = None,
              placement: Mapping[str, str] | None = None, *,
              resumed: bool = False, report: Report | None = None,
              on_resume: Resumed | None = None) -> TrialOutcome:
    """Train and record one trial, going on from its checkpoint when it has one.

    should_prune: asked after each epoch, with the objective's value; a trial that has trained
        its last epoch completes whatever it says (as on Ray).
    resumed: the trial ran before (a backend resumes it): without a usable checkpoint it starts
        over in a new run, which replaces the earlier one.
    report: told the objective of each epoch trained before the resume, so that a pruner judges
        the whole curve.
    on_resume: told (trial, epochs already trained, why it starts over or None) when the trial
        resumes or starts over.
    """
    runner = TrialRunner(ctx, number, sampled, placement)
    objective = ctx.spec.objective
    try:
        checkpoint, unreadable = (ctx.checkpoints.load(number) if ctx.checkpoints is not None
                                  else (None, None))
        why = runner.begin(checkpoint, again=resumed) or unreadable
        if on_resume is not None and (runner.epoch or why or resumed):
            on_resume(number, runner.epoch, why)
        if why:
            log.warning("trial %d starts over from epoch 1: %s", number, why)
        assert runner.trainer is not None
        for h in runner.trainer.history:
            if report is not None:
                report(int(h["epoch"]), h[objective])
        while not runner.done:
            metrics = runner.step()
            if on_epoch is not None:
                on_epoch(number, runner.epoch, metrics)
            prune = should_prune is not None and should_prune(runner.epoch, metrics[objective])
            if prune and not runner.done:
                runner.stop(f"pruned at epoch {runner.epoch}")
        return runner.end()
    except KeyboardInterrupt:
        runner.interrupted()
        raise
    except Exception as exc:
        return runner.failed(exc)


def _quietly(record: Callable[..., None], *args: Any) -> None:
    """Record a failure; if tracking fails too, warn, but keep the trial's own reason."""
    try:
        record(*args)
    except Exception as exc:
        log.warning("could not record the trial's failure in MLflow: %s", exc)

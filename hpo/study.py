"""StudySpec: a study file (studies/NAME.yaml) merged with command-line overrides, validated once.

Precedence: code defaults < study file < command-line flags < the values a trial samples.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hpo.space import Scalar, SearchSpace, SpaceError
from imgcls.data import DataConfig
from imgcls.data.augment import Augment
from imgcls.errors import ConfigError, first_line
from imgcls.metrics import Direction, metric_direction
from imgcls.models import MODELS, check_image_size, weights_file
from imgcls.train import OPTIMIZERS, SCHEDULERS

BUNDLED_STUDIES = Path(__file__).parent / "studies"


class StudyError(ConfigError):
    """A study that cannot be found, read or validated."""


class HParams(BaseModel):
    """One trial's hyperparameters. Every name a search space may use, under its flag name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Optimization
    lr: float = Field(0.01, gt=0)  # peak learning rate (too high diverges: the trial fails)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum; Adam's beta1
    nesterov: bool = False  # SGD only
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: str = "sgd"  # sgd, adam or adamw
    scheduler: str = "none"  # none, step, cosine or onecycle: the learning rate over the epochs
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up of the learning rate, in epochs
    lr_step_epochs: int = Field(0, ge=0)  # step scheduler: epochs per step (0: a third of them)
    lr_gamma: float = Field(0.1, gt=0, le=1)  # step scheduler: factor per step
    # Model
    arch: str = "simplecnn"  # a name in imgcls.models.MODELS
    pretrained: bool = False  # start from ImageNet weights (from a local file: nothing downloads)
    freeze: bool = False  # train the classifier head only
    # Regularization
    weight_decay: float = Field(0.0, ge=0, le=1)  # the optimizer's decay
    l2: float = Field(0.0, ge=0, le=1)  # explicit L2 penalty on the weights, added to the loss
    dropout: float = Field(0.0, ge=0, lt=1)  # before the classifier head
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighted: bool = False  # weigh each class's loss by its rarity in the training split
    # Augmentation of training batches (0 = off)
    hflip: float = Field(0.5, ge=0, le=1)  # probability of a left-right flip per image
    vflip: float = Field(0.0, ge=0, le=1)  # probability of an up-down flip per image
    rotation: float = Field(0.0, ge=0, le=180)  # degrees: each image turned by up to +-rotation
    crop_scale: float = Field(1.0, gt=0, le=1)  # random resized crop keeping >= this area share
    brightness: float = Field(0.0, ge=0, le=1)  # factor drawn from [1 - b, 1 + b]
    contrast: float = Field(0.0, ge=0, le=1)  # factor drawn from [1 - c, 1 + c]
    sharpness: float = Field(1.0, ge=0, le=10)  # sharpness factor: 0 blurs, 1 keeps, 2 sharpens
    sharpness_p: float = Field(0.5, ge=0, le=1)  # probability of applying it per image

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return MODELS.check_name(value)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return OPTIMIZERS.check_name(value)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return SCHEDULERS.check_name(value)

    def augment(self) -> Augment:
        return Augment(hflip=self.hflip, vflip=self.vflip, rotation=self.rotation,
                       crop_scale=self.crop_scale, brightness=self.brightness,
                       contrast=self.contrast, sharpness=self.sharpness,
                       sharpness_p=self.sharpness_p)

    @classmethod
    def kinds(cls) -> dict[str, type]:
        """Each field's Python type: how a SPEC for it is read."""
        return {name: typing.get_origin(f.annotation) or f.annotation  # type: ignore[misc]
                for name, f in cls.model_fields.items()}

    @classmethod
    def check_value(cls, name: str, value: Scalar) -> None:
        """Raise SpaceError when `value` is not allowed for hyperparameter `name`."""
        try:
            cls.model_validate({name: value})
        except ValidationError as exc:
            raise SpaceError(f"{name}: {first_error(exc, with_field=False)}") from None


class StudySpec(BaseModel):
    """Everything a search needs, validated. Built by `load_study`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    data: DataConfig
    objective: str = "val_f1"  # a validation metric; its direction is implied
    # A Pareto search: every objective as NAME:DIRECTION, the first being `objective` (which
    # picks each trial's best epoch); empty for a single objective. Set by giving `objective`
    # a list: [val_f1:max, flops:min].
    objectives: tuple[str, ...] = ()
    trials: int = Field(20, ge=1)  # finished trials wanted in total, over every run of `search`
    max_epochs: int = Field(10, ge=1)
    patience: int | None = Field(3, ge=1)  # None: never stop early
    seed: int = Field(0, ge=0)  # the split, the sampler, and each trial's initialisation
    sampler: str = "tpe"
    # Successive halving: on the digits study it trains 37% of the epochs of an unpruned search
    # and reaches the same best value; median, 74% (benchmarks/pruning.py, RESULTS.md)
    pruner: str = "sha"
    # Where trials run: "all" visible GPUs (else the CPU), "none" (CPU), or GPU ids "0,1,3"
    gpus: str = Field("all", pattern=r"^(all|none|\d+(,\d+)*)$")
    trials_per_gpu: int = Field(1, ge=1, le=64)  # trials sharing one GPU at a time
    workers: int = Field(1, ge=1, le=256)  # trials in parallel on the CPU (cores divided)
    timeout: float | None = Field(None, gt=0)  # seconds after which no new trial starts
    # Known configurations to run first, e.g. a published baseline: [{lr: 0.001, arch: resnet18}]
    enqueue: tuple[dict[str, Scalar], ...] = ()
    ray_address: str | None = None  # join this Ray cluster (backend ray); None: a local runtime
    backend: str = "optuna"  # a name in hpo.backends.BACKENDS
    # Where pretrained weights files are looked for first (then torch hub's cache, $TORCH_HOME)
    weights_dir: str | None = None
    # Speed on CUDA (the CPU trains in float32 whatever these say, except compile)
    compile: bool = False  # torch.compile each trial's model: seconds of compilation per trial,
    # paid back with small batches and ViTs
    mixed_precision: bool = True  # bf16 autocast (fp16 with loss scaling without bf16); False:
    # float32 with TF32 matmuls
    # Share of a GPU's memory the study's uint8 images may take on it (divided among the trials
    # sharing the GPU). Within it they move to the GPU once per trial; beyond it batches are
    # gathered in pinned host memory while the previous step computes. 0: always the latter.
    device_cache: float = Field(0.25, ge=0, le=0.9)
    space: SearchSpace = Field(default_factory=SearchSpace)

    @model_validator(mode="before")
    @classmethod
    def _several_objectives(cls, raw: Any) -> Any:
        """`objective: [val_f1:max, flops:min]` -> objective val_f1, objectives both terms."""
        if isinstance(raw, dict) and isinstance(raw.get("objective"), list | tuple):
            terms = [str(t) for t in raw["objective"]]
            if not terms:
                raise ValueError("objective: give at least one metric")
            raw = {**raw, "objective": terms[0].partition(":")[0],
                   "objectives": [objective_term(t) for t in terms] if len(terms) > 1 else []}
        return raw

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        metric_direction(value)  # raises listing the valid names
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from hpo.backends import BACKENDS  # imports this module: import it late

        return BACKENDS.check_name(value)

    @field_validator("space", mode="before")
    @classmethod
    def _parse_space(cls, value: Any) -> SearchSpace:
        if isinstance(value, SearchSpace):
            return value
        if value is None:
            return SearchSpace()
        if not isinstance(value, Mapping):
            raise ValueError("space must map hyperparameter names to SPECs")
        space = SearchSpace.parse(value, HParams.kinds())
        space.check(HParams.check_value)
        return space

    @model_validator(mode="after")
    def _architectures_can_run(self) -> StudySpec:
        """Every architecture the search may pick takes the image size, and has its weights
        file when it may start pretrained: found now, not after the data is decoded."""
        archs = [str(a) for a in self._possible("arch")]
        for arch in archs:
            check_image_size(arch, self.data.image_size)
        if True in self._possible("pretrained"):
            for arch in archs:
                weights_file(arch, self.weights_dir)
        return self

    @model_validator(mode="after")
    def _enqueued_configurations_fit(self) -> StudySpec:
        """An enqueued configuration sets searched hyperparameters to values they may take."""
        for config in self.enqueue:
            for name, value in config.items():
                HParams.check_value(name, value)
                if name not in self.space or name not in {p.name for p in self.space.searched}:
                    raise SpaceError(f"enqueue: {name} is not searched in this study, so it "
                                     "cannot be set per trial")
                if name == "arch":
                    check_image_size(str(value), self.data.image_size)
        return self

    def _possible(self, name: str) -> list[Scalar]:
        """The values hyperparameter `name` may take in this study."""
        if name in self.space:
            return self.space.values(name)
        return [HParams.model_fields[name].default]

    @property
    def direction(self) -> Direction:
        return metric_direction(self.objective)

    @property
    def terms(self) -> list[tuple[str, Direction]]:
        """Every objective with its direction (one for a single-objective study)."""
        if not self.objectives:
            return [(self.objective, self.direction)]
        return [(name, direction) for name, _, direction in
                (t.partition(":") for t in self.objectives)]  # type: ignore[misc]

    def trial_params(self, sampled: Mapping[str, Scalar]) -> HParams:
        """Defaults < the space's fixed values < the sampled values, validated."""
        return HParams(**{**self.space.fixed_values(), **sampled})

    def as_params(self) -> dict[str, str]:
        """The spec flattened to text, for MLflow params: settings, then `space.<name>`."""
        out: dict[str, str] = {}
        for key, value in self.model_dump(exclude={"space", "data", "trials"}).items():
            out[key] = "" if value is None else str(value)
        for key, value in self.data.model_dump().items():
            out[f"data.{key}"] = "" if value is None else str(value)
        for key, spec in self.space.describe().items():
            out[f"space.{key}"] = spec
        return out


def known_studies() -> list[str]:
    names = {p.stem for d in _study_dirs() for p in d.glob("*.yaml")}
    return sorted(names)


def _study_dirs() -> list[Path]:
    return [d for d in (Path.cwd() / "studies", BUNDLED_STUDIES) if d.is_dir()]


def find_study(name_or_path: str) -> Path:
    """A path to a YAML file, or a name under ./studies (then the studies shipped with hpo)."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not path.is_file():
            raise StudyError(f"study file not found: {path}")
        return path
    for directory in _study_dirs():
        candidate = directory / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    known = ", ".join(known_studies()) or "none"
    raise StudyError(
        f"unknown study {name_or_path!r} (known: {known}); or give a path to a YAML file"
    )


def load_study(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> StudySpec:
    """Read a study and apply overrides: {"trials": 5, "data.path": "...", "space.lr": "..."}."""
    path = find_study(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study file must be a mapping of settings")
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, field = key.partition(".")
        if field:
            target = raw.get(section)
            if target is None:
                target = raw[section] = {}
            if not isinstance(target, dict):
                raise StudyError(f"{path}: {section} must be a mapping")
            target[field] = value
        else:
            raw[key] = value
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise StudyError(f"study {raw['name']!r}: {first_error(exc)}") from None
    except ConfigError as exc:  # raised by a validator that names its own field
        raise StudyError(f"study {raw['name']!r}: {exc}") from None


def first_error(exc: ValidationError, with_field: bool = True) -> str:
    """One line for the first problem pydantic found (the rest follow from fixing it)."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error", "missing", "assertion_error"):
        message += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    tail = f"; and {more} more problem(s)" if more else ""
    return f"{where}: {message}{tail}" if with_field and where else message + tail


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds in "2h", "90m", "1h30m", "45s" or a plain number of seconds."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            raise StudyError(f"--timeout {text!r}: expected a duration such as 90m, 2h or "
                             "1h30m") from None
        hours, minutes, secs = (float(g or 0) for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise StudyError(f"--timeout {text!r}: must be more than zero")
    return seconds


def parse_assignments(text: str) -> dict[str, Scalar]:
    """ "lr=0.001,batch_size=32,arch=resnet18" as hyperparameter values, typed by HParams."""
    from hpo.space import parse_param

    kinds = HParams.kinds()
    values: dict[str, Scalar] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value.strip():
            raise StudyError(f"--enqueue {text!r}: expected NAME=VALUE,... such as "
                             "lr=0.001,batch_size=32")
        if name not in kinds:
            raise StudyError(f"--enqueue {text!r}: unknown hyperparameter {name!r}")
        param = parse_param(name, value.strip(), kinds[name])
        if not hasattr(param, "value"):
            raise StudyError(f"--enqueue {text!r}: {name} needs one value, not a range")
        values[name] = param.value  # type: ignore[union-attr]
    return values


# What a Pareto search may trade against a validation metric: the cost of the model.
COST_METRICS: dict[str, Direction] = {"flops": "min", "macs": "min", "params_count": "min"}


def objective_term(text: str) -> str:
    """ "val_f1:max", "flops" -> "NAME:DIRECTION", checked: a validation metric or a model cost,
    with the direction given or implied."""
    name, _, direction = text.strip().partition(":")
    if name in COST_METRICS:
        implied = COST_METRICS[name]
    else:
        try:
            implied = metric_direction(name)
        except ConfigError:
            raise ValueError(
                f"objective {name!r} is neither a validation metric nor a model cost "
                f"({', '.join(COST_METRICS)})"
            ) from None
    if direction and direction not in ("max", "min"):
        raise ValueError(f"objective {text!r}: the direction is max or min, not {direction!r}")
    if direction and name not in COST_METRICS and direction != implied:
        raise ValueError(f"objective {text!r}: {name} is better when "
                         f"{'higher' if implied == 'max' else 'lower'} ({name}:{implied})")
    return f"{name}:{direction or implied}"

"""StudySpec: a study file (studies/NAME.yaml) merged with command-line overrides, validated once.

Precedence: code defaults < study file < command-line flags < the values a trial samples.
What is checked here is what a study says; what the chosen backend can do with it (its sampler,
its pruner, the backend's name itself) is checked by the backend before any data is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hpo.config.hparams import HParams, first_error
from hpo.config.space import Scalar, SearchSpace, SpaceError, parse_param
from imgcls.data.config import DataConfig
from imgcls.errors import ConfigError, first_line
from imgcls.metrics import (
    MODEL_COSTS,
    Direction,
    OperatingPoint,
    metric_direction,
    metric_goal,
)
from imgcls.models.catalog import can_download, check_image_size, find_weights, weights_file

BUNDLED_STUDIES = Path(__file__).parents[1] / "studies"  # hpo/studies: the shipped studies


class StudyError(ConfigError):
    """A study that cannot be found, read or validated."""


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
    # How a two-class model picks its class: argmax, youden, or a target such as sens=0.95 /
    # spec=0.9, the threshold chosen on validation at each trial's best epoch (imgcls.metrics)
    operating_point: str = "argmax"
    # Cross-validation for small data sets: K >= 2 trains every trial on K folds of the train
    # and validation images together, its value being the folds' mean (the deviation logged
    # beside it), and refits its model on all of them for the test split; 0: one train/val
    # split (imgcls.train.folds)
    folds: int = Field(0, ge=0, le=20)
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
    backend: str = "optuna"  # a name in hpo.search.backends.BACKENDS
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
    # When a trial checkpoints, after an epoch: what a trial interrupted or lost goes on from,
    # in the next search. N: every N epochs (1: at most one epoch is ever trained twice); 0:
    # never, and such a trial starts over; auto: as often as keeps the writing under 1% of the
    # training (hpo.search.checkpoints.CheckpointPolicy).
    checkpoint_every: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    # What a COMPLETE trial logs as its model: "weights" (its best weights and preprocessing;
    # promote exports them as a pyfunc), or "all" (also MLflow's pt2 model, a second or two of
    # export per trial)
    log_models: Literal["weights", "all"] = "weights"
    # Population Based Training (pruner pbt, Ray): epochs between exploits; None: a quarter
    # of max_epochs
    perturbation_interval: int | None = Field(None, ge=1)
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

    @field_validator("operating_point")
    @classmethod
    def _known_operating_point(cls, value: str) -> str:
        return str(OperatingPoint.parse(value))  # raises naming the forms

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
        file when it may start pretrained, or the file can be downloaded (`missing_weights`,
        fetched by the search before it reads any image): found now, not after the data is
        decoded."""
        for arch in self._possible("arch"):
            check_image_size(str(arch), self.data.image_size)
        if not can_download(self.weights_dir):
            for arch in self.missing_weights():
                weights_file(arch, self.weights_dir)  # raises, naming the file and the URL
        return self

    @model_validator(mode="after")
    def _folds_can_run(self) -> StudySpec:
        if self.folds == 1:
            raise ValueError("folds 1 is not cross-validation: give 2 or more, or 0 for one "
                             "train/val split")
        if self.folds and self.pruner == "pbt":
            raise ValueError("folds and pruner 'pbt' do not go together: PBT exploits one "
                             "trial's weights, and a cross-validated trial has one per fold")
        return self

    def missing_weights(self) -> list[str]:
        """The architectures the search may start pretrained whose weights file is not here."""
        if True not in self._possible("pretrained"):
            return []
        return [str(arch) for arch in self._possible("arch")
                if find_weights(str(arch), self.weights_dir) is None]

    @model_validator(mode="after")
    def _enqueued_configurations_fit(self, info: ValidationInfo) -> StudySpec:
        """An enqueued configuration sets searched hyperparameters to values they may take.

        The study file's configurations give way to the command line (context `narrowed`: the
        hyperparameters it set): one that sets such a hyperparameter to a value the new space
        cannot take is left out, and a value the command line fixed it to is dropped from it."""
        narrowed = (info.context or {}).get("narrowed", set())
        if narrowed:
            searched = {p.name for p in self.space.searched}
            kept = ({n: v for n, v in config.items() if n not in narrowed or n in searched}
                    for config in self.enqueue
                    if all(n in self.space and self.space.contains(n, v)
                           for n, v in config.items() if n in narrowed))
            self.enqueue = tuple(config for config in kept if config)
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
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({first_line(exc)})") from None
    except UnicodeDecodeError as exc:
        raise StudyError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise StudyError(f"{path}: cannot be read ({exc.strerror})") from None
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
    narrowed = {key.partition(".")[2] for key, value in (overrides or {}).items()
                if key.startswith("space.") and value is not None}
    if "enqueue" in (overrides or {}) and overrides["enqueue"] is not None:  # type: ignore[index]
        narrowed = set()  # the command line's own configurations: checked as they are
    try:
        return StudySpec.model_validate(raw, context={"narrowed": narrowed})
    except ValidationError as exc:
        raise StudyError(f"study {raw['name']!r}: {first_error(exc)}") from None
    except ConfigError as exc:  # raised by a validator that names its own field
        raise StudyError(f"study {raw['name']!r}: {exc}") from None


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


def objective_term(text: str) -> str:
    """ "val_f1:max", "flops" -> "NAME:DIRECTION", checked: a validation metric or a model cost
    (imgcls.metrics.MODEL_COSTS), with the direction given or implied."""
    name, _, direction = text.strip().partition(":")
    if name in MODEL_COSTS:
        implied = metric_goal(name)
    else:
        try:
            implied = metric_direction(name)
        except ConfigError:
            raise ValueError(
                f"objective {name!r} is neither a validation metric nor a model cost "
                f"({', '.join(MODEL_COSTS)})"
            ) from None
    if direction and direction not in ("max", "min"):
        raise ValueError(f"objective {text!r}: the direction is max or min, not {direction!r}")
    if direction and name not in MODEL_COSTS and direction != implied:
        raise ValueError(f"objective {text!r}: {name} is better when "
                         f"{'higher' if implied == 'max' else 'lower'} ({name}:{implied})")
    return f"{name}:{direction or implied}"

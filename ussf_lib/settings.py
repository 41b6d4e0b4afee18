"""Every run setting, declared once: name, type, default, allowed values, help, and whether ``--resume`` may change it.

Everything else is derived from :data:`SETTINGS`:

* the run configurations :class:`~ussf_lib.training.experiment.CVConfig` (all settings, ``config.json``) and
  :class:`~ussf_lib.training.loop.TrainConfig` (the ``scope="train"`` ones), built by :func:`config_class`;
* the flags of ``ussf cv``, ``ussf compare``, ``ussf main-job`` and ``torchrun ... -m ussf_lib cv``
  (:func:`add_flags`), with the same names: ``image_size`` is ``--image-size`` and the notebook parameter
  ``IMAGE_SIZE``;
* the checks of values from Python, ``config.json``, notebook parameters and sweep grids (:func:`check_value`);
* the resume rule (:func:`resume_changes`).

Plain dataclasses are enough: a setting needs a type, a default, a range or a list of choices and a help line,
which a small table states more plainly than a validation library would. Introduced in
``notebooks/04_train_cross_validation.ipynb``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ussf_lib.errors import UserError, same_kind
from ussf_lib.paper import PAPER_PROTOCOL

#: Seeds are whole numbers NumPy accepts everywhere (scikit-learn's folds pass them to RandomState).
MAX_SEED = 2**32 - 1
ALL_RUNS = ("cv", "compare")


@dataclass(frozen=True)
class Setting:
    """One run setting. ``scope`` is ``"train"`` for what one fold's training reads, ``"run"`` for the rest.

    ``commands`` lists the sub-commands that take it as a flag (none: set in Python or config.json only);
    ``flag`` overrides the flag's name (``--weights`` for ``weights_path``); ``resume_free`` settings may change
    when a run is resumed, since they change where it runs or what it prints, never its results.
    """

    name: str
    default: Any
    help: str
    group: str
    scope: str = "run"
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    resume_free: bool = False
    path: bool = False
    commands: tuple[str, ...] = ALL_RUNS
    flag: str | None = None
    metavar: str | None = None
    kind: type | None = None  #: for settings whose default is None: the type of a value

    @property
    def option(self) -> str:
        """The command-line spelling: ``--image-size``, ``--weights``, ``--no-dedup-folds``."""
        if self.flag:
            return self.flag
        if self.default is True:
            return "--no-" + self.name.replace("_", "-")
        return "--" + self.name.replace("_", "-")

    @property
    def parameter(self) -> str:
        """The notebook parameter's name: ``IMAGE_SIZE``."""
        return self.name.upper()


_P = PAPER_PROTOCOL

SETTINGS: list[Setting] = [
    # --- data
    Setting("out", "runs/cv", "run folder to create", "output", path=True, commands=(), resume_free=True),
    Setting("data", None, "class-folder tree ROOT/<class>/<image>", "data", path=True, kind=str),
    Setting("manifest", None, "CSV with columns path,label (paths relative to the CSV's folder, or absolute)",
            "data", path=True, kind=str),
    Setting("group_col", None, "manifest column with a patient/group id; folds never split a group", "data",
            kind=str),
    Setting("classes", None, "class order, comma-separated (default: sorted names)", "data", kind=list),
    Setting("normalization", "paper", "paper (section 2.4) or imagenet", "data"),
    Setting("image_size", int(_P["image_size"]), "images are resized to this many pixels square", "data",
            minimum=1),
    Setting("cache_dir", None, "keep decoded images here (memory-mapped) for later runs on the same data", "data",
            path=True, resume_free=True, kind=str),
    Setting("skip_bad", False, "leave unreadable images out (listed in RUN/skipped.csv) instead of stopping", "data"),
    Setting("missing_groups", "refuse", "manifest rows whose --group-col is empty, NaN, None, NULL or NA: refuse "
            "them, or make each such image a group of its own", "data", choices=("refuse", "own")),
    # --- folds
    Setting("folds", int(_P["folds"]), "cross-validation folds, stratified by class and grouped by patient",
            "folds", minimum=2),
    Setting("splits", None, "reuse the folds of an earlier run's splits.csv", "folds", path=True, kind=str),
    Setting("dedup_folds", True, "let exact and near-duplicate images fall into different folds "
            "(default: kept together)", "folds"),
    Setting("dup_threshold", 4, "near-duplicate: perceptual-hash distance in bits at most this (as ussf audit)",
            "folds"),
    Setting("hash_size", 8, "perceptual hash of hash-size^2 bits", "folds", minimum=1),
    # --- model
    Setting("model", "us_sfnet", "registry name (ussf models lists them): us_sfnet, us_sfnet_tiny, densenet121, us_sfnet_nofft, ...",
            "model", commands=("cv",)),
    Setting("model_kwargs", {}, "keyword arguments for the model's constructor", "model", commands=()),
    Setting("weights_path", None, "local state-dict file to start from (nothing is downloaded)", "model",
            path=True, flag="--weights", metavar="FILE", kind=str),
    # --- training
    Setting("epochs", int(_P["epochs"]), "epochs per fold", "training", scope="train", minimum=1),
    Setting("batch_size", int(_P["batch_size"]), "training batch; under torchrun, split between the processes",
            "training", scope="train", minimum=1),
    Setting("lr", float(_P["lr"]), "Adam learning rate (the peak, with --lr-schedule or --warmup-epochs)", "training", scope="train", positive=True),
    Setting("betas", tuple(_P["betas"]), "Adam's betas", "training", scope="train", commands=()),
    Setting("weight_decay", float(_P["weight_decay"]), "Adam weight decay (the paper uses 1e-4)", "training",
            scope="train", minimum=0),
    Setting("seed", 0, "folds, weight initialisation and batch order", "training", scope="train", minimum=0,
            maximum=MAX_SEED),
    Setting("deterministic", False, "deterministic kernels (slower on GPU)", "training", scope="train"),
    # --- the recipe for small real data (opt-in; training.recipe)
    Setting("augment", "none", "batch augmentation on the training device: light (crop, flip, rotation, "
            "brightness/contrast) or ultrasound (light plus gain/gamma, speckle, blur; no vertical flip)", "recipe",
            scope="train", choices=("none", "light", "ultrasound")),
    Setting("lr_schedule", "constant", "learning-rate schedule over the epochs (the paper's is constant)", "recipe",
            scope="train", choices=("constant", "cosine")),
    Setting("warmup_epochs", 0, "linear learning-rate warm-up over this many epochs first", "recipe",
            scope="train", minimum=0, metavar="N"),
    Setting("imbalance", "none", "class imbalance: class-weighted cross-entropy (weights from the training fold), "
            "a class-balanced sampler, or the focal loss", "recipe", scope="train",
            choices=("none", "weighted_ce", "balanced_sampler", "focal")),
    Setting("focal_gamma", 2.0, "the focal loss's gamma (with --imbalance focal)", "recipe", scope="train",
            minimum=0),
    Setting("label_smoothing", 0.0, "cross-entropy label smoothing (0 = none)", "recipe", scope="train", minimum=0,
            maximum=0.99),
    # --- GPU and speed
    Setting("device", "auto", "auto (CUDA if present), cpu, cuda, cuda:1, ...", "gpu", resume_free=True),
    Setting("amp", "off", "mixed precision (FFT stays float32)", "gpu", scope="train",
            choices=("off", "bf16", "fp16")),
    Setting("channels_last", False, "channels-last memory format (faster on GPUs)", "gpu", scope="train"),
    Setting("compile", False, "torch.compile the model", "gpu", scope="train"),
    Setting("compile_backend", "inductor", "torch.compile backend (aot_eager only traces: fast checks on CPU)",
            "gpu", scope="train", commands=()),
    Setting("compile_scope", "model", "with --compile: the whole model (fastest steps) or each repeated block "
            "alone (compiles faster)", "gpu", scope="train", choices=("blocks", "model")),
    Setting("compile_mode", "default", "with --compile: torch.compile mode (max-autotune-no-cudagraphs also times "
            "kernel choices)", "gpu", scope="train", choices=("default", "max-autotune-no-cudagraphs")),
    # --- evaluation and checkpoints
    Setting("eval_every", 1, "evaluate on the test fold every N epochs and after the last", "evaluation",
            scope="train", minimum=1, metavar="N"),
    Setting("temperature_scaling", False, "hold out about 10 % of each training fold (by patient) to fit a softmax "
            "temperature; calibrated and raw ECE and Brier are reported side by side", "evaluation"),
    Setting("checkpoint_every", 1, "write the resumable checkpoint every N epochs and after the last",
            "checkpointing", scope="train", minimum=1, metavar="N", resume_free=True),
    Setting("progress", True, "no progress bars (default: bars only when stderr is a terminal)", "output",
            scope="train", resume_free=True),
]


def declared(scope: str | None = None) -> list[Setting]:
    """The settings of ``scope`` (``"train"``), or all of them."""
    return [s for s in SETTINGS if scope is None or s.scope == scope]


def get(name: str) -> Setting:
    for s in SETTINGS:
        if s.name == name:
            return s
    raise KeyError(name)


def names(scope: str | None = None) -> tuple[str, ...]:
    return tuple(s.name for s in declared(scope))


def path_settings() -> tuple[str, ...]:
    """Settings that are paths: stored absolute, so a run folder can be resumed or reported from any folder."""
    return tuple(s.name for s in SETTINGS if s.path)


def resume_free() -> frozenset[str]:
    """Settings that may differ when a run is resumed without changing its results."""
    return frozenset(s.name for s in SETTINGS if s.resume_free)


def absolute_path(path: str | os.PathLike) -> str:
    """``path`` made absolute against the current folder, ``~`` expanded, symbolic links kept as written."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


# ----------------------------------------------------------------------------------------------- checks


def _type_of(s: Setting) -> type | None:
    return s.kind if s.default is None else type(s.default)


def problem(s: Setting, value: Any) -> str | None:
    """What is wrong with ``value`` for ``s`` (``None`` when it is fine), phrased to follow its name."""
    if value is None and s.default is None:
        return None
    expected = s.default if s.default is not None else (s.kind() if s.kind else None)
    if expected is not None and not same_kind(value, expected):
        return f"should be of type {type(expected).__name__} (like {expected!r})"
    if s.choices is not None and value not in s.choices:
        return f"must be one of {', '.join(map(str, s.choices))}"
    if s.positive and not (value > 0 and math.isfinite(value)):
        return "must be a positive number, e.g. 1e-3"
    if s.minimum is not None and not value >= s.minimum:
        return "must be 0 or more" if s.minimum == 0 else f"must be at least {s.minimum:g}"
    if s.maximum is not None and value > s.maximum:
        return f"must be at most {s.maximum:g}"
    return None


def check_value(name: str, value: Any, label: str | None = None) -> None:
    """Raise :class:`UserError` ``"<label> <problem>"`` for a bad ``value`` of setting ``name``; ``label``
    defaults to the flag and value (``--epochs 0:``); notebooks pass ``EPOCHS=0``."""
    s = get(name)
    text = problem(s, value)
    if text:
        raise UserError(f"{label or f'{s.option} {value}:'} {text}")


def check_values(values: dict[str, Any], scope: str | None = None) -> None:
    """:func:`check_value` for every setting of ``scope`` in ``values``."""
    for s in declared(scope):
        if s.name in values:
            check_value(s.name, values[s.name], f"--{s.name.replace('_', '-')} {values[s.name]}:")


# ------------------------------------------------------------------------------------------ config class


def config_class(name: str, scope: str | None, base: type, doc: str) -> type:
    """A dataclass with one field per setting of ``scope``, defaults from :data:`SETTINGS`, methods from ``base``
    (which checks the values in ``__post_init__``)."""
    fields = []
    for s in declared(scope):
        default = s.default
        spec = (dataclasses.field(default_factory=lambda d=default: type(d)(d))
                if isinstance(default, (list, dict)) else dataclasses.field(default=default))
        fields.append((s.name, Any, spec))
    cls = dataclasses.make_dataclass(name, fields, bases=(base,))
    cls.__module__, cls.__doc__ = base.__module__, doc
    return cls


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``config.json``'s content: every setting ``cfg`` has, tuples as lists (JSON has no tuples)."""
    values = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else vars(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def resume_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ between a saved run and the one resuming it, those free to change left out.

    A setting missing from an older run's ``config.json`` had its default then; paths compare absolute."""
    defaults = config_to_dict(_Defaults())
    previous = {**defaults, **previous, **{k: absolute_path(previous[k]) for k in path_settings() if previous.get(k)}}
    current = {**defaults, **current}
    free = resume_free()
    return sorted(k for k in set(previous) | set(current) if k not in free and previous.get(k) != current.get(k))


class _Defaults:
    """Every setting at its default, as :func:`config_to_dict` reads a config."""

    def __init__(self) -> None:
        for s in SETTINGS:
            setattr(self, s.name, s.default)


# --------------------------------------------------------------------------------------------- the CLI


def positive_int(text: str) -> int:
    """argparse ``type`` for a count that is at least 1 (images, workers, bins) outside the run settings."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def flag_type(name: str) -> Callable[[str], Any]:
    """argparse ``type`` of setting ``name`` (for a command that takes it with another default or help)."""
    return _parser(get(name))


def _parser(s: Setting) -> Callable[[str], Any]:
    """argparse ``type`` for ``s``: the value parsed, then checked as :func:`problem` checks it."""
    import argparse

    kind = _type_of(s)

    def parse(text: str) -> Any:
        if kind is list:
            values = [t.strip() for t in text.split(",") if t.strip()]
            if not values:  # "" or "," would otherwise mean "the default", silently
                raise argparse.ArgumentTypeError(f"{text!r} names nothing; give comma-separated values, e.g. a,b")
            return values
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if kind in (int, float) and s.choices is None:
            bad = problem(s, value)
            if bad:
                raise argparse.ArgumentTypeError(f"{text} {bad}")
        return value

    return parse


def add_flags(parser: Any, command: str, defaults: dict[str, Any] | None = None,
              only: Iterable[str] | None = None) -> None:
    """Add the flag of every setting ``command`` takes (or of the settings named in ``only``), in declaration
    order; ``defaults`` overrides a default (``make run``'s smaller job). ``--data`` and ``--manifest`` exclude
    each other."""
    chosen = [s for s in SETTINGS if (s.name in only if only is not None else command in s.commands)]
    source = None
    for s in chosen:
        default = (defaults or {}).get(s.name, s.default)
        text = s.help.replace("%", "%%")  # argparse expands %-formats in help text
        target = parser
        if s.name in ("data", "manifest"):
            source = source or parser.add_mutually_exclusive_group()
            target = source
        if isinstance(s.default, bool):
            action = "store_false" if s.default else "store_true"
            target.add_argument(s.option, dest=s.name, action=action, default=default, help=text)
        else:
            target.add_argument(s.option, dest=s.name, type=_parser(s), default=default, help=text,
                                choices=s.choices, metavar=s.metavar)


def values_from_flags(args: Any, command: str) -> dict[str, Any]:
    """The settings ``command``'s flags set, read from parsed ``args``."""
    return {s.name: getattr(args, s.name) for s in SETTINGS if command in s.commands}

"""The ``ussf`` command line (also ``python -m ussf_lib``): a thin caller of the library.

Every sub-command maps flags one-to-one onto a library function. A :class:`~ussf_lib.errors.UserError`
becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from ussf_lib.errors import UserError
from ussf_lib.paper import PAPER_CLASSES, PAPER_PROTOCOL

if TYPE_CHECKING:
    from ussf_lib.training.experiment import CVConfig

EXIT_USER_ERROR = 2
#: A shell's status for a process stopped by SIGPIPE (128 + 13): what `ussf ... | head` ends with.
EXIT_BROKEN_PIPE = 141

#: The CPU-sized main job of `make run`: under 10 minutes on 2 cores (docs/performance.md gives the measured time).
MAIN_JOB = {"model": "us_sfnet_tiny", "n_per_class": 100, "image_size": 64, "epochs": 8, "folds": 5, "batch_size": 32}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after a flag's help, except for on/off switches and flags without a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad flag or value in one line (exit code 2) instead of the whole usage block;
    ``--help`` shows each setting's default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _seed(text: str) -> int:
    from ussf_lib.training.loop import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and {MAX_SEED}")
    return value


def _csv_list(text: str) -> list[str]:
    values = [t.strip() for t in text.split(",") if t.strip()]
    if not values:  # "" or "," would otherwise mean "the default", silently
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give comma-separated values, e.g. a,b")
    return values


#: Options and arguments that name a file or folder. An empty value would be read as the current folder.
PATH_ARGUMENTS: tuple[str, ...] = ("data", "manifest", "out", "cache_dir", "splits", "weights", "json", "checkpoint",
                                   "resume", "notebook", "grid", "run", "data_dir", "inputs")
#: How the positional ones among them read in ``--help``.
_POSITIONAL_NAMES = {"run": "RUN", "data_dir": "DATA_DIR", "inputs": "IMAGE_OR_DIR"}


def _empty_path_argument(args: argparse.Namespace) -> str | None:
    """The first path option given as an empty string (``--out ""``), as typed on the command line."""
    for dest in PATH_ARGUMENTS:
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and not value.strip():
                return _POSITIONAL_NAMES.get(dest) or "--" + dest.replace("_", "-")
    return None


def default_run_dir(name: str) -> str:
    return str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}_{name}")


def add_data_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="class-folder tree ROOT/<class>/<image>")
    src.add_argument("--manifest", help="CSV with columns path,label (paths relative to the CSV's folder, or absolute)")
    p.add_argument("--group-col", help="manifest column with a patient/group id; folds never split a group")
    p.add_argument("--classes", type=_csv_list, help="class order, comma-separated (default: sorted names)")


#: ussf_lib.models.compiling.COMPILE_SCOPES / COMPILE_MODES, spelled out so that --help does not import torch.
_COMPILE_SCOPES = ("blocks", "model")
_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-scope", choices=_COMPILE_SCOPES, default="model",
                   help="with --compile: the whole model (fastest steps) or each repeated block alone (compiles faster)")
    p.add_argument("--compile-mode", choices=_COMPILE_MODES, default="default",
                   help="with --compile: torch.compile mode (max-autotune-no-cudagraphs also times kernel choices)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=_positive_int, default=PAPER_PROTOCOL["folds"],
                   help="cross-validation folds, stratified by class and grouped by patient")
    p.add_argument("--epochs", type=_positive_int, default=PAPER_PROTOCOL["epochs"], help="epochs per fold")
    p.add_argument("--image-size", type=_positive_int, default=PAPER_PROTOCOL["image_size"],
                   help="images are resized to this many pixels square")
    p.add_argument("--batch-size", type=_positive_int, default=PAPER_PROTOCOL["batch_size"],
                   help="training batch; under torchrun, split between the processes")
    p.add_argument("--lr", type=float, default=PAPER_PROTOCOL["lr"], help="Adam learning rate, constant")
    p.add_argument("--weight-decay", type=float, default=PAPER_PROTOCOL["weight_decay"],
                   help="Adam weight decay")
    p.add_argument("--seed", type=_seed, default=0, help="folds, weight initialisation and batch order")
    p.add_argument("--normalization", default="paper", help="paper (section 2.4) or imagenet")
    p.add_argument("--splits", help="reuse the folds of an earlier run's splits.csv")
    p.add_argument("--cache-dir", help="keep decoded images here (memory-mapped) for later runs on the same data")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (FFT stays float32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    _add_compile_options(p)
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    p.add_argument("--weights", dest="weights_path", metavar="FILE", help="local state-dict file to start from (nothing is downloaded)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: bars only when stderr is a terminal)")
    p.add_argument("--eval-every", type=_positive_int, default=1, metavar="N",
                   help="evaluate on the test fold every N epochs and after the last")
    p.add_argument("--checkpoint-every", type=_positive_int, default=1, metavar="N",
                   help="write the resumable checkpoint every N epochs and after the last")


def add_cv_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    p.add_argument("--model", default="us_sfnet", help="registry name: us_sfnet, us_sfnet_tiny, densenet121, ...")
    add_train_args(p)
    p.add_argument("--out", help="run folder to create (default runs/<time>_<model>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder with its own settings")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images out (listed in RUN/skipped.csv) instead of stopping")
    p.add_argument("--no-dedup-folds", dest="dedup_folds", action="store_false",
                   help="let exact and near-duplicate images fall into different folds (default: kept together)")
    p.add_argument("--dup-threshold", type=int, default=4,
                   help="near-duplicate: perceptual-hash distance in bits at most this (as ussf audit)")
    p.add_argument("--hash-size", type=_positive_int, default=8, help="perceptual hash of hash-size^2 bits")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="ussf", description="US-SFNet toolkit: phantom data, cross-validation, "
                                     "prediction and reports. See README.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the built-in synthetic lymph-node dataset")
    p.add_argument("--out", required=True, help="folder to create (class folders + manifest.csv)")
    p.add_argument("--n-per-class", type=_positive_int, default=250, help="images per class")
    p.add_argument("--image-size", type=_positive_int, default=224, help="pixels, square")
    p.add_argument("--seed", type=_seed, default=0, help="the same seed writes the same images")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("cv", help="k-fold cross-validation of one model into a run folder",
                       description="k-fold cross-validation of one model into a run folder. The defaults are the "
                       "paper's protocol (section 2.4): Adam, constant lr, 150 epochs, batch 64, 224 px, 5 folds.")
    add_cv_args(p)
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("compare", help="cross-validate several models on identical folds: Tables 1 and 2, paired tests")
    add_data_args(p)
    p.add_argument("--models", type=_csv_list, help="comma-separated registry names, e.g. us_sfnet,densenet121,resnet101 "
                   "(default with --tables-only: those of the comparison)")
    add_train_args(p)
    p.add_argument("--out", help="comparison folder: splits.csv, <model>/, table1/table2/paired .csv/.md "
                   "(default runs/<time>_compare); rerun to continue it")
    p.add_argument("--tables-only", action="store_true", help="rebuild the tables and chart of --out from its run folders")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of stopping")
    p.add_argument("--no-dedup-folds", dest="dedup_folds", action="store_false",
                   help="let exact and near-duplicate images fall into different folds (default: kept together)")
    p.add_argument("--dup-threshold", type=int, default=4, help="near-duplicate: phash distance in bits at most this")
    p.add_argument("--hash-size", type=_positive_int, default=8, help="perceptual hash of hash-size^2 bits")
    p.add_argument("--devices", help="run the models at once, one per entry, each in a process pinned to it: GPU ids "
                   "(--devices 0,1,2,3) or cpu slots (--devices cpu,cpu); default: one after the other here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="training/inference images/s, GMAC/s, FFT share, size scaling, pipeline speed")
    p.add_argument("--quick", action="store_true", help="CPU-sized preset: us_sfnet and densenet121, small batches")
    p.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision in the measured steps")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format in the measured steps")
    p.add_argument("--compile", action="store_true", help="torch.compile each timed model (compilation is not timed)")
    _add_compile_options(p)
    p.add_argument("--sizes", type=_csv_list, help="image sizes of the cost-growth sweep (default 64,128,224,448)")
    p.add_argument("--models", type=_csv_list, help="models in the throughput table (default us_sfnet,densenet121[,resnet101]); "
                   "the FFT share and the size sweep always measure US-SFNet")
    p.add_argument("--image-size", type=_positive_int, help="image size of the throughput table (default 224)")
    p.add_argument("--batch-size", type=_positive_int, help="training batch (default 64; --quick 8)")
    p.add_argument("--iters", type=_positive_int, help="timed steps per measurement (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; --quick 2)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("predict", help="class probabilities for images, from a fold checkpoint")
    p.add_argument("--checkpoint", required=True, help="RUN/folds/K/checkpoint.pt")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders read recursively")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="rebuild a run folder's tables and figures from its predictions")
    p.add_argument("run", metavar="RUN", help="a run folder written by ussf cv")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("audit", help="find exact and near-duplicate images, and duplicates under different labels")
    p.add_argument("data_dir", nargs="?", metavar="DATA_DIR", help="the same as --data DATA_DIR")
    p.add_argument("--data", help="class-folder tree ROOT/<class>/<image>")
    p.add_argument("--manifest", help="CSV with columns path,label (instead of --data)")
    p.add_argument("--classes", type=_csv_list, help="class order, comma-separated (default: sorted names)")
    p.add_argument("--out", help="write audit_clusters.csv and audit_summary.json here (default: print only)")
    p.add_argument("--hash-size", type=_positive_int, default=8, help="perceptual hash of hash-size^2 bits")
    p.add_argument("--dup-threshold", "--threshold", dest="threshold", type=int, default=4, metavar="BITS",
                   help="near-duplicate: hash distance in bits at most this (as ussf cv)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of stopping")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (default: a bar only when stderr is a terminal)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("main-job", help="`make run`: the notebooks on phantom data; 04 cross-validates a CPU-sized US-SFNet")
    p.add_argument("--out", default=None, help="folder to create (default runs/<time>_main)")
    p.add_argument("--model", default=MAIN_JOB["model"], help="registry name")
    p.add_argument("--n-per-class", type=_positive_int, default=MAIN_JOB["n_per_class"], help="phantom images per class")
    p.add_argument("--image-size", type=_positive_int, default=MAIN_JOB["image_size"], help="pixels, square")
    p.add_argument("--epochs", type=_positive_int, default=MAIN_JOB["epochs"], help="epochs per fold")
    p.add_argument("--folds", type=_positive_int, default=MAIN_JOB["folds"], help="cross-validation folds")
    p.add_argument("--seed", type=_seed, default=0, help="phantom, folds, weights and batch order")
    p.add_argument("--no-notebooks", dest="notebooks", action="store_false",
                   help="run the cross-validation directly instead of executing the numbered notebooks")
    p.add_argument("--only", type=_csv_list, help="notebooks to execute, e.g. 04,05 (default: all, in order)")
    p.set_defaults(func=cmd_main_job)

    p = sub.add_parser("notebooks", help="run the numbered notebooks headless (papermill) into a folder")
    p.add_argument("--out", required=True, help="folder for the executed notebooks (NN_name.ipynb) and their outputs")
    p.add_argument("--param", action="append", default=[], metavar="[NN:]KEY=VALUE",
                   help="notebook parameter, repeatable (e.g. EPOCHS=2); each notebook takes those it declares; "
                        "NN:KEY=VALUE sets it for notebook NN only (e.g. 04:FOLDS=5)")
    p.add_argument("--only", type=_csv_list, help="notebooks to run, e.g. 01,03 (default: all, in order)")
    p.set_defaults(func=cmd_notebooks)

    p = sub.add_parser("sweep", help="run one notebook over a grid of parameters and collect its metrics")
    p.add_argument("--notebook", required=True, help="e.g. notebooks/04_train_cross_validation.ipynb")
    p.add_argument("--grid", required=True, help="YAML: PARAM: [values, ...] per axis, optional fixed: {PARAM: value}")
    p.add_argument("--out", required=True, help="sweep folder: one sub-folder per run, results.csv, summary.md")
    p.add_argument("--jobs", type=_positive_int, default=None,
                   help="runs executed at once, in processes (default 1, or one per --devices entry)")
    p.add_argument("--devices", help="place the runs on devices, one run per entry at a time, each in a process "
                   "pinned to it (its notebook kernel sees only that GPU): GPU ids (--devices 0,1) or cpu slots "
                   "(--devices cpu,cpu)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("models", help="list the registered model names")
    p.set_defaults(func=cmd_models)
    return parser


def cmd_phantom(args: argparse.Namespace) -> int:
    from ussf_lib.data.phantom import generate_phantom

    manifest = generate_phantom(args.out, n_per_class=args.n_per_class, image_size=args.image_size, seed=args.seed,
                                progress=sys.stderr.isatty())
    print(f"phantom written to {Path(args.out).resolve()} (manifest {manifest})")
    return 0


#: CVConfig settings that `ussf cv` and `ussf compare` take from flags of the same name.
_CV_FLAG_SETTINGS = ("data", "manifest", "group_col", "classes", "weights_path", "folds", "image_size",
                     "normalization", "splits", "cache_dir", "device", "epochs", "batch_size", "lr", "weight_decay",
                     "seed", "amp", "channels_last", "compile", "compile_scope", "compile_mode", "deterministic",
                     "progress", "eval_every", "checkpoint_every", "skip_bad", "dedup_folds", "dup_threshold",
                     "hash_size")


def cv_config_from_args(args: argparse.Namespace, **settings: Any) -> CVConfig:
    """The :class:`CVConfig` the shared training flags describe, plus ``settings`` (out, model)."""
    from ussf_lib.training.experiment import CVConfig

    values = {name: getattr(args, name) for name in _CV_FLAG_SETTINGS}
    values["progress"] = show_progress(args)
    return CVConfig(**values, **settings)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--no-progress``, and only on a terminal: redirected to a log, a bar's
    carriage-return redraws would fill it with fragments."""
    return args.progress is not False and sys.stderr.isatty()


def cmd_cv(args: argparse.Namespace) -> int:
    from ussf_lib.training.experiment import absolute_path, load_config, run_cv

    if args.resume:
        cfg = load_config(args.resume)
        typed = _typed_settings(args)
        _refuse_changed_settings(args, cfg, typed)
        cfg.out, cfg.progress = absolute_path(args.resume), show_progress(args)
        for name in sorted(_resume_free_flags() & typed):  # where it runs, not what it computes: the new value wins
            value = getattr(args, name)
            setattr(cfg, name, absolute_path(value) if name == "cache_dir" else value)
        args.continue_hint = (Path(cfg.out) / "config.json", f"continue with: ussf cv --resume {cfg.out}")
        run_cv(cfg, resume=True)
        return 0
    if args.data is None and args.manifest is None:
        raise UserError("ussf cv needs --data DIR (class-folder tree) or --manifest CSV (or --resume RUN)")
    cfg = cv_config_from_args(args, out=args.out or default_run_dir(args.model), model=args.model)
    args.continue_hint = (Path(cfg.out) / "config.json", f"continue with: ussf cv --resume {cfg.out}")
    run_cv(cfg)
    return 0


def _resume_free_flags() -> set[str]:
    """Settings whose flags a resumed run may change (the run folder itself is ``--resume``'s, not ``--out``'s)."""
    from ussf_lib.training.experiment import RESUME_FREE_SETTINGS

    return set(RESUME_FREE_SETTINGS) - {"out"}


def _typed_settings(args: argparse.Namespace) -> set[str]:
    """The settings among the `ussf cv` flags that were given on the command line (not left at their defaults)."""
    # argparse leaves a setting that already has a value alone unless its flag is given.
    unset = object()
    names = (*_CV_FLAG_SETTINGS, "model", "out")
    typed = argparse.Namespace(**{name: unset for name in names})
    cv_flags = OneLineErrorParser(prog="ussf cv")
    add_cv_args(cv_flags)
    cv_flags.parse_known_args(list(args.argv)[1:], typed)
    return {name for name in names if getattr(typed, name) is not unset}


def _refuse_changed_settings(args: argparse.Namespace, saved: CVConfig, typed: set[str]) -> None:
    """``--resume RUN`` continues with RUN's own settings: a flag given with another value is refused, not ignored."""
    from ussf_lib.training.experiment import PATH_SETTINGS, absolute_path

    changed = []
    for name in sorted(typed - _resume_free_flags()):
        given = getattr(args, name)
        if name in PATH_SETTINGS:
            given = absolute_path(given)
        if name == "out" and given == absolute_path(args.resume):
            continue
        if given != getattr(saved, name):
            flag = "--weights" if name == "weights_path" else "--" + name.replace("_", "-")
            changed.append(f"{flag} {given} (the run has {getattr(saved, name)})")
    if changed:
        raise UserError(f"--resume {args.resume} continues with the run's own settings, but "
                        f"{'; '.join(changed)}; drop those flags, or start a new run with another --out")


def cmd_compare(args: argparse.Namespace) -> int:
    from ussf_lib.training.compare import compare, parse_models
    from ussf_lib.evaluation.tables import write_comparison

    if args.tables_only:
        if not args.out:
            raise UserError("--tables-only needs --out DIR, the comparison folder to rebuild")
        tables = write_comparison(args.out, parse_models(args.models) if args.models else None, log=print)
        print(f"tables rebuilt in {Path(args.out).resolve()} for {', '.join(tables['table1']['model'])}")
        return 0
    if args.data is None and args.manifest is None:
        raise UserError("ussf compare needs --data DIR (class-folder tree) or --manifest CSV")
    if not args.models:
        raise UserError("ussf compare needs --models, e.g. --models us_sfnet,densenet121,resnet101")
    cfg = cv_config_from_args(args, out=args.out or default_run_dir("compare"))
    args.continue_hint = (Path(cfg.out) / "splits.csv", "continue by running the same command with "
                          f"--out {cfg.out} (finished models are kept, the interrupted one resumes)")
    compare(args.models, cfg, cfg.out, devices=args.devices)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from ussf_lib.bench import bench_config_from, format_bench, run_bench

    sizes = None
    if args.sizes is not None:
        if not args.sizes or not all(s.isdigit() and int(s) > 0 for s in args.sizes):
            raise UserError(f"--sizes {','.join(args.sizes)}: give positive whole pixel sizes, e.g. --sizes 64,224")
        sizes = tuple(int(s) for s in args.sizes)
    cfg = bench_config_from(args.quick, device=args.device, amp=args.amp, channels_last=args.channels_last,
                            compile=args.compile or None, compile_scope=args.compile_scope,
                            compile_mode=args.compile_mode, scale_sizes=sizes,
                            models=tuple(args.models) if args.models else None, image_size=args.image_size,
                            batch_size=args.batch_size, iters=args.iters, warmup=args.warmup)
    if args.json:
        if Path(args.json).is_dir():
            raise UserError(f"--json {args.json}: is a folder; give a file name, e.g. {Path(args.json) / 'bench.json'}")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        _check_writable(Path(args.json))  # before minutes of measuring, not after
    result = run_bench(cfg, log=lambda line: print(line, file=sys.stderr))
    print(format_bench(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"figures written to {Path(args.json).resolve()}")
    return 0


def _check_writable(path: Path) -> None:
    """Open ``path`` for appending (an OSError naming it if that is refused), leaving no new file behind."""
    existed = path.exists()
    with path.open("a"):
        pass
    if not existed:
        path.unlink()


def cmd_predict(args: argparse.Namespace) -> int:
    from ussf_lib.predict import predict_images

    frame = predict_images(args.checkpoint, args.inputs, device=args.device, batch_size=args.batch_size)
    frame.to_csv(sys.stdout, index=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ussf_lib.evaluation.report import write_report

    summary = write_report(args.run)
    print(f"report rebuilt in {Path(args.run).resolve()}: accuracy {summary['accuracy']['mean']:.3f}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from ussf_lib.data.audit import audit_index, check_hash_settings, write_audit
    from ussf_lib.data.index import load_index

    check_hash_settings(args.hash_size, args.threshold, "--dup-threshold")
    if args.data and args.data_dir and args.data != args.data_dir:
        raise UserError(f"ussf audit got two data folders, {args.data_dir} and --data {args.data}; give one")
    data = args.data or args.data_dir
    if data is None and args.manifest is None:
        raise UserError("ussf audit needs --data DIR (class-folder tree) or --manifest CSV")
    if data is not None and args.manifest is not None:
        raise UserError("ussf audit got --data and --manifest; give one of them")
    index = load_index(data, args.manifest, classes=args.classes)
    if args.out:
        index.check_outside(args.out, "--out")  # before the slow part
    result = audit_index(index, args.hash_size, args.threshold, progress=show_progress(args), skip_bad=args.skip_bad)
    print(result.describe())
    if args.out:
        written = write_audit(result, args.out)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_main_job(args: argparse.Namespace) -> int:
    """`make run`: the numbered notebooks in order (04 trains the main job's cross-validation, 05 evaluates it),
    or with ``--no-notebooks`` the same cross-validation through :func:`run_cv` directly."""
    from ussf_lib.nbrun.runner import NotebookError, notebook_paths, run_notebooks
    from ussf_lib.nbrun.helpers import RUN_SUBDIR, notebooks_dir

    out = Path(args.out or default_run_dir("main"))
    settings = {"MODEL": args.model, "N_PER_CLASS": args.n_per_class, "IMAGE_SIZE": args.image_size,
                "EPOCHS": args.epochs, "FOLDS": args.folds, "BATCH_SIZE": MAIN_JOB["batch_size"], "SEED": args.seed}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new --out")
    if not args.notebooks or not notebooks_dir().is_dir():
        run_dir = _main_job_cv(out, settings)
    else:
        train_nb = "04_train_cross_validation"
        chosen = notebook_paths(args.only)
        scoped = {f"{train_nb}:{k}": v for k, v in settings.items()} if any(p.stem == train_nb for p in chosen) else {}
        try:
            run_notebooks(out, parameters=scoped, notebooks=chosen)
        except NotebookError as exc:
            print(f"ussf main-job: {exc}", file=sys.stderr)
            return 1
        print(f"executed notebooks and their figures in {out.resolve()}")
        run_dir = out / train_nb / RUN_SUBDIR
    for name in ("results.md", "per_class.csv", "confusion_matrix.png", "learning_curves.png"):
        print(f"  {run_dir / name}")
    return 0


def _main_job_cv(out: Path, settings: dict) -> Path:
    """OUT/phantom (the data, generated unless there) and OUT/run (the run folder): everything stays in OUT."""
    from ussf_lib.training.experiment import CVConfig, run_cv
    from ussf_lib.models.registry import check_image_size
    from ussf_lib.nbrun.helpers import RUN_SUBDIR, phantom_manifest
    from ussf_lib.data.phantom import min_images_per_class, patients_per_class

    n, size, seed = settings["N_PER_CLASS"], settings["IMAGE_SIZE"], settings["SEED"]
    # Checked before the phantom is written: folds never split a patient.
    check_image_size(settings["MODEL"], size)
    n_patients, folds = patients_per_class(n), settings["FOLDS"]
    if folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if n_patients < folds:
        raise UserError(f"--n-per-class {n} makes {n_patients} synthetic patient(s) per class, fewer than --folds "
                        f"{folds} (folds never split a patient); use --n-per-class {min_images_per_class(folds)} "
                        "or more")
    manifest = out / "phantom" / "manifest.csv"
    cfg = CVConfig(out=str(out / RUN_SUBDIR), manifest=str(manifest), group_col="patient", classes=list(PAPER_CLASSES),
                   model=settings["MODEL"], folds=settings["FOLDS"], epochs=settings["EPOCHS"], image_size=size,
                   batch_size=settings["BATCH_SIZE"], seed=seed, progress=sys.stderr.isatty())
    phantom_manifest(out / "phantom", n, size, seed)
    return run_cv(cfg)


def cmd_notebooks(args: argparse.Namespace) -> int:
    from ussf_lib.nbrun.runner import NotebookError, parse_assignments, run_notebooks

    try:
        done = run_notebooks(args.out, parameters=parse_assignments(args.param), notebooks=args.only)
    except NotebookError as exc:
        print(f"ussf notebooks: {exc}", file=sys.stderr)
        return 1
    print(f"{len(done)} notebook(s) executed into {Path(args.out).resolve()}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from ussf_lib.nbrun.sweep import run_sweep

    result = run_sweep(args.notebook, args.grid, args.out, jobs=args.jobs, devices=args.devices)
    return 1 if result.failed else 0


def cmd_models(args: argparse.Namespace) -> int:
    from ussf_lib.models import list_models

    print("\n".join(list_models()))
    return 0


def _one_line_warnings(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints ``ussf CMD: warning: message`` as one line on stderr, each text once.

    Python's own once-per-place filter forgets what it showed whenever code enters ``warnings.catch_warnings``
    (loading weights does, once per fold), so repeats are dropped here by their text.
    """
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        kind = "" if issubclass(category, UserWarning) else f"{category.__name__}: "
        text = f"ussf {command}: warning: {kind}{' '.join(str(message).split())}"
        if text not in shown:
            shown.add(text)
            print(text, file=file or sys.stderr)

    return show


def _stdout_is_broken() -> bool:
    """Whether stdout's reader has gone (poll reports an error on it, or a hang-up on a socket), without writing."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # replaced by an object without a descriptor (a notebook, a test)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named after the sub-command it was given to, not after `ussf`
        print(f"ussf {args.command}: error: unrecognized arguments: {' '.join(unknown)}; see ussf {args.command} --help",
              file=sys.stderr)
        return EXIT_USER_ERROR
    empty = _empty_path_argument(args)
    if empty:
        print(f"ussf {args.command}: error: {empty} is empty; give a file or folder name (use . for this folder); "
              f"see ussf {args.command} --help", file=sys.stderr)
        return EXIT_USER_ERROR
    func: Callable[[argparse.Namespace], int] = args.func
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what was typed, for `cv --resume`
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warnings(args.command)
            return func(args)
    except UserError as exc:
        print(f"ussf {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader of stdout went away (`ussf models | head -1`): stop quietly, as shell tools do, and keep
        # Python from complaining again when it flushes stdout at exit. Any other pipe (a worker's) is a failure.
        if not _stdout_is_broken():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # A path the user chose cannot be read or written (permissions, a file where a folder must be, a full
        # disk): that is bad input, not a bug, so it gets the one-line treatment. Without a file name it is not.
        if exc.filename is None:
            raise
        print(f"ussf {args.command}: error: {exc.filename}: {exc.strerror or exc}; check that the path is right and "
              "that you may read and write there", file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as exc:
        torch_oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)  # GPU memory; a RuntimeError
        if not isinstance(exc, MemoryError) and not (torch_oom and isinstance(exc, torch_oom)):
            raise
        detail = " ".join(str(exc).split()[:12]) or "out of memory"
        print(f"ussf {args.command}: error: not enough memory ({detail}); use a smaller --image-size or "
              "--batch-size", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # A run folder that got far enough to be continued says how; (marker file, hint) set by the command.
        marker, hint = getattr(args, "continue_hint", (None, ""))
        resumable = marker is not None and marker.is_file()
        print(f"ussf {args.command}: interrupted" + (f"; {hint}" if resumable else ""), file=sys.stderr)
        return 130

"""The ``ussf`` command line (also ``python -m ussf_lib``): a thin caller of the library.

Every sub-command maps flags one-to-one onto a library function. A :class:`~ussf_lib.errors.UserError`
becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from ussf_lib import settings
from ussf_lib.errors import UserError
from ussf_lib.explain import add_explain_parser
from ussf_lib.settings import absolute_path
from ussf_lib.paper import PAPER_CLASSES

if TYPE_CHECKING:
    from ussf_lib.training.experiment import CVConfig

EXIT_USER_ERROR = 2
#: A shell's status for a process stopped by SIGPIPE (128 + 13): what `ussf ... | head` ends with.
EXIT_BROKEN_PIPE = 141

#: The CPU-sized main job of `make run`: under 10 minutes on 2 cores (docs/performance.md gives the measured time).
MAIN_JOB = {"model": "us_sfnet_tiny", "n_per_class": 100, "image_size": 64, "epochs": 8, "folds": 5, "batch_size": 32}
#: The run settings `ussf main-job` takes as flags (with MAIN_JOB's defaults).
MAIN_JOB_SETTINGS = ("model", "image_size", "epochs", "folds", "seed")


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


def add_run_flags(p: argparse.ArgumentParser, command: str) -> None:
    """The run settings' flags (:func:`ussf_lib.settings.add_flags`): ``ussf cv`` and ``ussf compare`` share them."""
    settings.add_flags(p, command)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="ussf", description="US-SFNet toolkit: phantom data, cross-validation, "
                                     "prediction and reports. See README.md.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_phantom_parser(sub)
    _add_cv_parser(sub)
    _add_compare_parser(sub)
    _add_bench_parser(sub)
    _add_predict_parser(sub)
    _add_report_parser(sub)
    _add_audit_parser(sub)
    _add_main_job_parser(sub)
    _add_notebooks_parser(sub)
    _add_sweep_parser(sub)
    _add_models_parser(sub)
    add_explain_parser(sub)
    return parser


def _add_phantom_parser(sub: Any) -> None:
    p = sub.add_parser("phantom", help="write the built-in synthetic lymph-node dataset")
    p.add_argument("--out", required=True, help="folder to create (class folders + manifest.csv)")
    p.add_argument("--n-per-class", type=_positive_int, default=250, help="images per class")
    p.add_argument("--image-size", type=_positive_int, default=224, help="pixels, square")
    p.add_argument("--seed", type=settings.flag_type("seed"), default=0, help="the same seed writes the same images")
    p.add_argument("--class-ratio", help="unbalanced classes: 'paper' (the paper's class proportions) or weights in "
                   "class order, e.g. 5.7,1,1,1; the largest class gets --n-per-class images (default: balanced)")
    p.set_defaults(func=cmd_phantom)


def _add_cv_parser(sub: Any) -> None:
    p = sub.add_parser("cv", help="k-fold cross-validation of one model into a run folder",
                       description="k-fold cross-validation of one model into a run folder. The defaults are the "
                       "paper's protocol (section 2.4): Adam, constant lr, 150 epochs, batch 64, 224 px, 5 folds.")
    add_cv_parser_flags(p)
    p.set_defaults(func=cmd_cv)


def _add_compare_parser(sub: Any) -> None:
    p = sub.add_parser("compare", help="cross-validate several models on identical folds: Tables 1 and 2, paired tests")
    p.add_argument("--models", type=_csv_list, help="comma-separated registry names, e.g. us_sfnet,densenet121,resnet101 "
                   "(default with --tables-only: those of the comparison)")
    add_run_flags(p, "compare")
    p.add_argument("--out", help="comparison folder: splits.csv, <model>/, table1/table2/paired .csv/.md "
                   "(default runs/<time>_compare); rerun to continue it")
    p.add_argument("--tables-only", action="store_true", help="rebuild the tables and chart of --out from its run folders")
    p.add_argument("--devices", help="run the models at once, one per entry, each in a process pinned to it: GPU ids "
                   "(--devices 0,1,2,3) or cpu slots (--devices cpu,cpu); default: one after the other here")
    p.set_defaults(func=cmd_compare)


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="training/inference images/s, GMAC/s, FFT share, size scaling, pipeline speed")
    p.add_argument("--quick", action="store_true", help="CPU-sized preset: us_sfnet and densenet121, small batches")
    p.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")
    settings.add_flags(p, "bench", only=("device", "amp", "channels_last", "compile", "compile_scope", "compile_mode"))
    p.add_argument("--sizes", type=_csv_list, help="image sizes of the cost-growth sweep (default 64,128,224,448)")
    p.add_argument("--models", type=_csv_list, help="models in the throughput table (default us_sfnet,densenet121[,resnet101]); "
                   "the FFT share and the size sweep always measure US-SFNet")
    p.add_argument("--image-size", type=_positive_int, help="image size of the throughput table (default 224)")
    p.add_argument("--batch-size", type=_positive_int, help="training batch (default 64; --quick 8)")
    p.add_argument("--iters", type=_positive_int, help="timed steps per measurement (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; --quick 2)")
    p.set_defaults(func=cmd_bench)


def _add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="class probabilities for images, from a fold checkpoint")
    p.add_argument("--checkpoint", required=True, help="RUN/folds/K/checkpoint.pt")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders read recursively")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    p.set_defaults(func=cmd_predict)


def _add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="rebuild a run folder's tables and figures from its predictions")
    p.add_argument("run", metavar="RUN", help="a run folder written by ussf cv")
    p.set_defaults(func=cmd_report)


def _add_audit_parser(sub: Any) -> None:
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


def _add_main_job_parser(sub: Any) -> None:
    p = sub.add_parser("main-job", help="`make run`: the notebooks on phantom data; 04 cross-validates a CPU-sized US-SFNet")
    p.add_argument("--out", default=None, help="folder to create (default runs/<time>_main)")
    settings.add_flags(p, "main-job", defaults=MAIN_JOB, only=MAIN_JOB_SETTINGS)
    p.add_argument("--n-per-class", type=_positive_int, default=MAIN_JOB["n_per_class"], help="phantom images per class")
    p.add_argument("--no-notebooks", dest="notebooks", action="store_false",
                   help="run the cross-validation directly instead of executing the numbered notebooks")
    p.add_argument("--only", type=_csv_list, help="notebooks to execute, e.g. 04,05 (default: all, in order)")
    p.set_defaults(func=cmd_main_job)


def _add_notebooks_parser(sub: Any) -> None:
    p = sub.add_parser("notebooks", help="run the numbered notebooks headless (papermill) into a folder")
    p.add_argument("--out", required=True, help="folder for the executed notebooks (NN_name.ipynb) and their outputs")
    p.add_argument("--param", action="append", default=[], metavar="[NN:]KEY=VALUE",
                   help="notebook parameter, repeatable (e.g. EPOCHS=2); each notebook takes those it declares; "
                        "NN:KEY=VALUE sets it for notebook NN only (e.g. 04:FOLDS=5)")
    p.add_argument("--only", type=_csv_list, help="notebooks to run, e.g. 01,03 (default: all, in order)")
    p.add_argument("--timeout", type=_positive_int, default=600, metavar="SECONDS",
                   help="a cell running longer than this stops its notebook")
    p.set_defaults(func=cmd_notebooks)


def _add_sweep_parser(sub: Any) -> None:
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


def _add_models_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list the registered model names")
    p.set_defaults(func=cmd_models)

def cmd_phantom(args: argparse.Namespace) -> int:
    from ussf_lib.data.phantom import generate_phantom

    manifest = generate_phantom(args.out, n_per_class=args.n_per_class, image_size=args.image_size, seed=args.seed,
                                class_ratio=args.class_ratio, progress=sys.stderr.isatty())
    print(f"phantom written to {Path(args.out).resolve()} (manifest {manifest})")
    return 0


def add_cv_parser_flags(p: argparse.ArgumentParser) -> None:
    """``ussf cv``'s flags: the run settings, the run folder and ``--resume``."""
    add_run_flags(p, "cv")
    p.add_argument("--out", help="run folder to create (default runs/<time>_<model>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder with its own settings")


def cv_config_from_args(args: argparse.Namespace, **values: Any) -> CVConfig:
    """The :class:`CVConfig` the run flags describe, plus ``values`` (out, model)."""
    from ussf_lib.training.experiment import CVConfig

    flags = settings.values_from_flags(args, args.command if args.command in ("cv", "compare") else "cv")
    return CVConfig(**{**flags, "progress": show_progress(args), **values})


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--no-progress``, and only on a terminal: redirected to a log, a bar's
    carriage-return redraws would fill it with fragments."""
    return args.progress is not False and sys.stderr.isatty()


def cmd_cv(args: argparse.Namespace) -> int:
    from ussf_lib.training.experiment import run_cv

    if args.resume:
        cfg = _resumed_config(args)
        args.continue_hint = (Path(cfg.out) / "config.json", f"continue with: ussf cv --resume {cfg.out}")
        run_cv(cfg, resume=True)
        return 0
    if args.data is None and args.manifest is None:
        raise UserError("ussf cv needs --data DIR (class-folder tree) or --manifest CSV (or --resume RUN)")
    cfg = cv_config_from_args(args, out=args.out or default_run_dir(args.model), model=args.model)
    args.continue_hint = (Path(cfg.out) / "config.json", f"continue with: ussf cv --resume {cfg.out}")
    run_cv(cfg)
    return 0


def _typed_settings(args: argparse.Namespace) -> set[str]:
    """The settings among the `ussf cv` flags that were given on the command line (not left at their defaults)."""
    # argparse leaves a setting that already has a value alone unless its flag is given.
    unset = object()
    names = (*settings.names(), "out")
    typed = argparse.Namespace(**{name: unset for name in names})
    cv_flags = OneLineErrorParser(prog="ussf cv")
    add_cv_parser_flags(cv_flags)
    cv_flags.parse_known_args(list(args.argv)[1:], typed)
    return {name for name in names if getattr(typed, name) is not unset}


def _resumed_config(args: argparse.Namespace) -> CVConfig:
    """``--resume RUN`` continues with RUN's own settings: a flag given with another value is refused, not
    ignored; the settings free to change on resume (where it runs, what it prints) take the new value."""
    from ussf_lib.training.experiment import load_config

    saved = load_config(args.resume)
    run = absolute_path(args.resume)
    typed = _typed_settings(args)
    given = {name: absolute_path(getattr(args, name)) if name in settings.path_settings() else getattr(args, name)
             for name in typed}
    changed = settings.resume_changes(saved.to_dict(), {**saved.to_dict(), **given})
    changed += ["out"] if given.get("out", run) != run else []
    if changed:
        detail = "; ".join(f"{'--out' if n == 'out' else settings.get(n).option} {given[n]} "
                           f"(the run has {run if n == 'out' else getattr(saved, n)})" for n in changed)
        raise UserError(f"--resume {args.resume} continues with the run's own settings, but {detail}; drop those "
                        "flags, or start a new run with another --out")
    free = {name: given[name] for name in typed & settings.resume_free() if name != "out"}
    return dataclasses.replace(saved, **free, out=run, progress=show_progress(args))


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
    job = {"MODEL": args.model, "N_PER_CLASS": args.n_per_class, "IMAGE_SIZE": args.image_size,
                "EPOCHS": args.epochs, "FOLDS": args.folds, "BATCH_SIZE": MAIN_JOB["batch_size"], "SEED": args.seed}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new --out")
    if not args.notebooks or not notebooks_dir().is_dir():
        run_dir = _main_job_cv(out, job)
    else:
        train_nb = "04_train_cross_validation"
        chosen = notebook_paths(args.only)
        scoped = {f"{train_nb}:{k}": v for k, v in job.items()} if any(p.stem == train_nb for p in chosen) else {}
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


def _main_job_cv(out: Path, job: dict) -> Path:
    """OUT/phantom (the data, generated unless there) and OUT/run (the run folder): everything stays in OUT."""
    from ussf_lib.training.experiment import CVConfig, run_cv
    from ussf_lib.models.registry import check_image_size
    from ussf_lib.nbrun.helpers import RUN_SUBDIR, phantom_manifest
    from ussf_lib.data.phantom import min_images_per_class, patients_per_class

    n, size, seed = job["N_PER_CLASS"], job["IMAGE_SIZE"], job["SEED"]
    # Checked before the phantom is written: folds never split a patient.
    check_image_size(job["MODEL"], size)
    n_patients, folds = patients_per_class(n), job["FOLDS"]
    if folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs at least 2 folds")
    if n_patients < folds:
        raise UserError(f"--n-per-class {n} makes {n_patients} synthetic patient(s) per class, fewer than --folds "
                        f"{folds} (folds never split a patient); use --n-per-class {min_images_per_class(folds)} "
                        "or more")
    manifest = out / "phantom" / "manifest.csv"
    cfg = CVConfig(out=str(out / RUN_SUBDIR), manifest=str(manifest), group_col="patient", classes=list(PAPER_CLASSES),
                   model=job["MODEL"], folds=job["FOLDS"], epochs=job["EPOCHS"], image_size=size,
                   batch_size=job["BATCH_SIZE"], seed=seed, progress=sys.stderr.isatty())
    phantom_manifest(out / "phantom", n, size, seed)
    return run_cv(cfg)


def cmd_notebooks(args: argparse.Namespace) -> int:
    from ussf_lib.nbrun.runner import NotebookError, parse_assignments, run_notebooks

    try:
        done = run_notebooks(args.out, parameters=parse_assignments(args.param), notebooks=args.only,
                             timeout=args.timeout)
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
        # The reader of stdout went away (`ussf models | head -1`): stop quietly as shell tools do (Python's own
        # recipe), and keep Python from complaining again when it flushes stdout at exit.
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

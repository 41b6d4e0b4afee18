"""The ``ussf`` command line (also ``python -m ussf_lib``): a thin caller of the library.

Every sub-command maps flags one-to-one onto a library function. A :class:`~ussf_lib.errors.UserError`
becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

from ussf_lib.errors import UserError
from ussf_lib.meta import PAPER_CLASSES, PAPER_PROTOCOL

EXIT_USER_ERROR = 2

#: The CPU-sized main job of `make run`: under 10 minutes on 2 cores (README "Main job" gives the measured time).
MAIN_JOB = {"model": "us_sfnet_tiny", "n_per_class": 100, "image_size": 64, "epochs": 8, "folds": 5, "batch_size": 32}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def default_run_dir(name: str) -> str:
    return str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}_{name}")


def add_data_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="class-folder tree ROOT/<class>/<image>")
    src.add_argument("--manifest", help="CSV with columns path,label (paths relative to the CSV's folder)")
    p.add_argument("--group-col", help="manifest column with a patient/group id; folds never split a group")
    p.add_argument("--classes", type=_csv_list, help="class order, comma-separated (default: sorted names)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=_positive_int, default=PAPER_PROTOCOL["folds"])
    p.add_argument("--epochs", type=_positive_int, default=PAPER_PROTOCOL["epochs"])
    p.add_argument("--image-size", type=_positive_int, default=PAPER_PROTOCOL["image_size"])
    p.add_argument("--batch-size", type=_positive_int, default=PAPER_PROTOCOL["batch_size"])
    p.add_argument("--lr", type=float, default=PAPER_PROTOCOL["lr"])
    p.add_argument("--weight-decay", type=float, default=PAPER_PROTOCOL["weight_decay"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--normalization", default="paper", help="paper (section 2.4) or imagenet")
    p.add_argument("--splits", help="reuse the folds of an earlier run's splits.csv")
    p.add_argument("--cache-dir", help="keep decoded images here (memory-mapped) for later runs on the same data")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (FFT stays float32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    p.add_argument("--weights", dest="weights_path", help="local state-dict file to start from (nothing is downloaded)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ussf", description="US-SFNet toolkit: phantom data, cross-validation, "
                                     "prediction and reports. See README.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the built-in synthetic lymph-node dataset")
    p.add_argument("--out", required=True, help="folder to create (class folders + manifest.csv)")
    p.add_argument("--n-per-class", type=_positive_int, default=250)
    p.add_argument("--image-size", type=_positive_int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("cv", help="k-fold cross-validation of one model into a run folder")
    add_data_args(p)
    p.add_argument("--model", default="us_sfnet", help="registry name: us_sfnet, us_sfnet_tiny, densenet121, ...")
    add_train_args(p)
    p.add_argument("--out", help="run folder to create (default runs/<time>_<model>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run folder with its own settings")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("predict", help="class probabilities for images, from a fold checkpoint")
    p.add_argument("--checkpoint", required=True, help="RUN/folds/K/checkpoint.pt")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="rebuild a run folder's tables and figures from its predictions")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("main-job", help="`make run`: phantom data + CPU-sized cross-validation of US-SFNet")
    p.add_argument("--out", default=None, help="run folder (default runs/<time>)")
    p.add_argument("--model", default=MAIN_JOB["model"])
    p.add_argument("--n-per-class", type=_positive_int, default=MAIN_JOB["n_per_class"])
    p.add_argument("--image-size", type=_positive_int, default=MAIN_JOB["image_size"])
    p.add_argument("--epochs", type=_positive_int, default=MAIN_JOB["epochs"])
    p.add_argument("--folds", type=_positive_int, default=MAIN_JOB["folds"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_main_job)

    p = sub.add_parser("models", help="list the registered model names")
    p.set_defaults(func=cmd_models)
    return parser


def cmd_phantom(args: argparse.Namespace) -> int:
    from ussf_lib.phantom import generate_phantom

    manifest = generate_phantom(args.out, n_per_class=args.n_per_class, image_size=args.image_size, seed=args.seed,
                                progress=True)
    print(f"phantom written to {Path(args.out).resolve()} (manifest {manifest})")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from ussf_lib.experiment import CVConfig, load_config, run_cv

    if args.resume:
        cfg = load_config(args.resume)
        cfg.out, cfg.progress = args.resume, args.progress
        if args.device != "auto":
            cfg.device = args.device
        run_cv(cfg, resume=True)
        return 0
    if args.data is None and args.manifest is None:
        raise UserError("ussf cv needs --data DIR (class-folder tree) or --manifest CSV (or --resume RUN)")
    cfg = CVConfig(out=args.out or default_run_dir(args.model), data=args.data, manifest=args.manifest,
                   group_col=args.group_col, classes=args.classes, model=args.model, weights_path=args.weights_path,
                   folds=args.folds, image_size=args.image_size, normalization=args.normalization,
                   splits=args.splits, cache_dir=args.cache_dir, device=args.device, epochs=args.epochs,
                   batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                   amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                   deterministic=args.deterministic, progress=args.progress)
    run_cv(cfg)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ussf_lib.predict import predict_images

    frame = predict_images(args.checkpoint, args.inputs, device=args.device, batch_size=args.batch_size)
    frame.to_csv(sys.stdout, index=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ussf_lib.report import write_report

    summary = write_report(args.run)
    print(f"report rebuilt in {Path(args.run).resolve()}: accuracy {summary['accuracy']['mean']:.3f}")
    return 0


def cmd_main_job(args: argparse.Namespace) -> int:
    from ussf_lib.experiment import CVConfig, run_cv
    from ussf_lib.phantom import generate_phantom

    out = Path(args.out or default_run_dir("main"))
    # The phantom is shared between main jobs with the same settings: it is deterministic by seed.
    phantom = Path("runs") / f"phantom_n{args.n_per_class}_s{args.image_size}_seed{args.seed}"
    manifest = phantom / "manifest.csv"
    if not manifest.is_file():
        manifest = generate_phantom(phantom, n_per_class=args.n_per_class, image_size=args.image_size,
                                    seed=args.seed, progress=True)
    cfg = CVConfig(out=str(out), manifest=str(manifest), group_col="patient", classes=list(PAPER_CLASSES),
                   model=args.model,
                   folds=args.folds, epochs=args.epochs, image_size=args.image_size,
                   batch_size=MAIN_JOB["batch_size"], seed=args.seed, progress=sys.stderr.isatty())
    run_cv(cfg)
    for name in ("results.md", "per_class.csv", "confusion_matrix.png", "learning_curves.png"):
        print(f"  {out / name}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ussf_lib.models import list_models

    print("\n".join(list_models()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return func(args)
    except UserError as exc:
        print(f"ussf {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"ussf {args.command}: interrupted", file=sys.stderr)
        return 130

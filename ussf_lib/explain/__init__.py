"""Explanations of a trained model: CAM overlays (:mod:`.gradcam`), the Conv-FFT frequency view
(:mod:`.frequency`) and their figures (:mod:`.figures`); the ``ussf explain`` command.

Importing this package is cheap (no torch, no grad-cam): the command line imports it to build its parser,
and the heavy modules load only when the command runs. docs/explain.md describes the command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

#: ``--method`` choices, in the order ``--help`` lists them (the same keys as ``gradcam.METHODS``).
METHOD_NAMES: tuple[str, ...] = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam")

_LAZY = {
    "explain_images": "gradcam", "target_layer": "gradcam", "compute_cams": "gradcam", "METHODS": "gradcam",
    "CamTarget": "gradcam", "prepare": "gradcam", "write_overlays": "gradcam",
    "analyse_blocks": "frequency", "write_frequency": "frequency",
    "explain_frequency": "frequency",
    "plot_cam_overlay": "figures", "plot_frequency_view": "figures",
}

__all__ = ["METHOD_NAMES", "add_explain_parser", "cmd_explain", *_LAZY]
from ussf_lib.settings import positive_int


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_explain_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``explain`` sub-command to ``sub`` (what ``parser.add_subparsers()`` returns); returns its parser."""
    p = sub.add_parser("explain", help="CAM overlays per image, and the Conv-FFT frequency view, from a checkpoint",
                       description="Class activation maps (Grad-CAM and relatives, from the grad-cam package) of a "
                       "fold checkpoint: one overlay PNG per image and explain.csv in --out. With --frequency and a "
                       "US-SFNet checkpoint, also each Conv-FFT block's branch energy shares and its frequency "
                       "branch's radial gain. See docs/explain.md.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT_OR_RUN",
                   help="RUN/folds/K/checkpoint.pt, or a run folder (its fold 0 checkpoint is used)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files, or folders read recursively")
    p.add_argument("--out", required=True, help="folder for overlays/, explain.csv and the frequency files")
    p.add_argument("--method", choices=METHOD_NAMES, default="gradcam", help="CAM method")
    p.add_argument("--target", default="pred", help="class the maps explain: pred (each image's predicted class) "
                   "or a class name of the checkpoint")
    p.add_argument("--frequency", action="store_true",
                   help="also write frequency_shares.csv, frequency_response.csv and frequency.png (US-SFNet only)")
    p.add_argument("--bins", type=positive_int, default=16, help="radial frequency bins over 0..0.5 cycles/pixel")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per CAM pass")
    p.set_defaults(func=cmd_explain)
    return p


def cmd_explain(args: argparse.Namespace) -> int:
    """Run ``ussf explain``: overlays and explain.csv, then with ``--frequency`` the frequency view."""
    from ussf_lib.explain.frequency import check_has_blocks, write_frequency
    from ussf_lib.explain.gradcam import check_method, prepare, resolve_target, write_overlays

    check_method(args.method)
    prep = prepare(args.checkpoint, args.inputs, args.out, args.device)  # a run folder: says which fold it uses
    resolve_target(args.target, prep.meta["classes"])  # refuse a wrong class or model before any work
    if args.frequency:
        check_has_blocks(prep.model, prep.meta, prep.checkpoint)
    frame = write_overlays(prep, args.method, args.target, args.batch_size)
    print(f"{len(frame)} {args.method} overlay(s) written to {prep.out / 'overlays'}; table: {prep.out / 'explain.csv'}")
    if args.frequency:
        shares, _ = write_frequency(prep, args.batch_size, args.bins)
        print(f"frequency view of {len(shares)} Conv-FFT blocks: {prep.out / 'frequency.png'} "
              "(frequency_shares.csv, frequency_response.csv)")
    sys.stdout.flush()
    return 0

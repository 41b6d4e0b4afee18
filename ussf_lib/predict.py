"""Load a fold checkpoint and classify images with it (``ussf predict``).

Checkpoints are read with ``weights_only=True``: they hold tensors and plain metadata only, so loading one
never executes code. No notebook loads a model (05 evaluates from ``predictions.csv`` alone); this is the
command line's way to use a trained fold (checkpoints are read and checked by :mod:`ussf_lib.training.checkpoints`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ussf_lib.data.index import read_image
from ussf_lib.errors import UserError
from ussf_lib.paper import IMAGE_EXTENSIONS
from ussf_lib.training.checkpoints import load_checkpoint
from ussf_lib.training.loop import evaluate
from ussf_lib.training.runtime import DeviceImages, select_device


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Image files given directly, plus every image inside given folders (recursively, hidden entries skipped;
    other files in them are left out with a warning that counts them, as ``ussf cv`` counts them)."""
    paths: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            files = [p for p in item.rglob("*") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(item).parts)]
            images = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
            if len(images) < len(files):
                other = next(p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS)
                warnings.warn(f"{item}: ignored {len(files) - len(images)} non-image file(s), e.g. {other.name} "
                              f"(images are {', '.join(sorted(IMAGE_EXTENSIONS))})", stacklevel=2)
            paths += images
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{item}: no such file or folder; pass image files or folders of images")
    if not paths:
        raise UserError(f"no images among {', '.join(map(str, items))}; pass image files or folders of images")
    return paths


def predict_images(checkpoint: str | Path, inputs: Sequence[str | Path], device: str = "auto",
                   batch_size: int = 64) -> pd.DataFrame:
    """Class probabilities per image: columns path, pred, prob_<class>..."""
    dev = select_device(device)
    model, meta = load_checkpoint(checkpoint, dev)
    paths = expand_inputs(inputs)
    images = np.stack([read_image(p, meta["image_size"]) for p in paths])
    _, probs = evaluate(model, DeviceImages(images, dev), np.zeros(len(paths), dtype=np.int64),
                        np.arange(len(paths)), batch_size, meta["mean"], meta["std"])
    classes = meta["classes"]
    frame = pd.DataFrame({"path": [str(p) for p in paths], "pred": [classes[i] for i in probs.argmax(1)]})
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, i].round(6)
    return frame

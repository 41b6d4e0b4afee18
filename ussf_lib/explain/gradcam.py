"""Class activation maps (Grad-CAM and relatives) for a fold checkpoint (``ussf explain``).

The CAM methods are those of the maintained ``grad-cam`` package (module ``pytorch_grad_cam``); this module
only chooses the layer each registered network is explained at (:func:`target_layer`), turns transformer tokens
into a ``(B, C, h, w)`` map for it, loads the checkpoint as ``ussf predict`` does, and writes one overlay PNG
per image plus ``explain.csv``. docs/explain.md describes the command and the choices.
"""

from __future__ import annotations

import contextlib
import math
import re
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ussf_lib.errors import UserError

#: ``--method`` names -> ``pytorch_grad_cam`` class names. Gradient-based ones need one backward pass per batch;
#: ``scorecam`` needs one forward pass per channel of the target layer (slow on large layers).
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}

#: Columns of ``explain.csv``.
EXPLAIN_COLUMNS: tuple[str, ...] = ("path", "pred", "prob", "target", "overlay")


class CamTarget(NamedTuple):
    """Where a CAM is taken: the layer's dotted name in the model, the module, and the function that turns its
    output into ``(B, C, h, w)`` (``None`` when it already is one)."""

    name: str
    layer: nn.Module
    reshape_transform: Callable[[Tensor], Tensor] | None


def nhwc_to_nchw(x: Tensor) -> Tensor:
    """torchvision's Swin keeps feature maps channels-last, ``(B, H, W, C)``; CAMs want ``(B, C, H, W)``."""
    if x.dim() != 4:
        raise ValueError(f"expected a (B, H, W, C) Swin feature map, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2)


def vit_tokens_to_map(x: Tensor) -> Tensor:
    """ViT tokens ``(B, 1 + h*w, D)`` -> ``(B, D, h, w)``: the class token is dropped and the patch tokens laid
    back on their square grid (the registry builds ViT for square images only)."""
    if x.dim() != 3:
        raise ValueError(f"expected ViT tokens (B, 1 + patches, D), got shape {tuple(x.shape)}")
    patches = x.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches or side == 0:
        raise ValueError(f"{patches} patch tokens do not form a square grid")
    return x[:, 1:, :].reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)


def target_layer(model: nn.Module, model_name: str) -> CamTarget:
    """The layer a CAM of ``model`` (built as registry name ``model_name``) is taken at.

    * US-SFNet (``us_sfnet``, ``us_sfnet_tiny``): the output of the last Conv-FFT stage (``stages.3``), the map
      the head pools; DropBlock after it is the identity at inference.
    * DenseNet: ``features.norm5``, the last feature map (the ReLU and pooling follow in ``forward``).
    * ResNet: ``layer4``, the last bottleneck stage.
    * ConvNeXt: ``features.7``, the last stage (before the head's LayerNorm2d and pooling).
    * Swin / Swin V2: ``norm``, the LayerNorm over the last stage's channels-last map (B, H, W, C), permuted
      to (B, C, H, W); the head only pools and classifies after it.
    * ViT: ``ln_1`` of the last encoder block. The final encoder output cannot serve: the head reads only the
      class token there, so every patch token's gradient is zero. The block's input norm still feeds the class
      token through attention; its patch tokens are laid back on the patch grid.
    """
    from ussf_lib.models.us_sfnet import USSFNet

    if isinstance(model, USSFNet):
        name = f"stages.{len(model.stages) - 1}"
        return CamTarget(name, model.get_submodule(name), None)
    family = re.match(r"[a-z]*", str(model_name)).group()  # densenet121 -> densenet, swin_v2_b -> swin
    plain = {"densenet": lambda: "features.norm5", "resnet": lambda: "layer4",
             "convnext": lambda: f"features.{len(model.get_submodule('features')) - 1}"}
    if family in plain:
        name = plain[family]()
        return CamTarget(name, model.get_submodule(name), None)
    if family == "swin":
        return CamTarget("norm", model.get_submodule("norm"), nhwc_to_nchw)
    if family == "vit":
        last = list(model.get_submodule("encoder.layers").named_children())[-1][0]
        name = f"encoder.layers.{last}.ln_1"
        return CamTarget(name, model.get_submodule(name), vit_tokens_to_map)
    raise UserError(f"no CAM target layer is known for model {model_name!r}; explain supports us_sfnet, densenet, "
                    "resnet, convnext, swin and vit models")


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a file; for a run folder, its fold 0 checkpoint (``RUN/folds/0/checkpoint.pt``),
    with a warning that says so. Anything else is left to :func:`ussf_lib.predict.read_checkpoint` to refuse."""
    path = Path(path)
    if path.is_dir():
        fold0 = path / "folds" / "0" / "checkpoint.pt"
        if fold0.is_file():
            warnings.warn(f"{path} is a run folder: explaining with its fold 0 checkpoint {fold0} "
                          "(pass RUN/folds/K/checkpoint.pt for another fold)", stacklevel=2)
            return fold0
    return path


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UserError(f"unknown CAM method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def resolve_target(target: str | None, classes: Sequence[str]) -> int | None:
    """``"pred"`` (or ``None``) -> ``None`` (each image's predicted class); a class name -> its index."""
    if target is None or target == "pred":
        return None
    if target in classes:
        return list(classes).index(target)
    raise UserError(f"--target {target!r} is not a class of this checkpoint; use pred or one of: {', '.join(classes)}")


def check_out_dir(out_dir: str | Path, inputs: Sequence[str | Path]) -> Path:
    """``out_dir`` resolved (the writers create it); refused when it is an input folder or inside one (the
    overlays would become inputs of the next run) or a file."""
    from ussf_lib.data.index import check_outside

    out = Path(out_dir).expanduser().resolve()
    for item in inputs:
        if Path(item).is_dir():
            check_outside(out, item, "--out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the overlays")
    return out


def load_images(paths: Sequence[Path], meta: dict[str, Any]) -> np.ndarray:
    """uint8 ``(N, S, S, 3)``: the images as the checkpoint's model sees them (resized as in training)."""
    from ussf_lib.data.index import read_image

    return np.stack([read_image(p, meta["image_size"]) for p in paths])


def to_model_input(images: np.ndarray, meta: dict[str, Any], device: torch.device) -> Tensor:
    """uint8 NHWC -> float32 NCHW, normalized with the checkpoint's mean and std, on ``device``."""
    from ussf_lib.data.index import normalize_batch

    return normalize_batch(torch.from_numpy(np.ascontiguousarray(images)).to(device), meta["mean"], meta["std"])


@contextlib.contextmanager
def _quiet_scorecam():
    """ScoreCAM draws a tqdm bar per image; silenced for the duration (only in ``pytorch_grad_cam.score_cam``)."""
    import pytorch_grad_cam.score_cam as score_cam

    saved = score_cam.tqdm
    score_cam.tqdm = types.SimpleNamespace(tqdm=lambda iterable, *args, **kwargs: iterable)
    try:
        yield
    finally:
        score_cam.tqdm = saved


def compute_cams(model: nn.Module, model_name: str, x: Tensor, method: str = "gradcam",
                 targets: Sequence[int] | None = None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """CAMs ``(N, H, W)`` in [0, 1] (each image scaled to its own maximum) and softmax probabilities ``(N, K)``.

    ``targets`` holds one class index per image (``None``: each image's predicted class). ``x`` is a normalized
    batch on the model's device.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    check_method(method)
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x[i:i + batch_size]).float(), dim=1)
                           for i in range(0, len(x), batch_size)]).cpu().numpy().astype(np.float64)
    chosen = probs.argmax(1) if targets is None else np.asarray(targets, dtype=np.int64)
    spot = target_layer(model, model_name)
    cam_class = getattr(pytorch_grad_cam, METHODS[method])
    cam = cam_class(model=model, target_layers=[spot.layer], reshape_transform=spot.reshape_transform)
    if method == "scorecam":
        cam.batch_size = batch_size
    maps = []
    try:  # not ``with cam``: BaseCAM.__exit__ prints and swallows IndexErrors
        with _quiet_scorecam() if method == "scorecam" else contextlib.nullcontext(), torch.enable_grad():
            for i in range(0, len(x), batch_size):
                batch_targets = [ClassifierOutputTarget(int(c)) for c in chosen[i:i + batch_size]]
                maps.append(cam(input_tensor=x[i:i + batch_size], targets=batch_targets))
        grid = tuple(cam.activations_and_grads.activations[0].shape[-2:]) if cam.activations_and_grads.activations else ()
        if grid == (1, 1):
            warnings.warn(f"{model_name}'s CAM layer {spot.name} is a 1x1 map at {x.shape[-1]} px: the maps carry no "
                          "spatial information (they come out blank); use larger images", stacklevel=2)
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps).astype(np.float32), probs


def _overlay_names(paths: Sequence[Path]) -> list[str]:
    """``<stem>.png`` per image, with ``-2``, ``-3``... added where two images share a stem."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = p.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.png")
    return names


@dataclass
class Prepared:
    """What both views of ``ussf explain`` start from: the model (eval mode, on ``device``) and its metadata, the
    checkpoint actually read, the images (uint8, as the model sees them) with their paths, and the output folder."""

    model: nn.Module
    meta: dict[str, Any]
    checkpoint: Path
    paths: list[Path]
    images: np.ndarray
    out: Path
    device: torch.device


def prepare(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
            device: str = "auto") -> Prepared:
    """Load the checkpoint (a run folder: its fold 0, with a warning), read the images at its size, and check
    ``out_dir`` (refused inside an input folder; created by the writers). Every mistake a user can make here is a :class:`UserError`."""
    from ussf_lib.predict import expand_inputs, load_checkpoint
    from ussf_lib.training.loop import select_device

    dev = select_device(device)
    path = resolve_checkpoint(checkpoint)
    model, meta = load_checkpoint(path, dev)
    paths = expand_inputs(inputs)
    out = check_out_dir(out_dir, inputs)
    return Prepared(model, meta, path, paths, load_images(paths, meta), out, dev)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} must be a positive whole number")


def _cams_by_batch(prep: Prepared, method: str, fixed: int | None, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`compute_cams` over ``prep``'s images, ``batch_size`` at a time (only one batch is ever on the device)."""
    cams, probs = [], []
    for i in range(0, len(prep.images), batch_size):
        x = to_model_input(prep.images[i:i + batch_size], prep.meta, prep.device)
        c, p = compute_cams(prep.model, prep.meta["model_name"], x, method,
                            None if fixed is None else [fixed] * len(x), batch_size)
        cams.append(c)
        probs.append(p)
    return np.concatenate(cams), np.concatenate(probs)


def write_overlays(prep: Prepared, method: str = "gradcam", target: str = "pred", batch_size: int = 16) -> pd.DataFrame:
    """The CAMs of ``prep``'s images: ``overlays/<image stem>.png`` and ``explain.csv`` in ``prep.out``; returns
    the table (see :func:`explain_images`)."""
    import matplotlib.pyplot as plt

    from ussf_lib.explain.figures import plot_cam_overlay

    check_method(method)
    _check_batch_size(batch_size)
    classes = list(prep.meta["classes"])
    fixed = resolve_target(target, classes)
    (prep.out / "overlays").mkdir(parents=True, exist_ok=True)
    rows = []
    for path, name, image, cam, p in zip(prep.paths, _overlay_names(prep.paths), prep.images,
                                         *_cams_by_batch(prep, method, fixed, batch_size)):
        pred = int(p.argmax())
        tgt = pred if fixed is None else fixed
        overlay = Path("overlays") / name
        fig = plot_cam_overlay(image, cam, title=f"{path.name}: predicted {classes[pred]} (p = {p[pred]:.2f})\n"
                               f"{method} map for class {classes[tgt]}"
                               + (f" (p = {p[tgt]:.2f})" if tgt != pred else ""), out=prep.out / overlay)
        plt.close(fig)
        rows.append({"path": str(path), "pred": classes[pred], "prob": round(float(p[pred]), 6),
                     "target": classes[tgt], "overlay": overlay.as_posix()})
    frame = pd.DataFrame(rows, columns=list(EXPLAIN_COLUMNS))
    frame.to_csv(prep.out / "explain.csv", index=False)
    return frame


def explain_images(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                   method: str = "gradcam", target: str = "pred", device: str = "auto",
                   batch_size: int = 16) -> pd.DataFrame:
    """CAM overlays for images, from a fold checkpoint (or a run folder: its fold 0 checkpoint, with a warning).

    Writes ``out_dir/overlays/<image stem>.png`` (the image as the model saw it, beside it the heat map over
    it; the title gives the predicted class, its probability and the class the map explains) and
    ``out_dir/explain.csv`` with columns path, pred, prob, target, overlay (relative to ``out_dir``). Returns
    that table. ``method`` is a key of :data:`METHODS`; ``target`` is ``"pred"`` (each image's predicted
    class) or a class name of the checkpoint.
    """
    check_method(method)
    _check_batch_size(batch_size)
    return write_overlays(prepare(checkpoint, inputs, out_dir, device), method, target, batch_size)

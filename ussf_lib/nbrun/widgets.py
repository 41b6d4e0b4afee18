"""The image predictor of ``notebooks/08_try_the_model.ipynb``: one image, one fold checkpoint, its class
probabilities and its Grad-CAM overlay, in ipywidgets.

:func:`predict_image` is the computation (no widgets): a checkpoint's probabilities for an image and the CAM of
its predicted class. :func:`build_predictor` wraps it in a small user interface and returns the box to display
and a ``predict(image_path)`` callable that draws into the box's output area. Nothing waits for input: the
notebook calls ``predict`` once with a default image, so a headless kernel (papermill, nbval) draws one
prediction and moves on, and JupyterLab redraws on every change of image or checkpoint and on "Predict".

What the browser test (``tests/test_browser.py``) looks for in the page: the box has the CSS class
``ussf-predictor``; each drawing holds a paragraph ``.ussf-prediction-text`` reading
``Prediction: <class> (p=0.xx)``, one bar per class (``.ussf-prob-bar``) and the overlay as
``<img class="ussf-overlay">``. An error (a wrong path, a file that is not an image) is drawn as
``.ussf-error`` text instead of raising.
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ussf_lib.errors import UserError

#: CSS class of the predictor's box, and of the parts the browser test finds.
BOX_CLASS = "ussf-predictor"


@dataclass
class Prediction:
    """What :func:`predict_image` found for one image: the probabilities over ``classes``, the image as the
    model saw it (uint8 ``(S, S, 3)``) and the CAM ``(S, S)`` of the predicted class, in [0, 1]."""

    path: Path
    checkpoint: Path
    classes: list[str]
    probs: np.ndarray
    image: np.ndarray
    cam: np.ndarray
    method: str = "gradcam"
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.classes[int(np.argmax(self.probs))]

    @property
    def probability(self) -> float:
        return float(np.max(self.probs))

    def text(self) -> str:
        """``Prediction: <class> (p=0.xx)``."""
        return f"Prediction: {self.label} (p={self.probability:.2f})"


_MODELS: dict[tuple[str, int, str], tuple[Any, dict]] = {}


def _model(checkpoint: Path, device: str) -> tuple[Any, dict]:
    """The checkpoint's model and metadata, loaded once per file version and device."""
    from ussf_lib.training.checkpoints import load_checkpoint
    from ussf_lib.training.runtime import select_device

    if not checkpoint.is_file():
        load_checkpoint(checkpoint)  # raises the UserError that says what is wrong with the path
    key = (str(checkpoint.resolve()), checkpoint.stat().st_mtime_ns, device)
    if key not in _MODELS:
        _MODELS.clear()  # one model at a time is plenty for a notebook
        _MODELS[key] = load_checkpoint(checkpoint, select_device(device))
    return _MODELS[key]


def checkpoint_of(path: str | Path) -> tuple[Path, list[str]]:
    """A checkpoint file as given, or a run folder's fold 0 checkpoint; with a note saying which was used (what the
    predictor's text field accepts)."""
    from ussf_lib.explain.gradcam import resolve_checkpoint as fold0

    text = str(path).strip()
    if not text:
        raise UserError("no checkpoint given; choose a fold, or type RUN/folds/K/checkpoint.pt or a run folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = fold0(Path(text).expanduser())
    return resolved, [str(w.message) for w in caught]


def predict_image(checkpoint: str | Path, image_path: str | Path, method: str = "gradcam",
                  device: str = "auto") -> Prediction:
    """Class probabilities of one image under a fold checkpoint (or a run folder: its fold 0), and the CAM
    (``method``, a key of :data:`ussf_lib.explain.gradcam.METHODS`) of its predicted class.

    Introduced in ``notebooks/08_try_the_model.ipynb``.
    """
    from ussf_lib.explain.gradcam import compute_cams, load_images, to_model_input

    ckpt, notes = checkpoint_of(checkpoint)
    image_path = Path(image_path)
    if not image_path.is_file():
        raise UserError(f"{image_path}: no such image file")
    model, meta = _model(ckpt, device)
    image = load_images([image_path], meta)
    device_of = next(model.parameters()).device
    with warnings.catch_warnings(record=True) as caught:  # e.g. "1x1 map: the CAM carries no spatial information"
        warnings.simplefilter("always")
        cams, probs = compute_cams(model, meta["model_name"], to_model_input(image, meta, device_of), method)
    notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return Prediction(image_path, ckpt, list(meta["classes"]), probs[0], image[0], cams[0], method, notes)


def plot_prediction(prediction: Prediction, out: str | Path | None = None):
    """One figure of a :class:`Prediction`: the probability bars (the predicted class in red), the image as the
    model saw it, and the same image under the CAM. Saved to ``out`` when given; returns the figure.

    Introduced in ``notebooks/08_try_the_model.ipynb``.
    """
    from ussf_lib.evaluation.plots import plt, save_figure

    p = prediction
    fig, (bars, left, right) = plt.subplots(1, 3, figsize=(10.5, 3.2), layout="constrained",
                                            gridspec_kw={"width_ratios": [1.3, 1, 1]})
    colours = ["#d9534f" if c == p.label else "#5b8fd6" for c in p.classes]
    bars.barh(p.classes[::-1], p.probs[::-1], color=colours[::-1])
    bars.set(xlim=(0, 1), xlabel="probability", title=p.text())
    left.imshow(p.image, interpolation="nearest")
    right.imshow(p.image, interpolation="nearest")
    right.imshow(p.cam, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    left.set_title(p.path.name, fontsize="small")
    right.set_title(f"{p.method} map of {p.label}", fontsize="small")
    for ax in (left, right):
        ax.axis("off")
    save_figure(fig, out)
    return fig


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def prediction_html(prediction: Prediction) -> str:
    """The drawing: the prediction line, one bar per class, and the CAM overlay as an inline PNG ``<img>``."""
    from ussf_lib.explain.figures import plot_cam_overlay

    p = prediction
    bars = "".join(
        f'<div class="ussf-prob-row" style="display:flex;align-items:center;gap:6px;font-family:monospace">'
        f'<span style="width:10em;text-align:right">{html.escape(c)}</span>'
        f'<span style="flex:0 0 240px;background:#eee;height:14px;position:relative">'
        f'<span class="ussf-prob-bar" data-class="{html.escape(c)}" style="position:absolute;left:0;top:0;bottom:0;'
        f'width:{100 * float(v):.1f}%;background:{"#d9534f" if c == p.label else "#5b8fd6"}"></span></span>'
        f'<span>{float(v):.2f}</span></div>' for c, v in zip(p.classes, p.probs))
    fig = plot_cam_overlay(p.image, p.cam, title=f"{p.path.name}: {p.method} map of {p.label}")
    png = base64.b64encode(figure_png(fig)).decode("ascii")
    notes = "".join(f'<p class="ussf-note" style="color:#8a6d3b">{html.escape(n)}</p>' for n in p.notes)
    return (f'<div class="ussf-prediction">'
            f'<p class="ussf-prediction-text" style="font-size:1.2em;font-weight:bold">{html.escape(p.text())}</p>'
            f'<p style="color:#555">image {html.escape(str(p.path))}<br>checkpoint {html.escape(str(p.checkpoint))}</p>'
            f'{notes}<div class="ussf-probs">{bars}</div>'
            f'<img class="ussf-overlay" alt="{html.escape(p.method)} overlay of {html.escape(p.label)}" '
            f'src="data:image/png;base64,{png}"></div>')


def error_html(message: str) -> str:
    return f'<p class="ussf-error" style="color:#b94a48;font-weight:bold">Error: {html.escape(message)}</p>'


def build_predictor(checkpoints: Mapping[str, str | Path], images: Mapping[str, str | Path],
                    upload_dir: str | Path, method: str = "gradcam", device: str = "auto"
                    ) -> tuple[Any, Callable[[str | Path], Prediction | None]]:
    """The predictor's widgets and its ``predict(image_path)``.

    ``checkpoints`` and ``images`` map the labels shown in the two drop-downs to files. Uploaded images are saved
    into ``upload_dir`` and join the image drop-down. A text field takes any other checkpoint or run folder
    (Enter adds it to the checkpoint drop-down). Changing either drop-down, or pressing "Predict", redraws the
    output area. ``predict(path)`` draws the prediction of the chosen checkpoint for ``path`` there (replacing
    what was drawn) and returns the :class:`Prediction`, or ``None`` after drawing the error of a path that
    cannot be used; it never waits for input. The notebook displays the box and calls ``predict`` once.

    Introduced in ``notebooks/08_try_the_model.ipynb``.
    """
    import ipywidgets as widgets

    if not checkpoints or not images:
        raise UserError("the predictor needs at least one checkpoint and one image")
    upload_dir = Path(upload_dir)
    image_box = widgets.Dropdown(options=[(k, str(v)) for k, v in images.items()], description="image")
    upload = widgets.FileUpload(accept="image/*", multiple=False, description="upload an image")
    ckpt_box = widgets.Dropdown(options=[(k, str(v)) for k, v in checkpoints.items()], description="checkpoint")
    ckpt_text = widgets.Text(placeholder="or type RUN/folds/K/checkpoint.pt or a run folder, then Enter",
                             continuous_update=False, layout=widgets.Layout(width="36em"))
    button = widgets.Button(description="Predict", button_style="primary", icon="play")
    output = widgets.Output()
    for w, name in ((image_box, "image"), (upload, "upload"), (ckpt_box, "checkpoint"), (ckpt_text, "checkpoint-path"),
                    (button, "predict"), (output, "output")):
        w.add_class(f"ussf-{name}")

    def draw(html_text: str, plain: str) -> None:
        # Set the Output widget's outputs from the kernel, not by capturing display() in `with output:`. A headless
        # client (nbclient, under papermill and nbval) mimics a capturing Output widget by sending its outputs back
        # to the kernel, and one papermill run of notebook 08 that drew that way hung after the cell had finished.
        # A plain state update involves no capture.
        output.outputs = ({"output_type": "display_data", "metadata": {},
                           "data": {"text/html": html_text, "text/plain": plain}},)

    def predict(image_path: str | Path) -> Prediction | None:
        try:
            result = predict_image(ckpt_box.value, image_path, method, device)
        except UserError as exc:
            draw(error_html(str(exc)), f"Error: {exc}")
            return None
        draw(prediction_html(result), result.text())
        return result

    def add_option(box, label: str, value: str) -> None:
        if value not in [v for _, v in box.options]:
            box.options = [*box.options, (label, value)]
        box.value = value  # a change redraws through the observer

    def on_upload(change) -> None:
        for item in change["new"]:
            upload_dir.mkdir(parents=True, exist_ok=True)
            target = upload_dir / Path(item["name"]).name
            target.write_bytes(bytes(item["content"]))
            add_option(image_box, f"uploaded: {target.name}", str(target))

    def on_text(change) -> None:
        if not change["new"].strip():
            return
        try:
            path, _ = checkpoint_of(change["new"])
        except UserError as exc:
            draw(error_html(str(exc)), f"Error: {exc}")
            return
        add_option(ckpt_box, str(path), str(path))

    image_box.observe(lambda change: predict(change["new"]), names="value")
    ckpt_box.observe(lambda change: predict(image_box.value), names="value")
    upload.observe(on_upload, names="value")
    ckpt_text.observe(on_text, names="value")
    button.on_click(lambda _: predict(image_box.value))
    box = widgets.VBox([widgets.HBox([image_box, upload]), widgets.HBox([ckpt_box, ckpt_text]), button, output])
    box.add_class(BOX_CLASS)
    return box, predict


def run_checkpoints(run_dir: str | Path) -> dict[str, Path]:
    """``{"fold K": RUN/folds/K/checkpoint.pt}`` for every fold of a run that has a checkpoint.

    Introduced in ``notebooks/08_try_the_model.ipynb``.
    """
    found = sorted(Path(run_dir).glob("folds/*/checkpoint.pt"), key=lambda p: int(p.parent.name))
    if not found:
        raise UserError(f"{run_dir}: no folds/*/checkpoint.pt; pass a run folder written by `ussf cv`")
    return {f"fold {p.parent.name}": p for p in found}


def example_images(run_dir: str | Path, fold: int = 0, per_class: int = 2) -> dict[str, Path]:
    """Up to ``per_class`` images of each class that fold ``fold`` tested (its checkpoint never saw them),
    labelled ``"<class>: <name>"``, in the run's class order; the files come from the run's data.

    Introduced in ``notebooks/08_try_the_model.ipynb``.
    """
    import pandas as pd

    from ussf_lib.explain.heldout import run_image_paths
    from ussf_lib.evaluation.report import run_classes

    splits = pd.read_csv(Path(run_dir) / "splits.csv", dtype={"path": str, "label": str})
    files = run_image_paths(run_dir)
    tested = splits[(splits["fold"] == fold) & splits["path"].isin(list(files))]
    out = {}
    for label in run_classes(run_dir):
        for name in tested.loc[tested["label"] == label, "path"].head(per_class):
            out[f"{label}: {Path(name).name}"] = files[name]
    if not out:
        raise UserError(f"{run_dir}: fold {fold} tested no image that is still on disk")
    return out

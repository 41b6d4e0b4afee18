"""Look at a dataset before training on it: class balance, image sizes and modes, intensities, patients.

Introduced in ``notebooks/01_explore_data.ipynb``. Every function takes an :class:`~ussf_lib.data.index.ImageIndex`
(file list with labels and groups) or the decoded uint8 stack of :func:`~ussf_lib.data.index.decode_images`, and
returns a table (``pandas.DataFrame``) or a matplotlib figure; ``out=`` also saves a figure. Exact and
near-duplicate images are :mod:`ussf_lib.data.audit`'s job (the same notebook calls it).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ussf_lib.data.index import ImageIndex, printable, read_file_bytes
from ussf_lib.errors import UserError
from ussf_lib.evaluation.plots import Figure, plt, save_figure, whole_number_ticks


def class_table(index: ImageIndex) -> pd.DataFrame:
    """Images per class with their share and the imbalance ratio (largest class / this class).

    With patient groups (a manifest with a group column) the number of patients per class is added.
    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    counts = index.class_counts()
    table = pd.DataFrame({"class": counts.index, "images": counts.to_numpy()})
    table["fraction"] = (table["images"] / max(1, int(table["images"].sum()))).round(4)
    table["imbalance"] = (table["images"].max() / table["images"].replace(0, np.nan)).round(2)
    if index.has_groups:
        patients = index.frame.groupby("label")["group"].nunique()
        table["patients"] = [int(patients.get(c, 0)) for c in table["class"]]
    return table


def image_properties(index: ImageIndex) -> pd.DataFrame:
    """Width, height, mode and format of every file, read from the headers (no pixel is decoded).

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    rows = []
    for path, listed, relpath, label in zip(index.frame["path"], index.listed_paths(), index.frame["relpath"],
                                            index.frame["label"]):
        try:
            # read_file_bytes never opens a FIFO or other special file for reading (it would block)
            with Image.open(io.BytesIO(read_file_bytes(path))) as im:
                rows.append((relpath, label, im.width, im.height, im.mode, im.format))
        except OSError as exc:
            raise UserError(f"{printable(str(listed))}: cannot read image header ({exc}); replace or remove the "
                            "file") from None
    return pd.DataFrame(rows, columns=["relpath", "label", "width", "height", "mode", "format"])


def size_mode_table(properties: pd.DataFrame, classes: Sequence[str] | None = None) -> pd.DataFrame:
    """How many images share each (width, height, mode), with a count per class (in ``classes`` order) and in total.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    table = (properties.groupby(["width", "height", "mode", "label"]).size().unstack("label", fill_value=0)
             .reset_index())
    table.columns.name = None
    found = [c for c in table.columns if c not in ("width", "height", "mode")]
    classes = [c for c in classes if c in found] if classes is not None else found
    table = table[["width", "height", "mode", *classes]]
    table["total"] = table[classes].sum(axis=1)
    return table.sort_values("total", ascending=False, kind="stable").reset_index(drop=True)


def _gray_uint8(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise UserError(f"images of shape {arr.shape}: pass the (N, H, W, 3) uint8 stack of decode_images")
    return arr.mean(axis=-1)


def intensity_histograms(images: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                         bins: int = 32) -> pd.DataFrame:
    """Per class, the density of grayscale pixel values (0-255, channels averaged) in ``bins`` equal bins.

    Returns a long table ``class, bin_left, bin_right, density`` (each class's densities integrate to 1).
    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    gray = _gray_uint8(images)
    labels = np.asarray(labels)
    edges = np.linspace(0, 256, bins + 1)
    frames = []
    for k, name in enumerate(classes):
        members = gray[labels == k]
        if len(members):
            density, _ = np.histogram(members, bins=edges, density=True)
            frames.append(pd.DataFrame({"class": str(name), "bin_left": edges[:-1], "bin_right": edges[1:],
                                        "density": density}))
    return pd.concat(frames, ignore_index=True)


def intensity_summary(images: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> pd.DataFrame:
    """Per class: mean, std and the 5th / 50th / 95th percentiles of grayscale pixel values (0-255).

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    gray = _gray_uint8(images)
    labels = np.asarray(labels)
    rows = []
    for k, name in enumerate(classes):
        values = gray[labels == k].ravel()
        if values.size:
            p5, p50, p95 = np.percentile(values, [5, 50, 95])
            rows.append({"class": str(name), "mean": values.mean(), "std": values.std(), "p5": p5,
                         "median": p50, "p95": p95})
    return pd.DataFrame(rows).round(2)


def images_per_patient(index: ImageIndex) -> pd.DataFrame:
    """One row per group (patient): ``group, label, images``, in the index's class order (as every per-class
    figure draws its classes). Without a group column every image is its own group.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    table = index.frame.groupby(["group", "label"]).size().rename("images").reset_index()
    labels_per_group = table.groupby("group")["label"].transform("nunique")
    table["mixed_labels"] = labels_per_group > 1
    order = table["label"].map({c: k for k, c in enumerate(index.classes)})
    return table.assign(_order=order).sort_values(["_order", "group"], kind="stable").drop(columns="_order") \
        .reset_index(drop=True)


def patient_summary(per_patient: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Per class: patients, images, and the min / median / max images per patient.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    rows = []
    for name in classes:
        sizes = per_patient.loc[per_patient["label"] == name, "images"]
        rows.append({"class": str(name), "patients": int(len(sizes)), "images": int(sizes.sum()),
                     "min": int(sizes.min()) if len(sizes) else 0,
                     "median": float(sizes.median()) if len(sizes) else 0.0,
                     "max": int(sizes.max()) if len(sizes) else 0})
    return pd.DataFrame(rows)


def fold_check(index: ImageIndex, folds: int) -> str:
    """One line saying whether ``folds``-fold (patient-grouped, when groups are known) cross-validation is possible.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    from ussf_lib.data.folds import check_fold_feasible

    groups = index.frame["group"].to_numpy() if index.has_groups else None
    unit = "patients" if groups is not None else "images"
    try:
        check_fold_feasible(index.frame["label"], groups, folds)
    except UserError as exc:
        return f"{folds}-fold cross-validation is NOT possible: {exc}"
    per_class = index.frame.groupby("label")["group"].nunique() if groups is not None else index.class_counts()
    return (f"{folds}-fold {'patient-grouped ' if groups is not None else ''}cross-validation is possible: "
            f"the smallest class has {int(per_class.min())} {unit}")


# --------------------------------------------------------------------------------------------- figures


def plot_class_counts(table: pd.DataFrame, out: str | Path | None = None) -> Figure:
    """Bar chart of :func:`class_table` (images per class, with the imbalance ratio on each bar).

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(table["class"].astype(str), table["images"], color="tab:blue")
    for bar, count, ratio in zip(bars, table["images"], table["imbalance"]):
        ax.annotate(f"{int(count)} (x{ratio:g})", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize="small")
    ax.margins(y=0.15)  # room above the tallest bar for its label
    ax.set(ylabel="images", title="Images per class (xN: largest class / this class)")
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def sample_indices(labels: Sequence[int], n_classes: int, per_class: int, seed: int = 0) -> list[list[int]]:
    """Up to ``per_class`` random image indices of each class (seeded), in class order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picks = []
    for k in range(n_classes):
        members = np.flatnonzero(labels == k)
        picks.append(sorted(rng.choice(members, size=min(per_class, len(members)), replace=False).tolist()))
    return picks


def plot_sample_grid(images: np.ndarray, labels: Sequence[int], classes: Sequence[str], per_class: int = 4,
                     seed: int = 0, out: str | Path | None = None) -> Figure:
    """A grid of random images: one row per class, ``per_class`` columns (seeded choice).

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    picks = sample_indices(labels, len(classes), per_class, seed)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.8 * per_class, 1.9 * len(classes)), squeeze=False)
    for row, (name, idx) in enumerate(zip(classes, picks)):
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(idx):
                ax.imshow(images[idx[col]])
            if col == 0:
                ax.set_title(str(name), loc="left", fontsize="small")
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_intensity_histograms(table: pd.DataFrame, out: str | Path | None = None) -> Figure:
    """Step plot of :func:`intensity_histograms`, one line per class.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, rows in table.groupby("class", sort=False):
        edges = np.append(rows["bin_left"].to_numpy(), rows["bin_right"].iloc[-1])  # every bin, the last included
        ax.stairs(rows["density"].to_numpy(), edges, label=str(name))
    ax.set(xlabel="grayscale value (0-255)", ylabel="fraction of pixels per grey level",
           title="Pixel intensities per class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_images_per_patient(per_patient: pd.DataFrame, grouped: bool = True, out: str | Path | None = None) -> Figure:
    """Histogram of images per patient, one colour per class (stacked, legend in the stack's order).

    ``grouped=False`` (data without patient ids, ``ImageIndex.has_groups``) says in the title that each image is
    its own group, so one bar at 1 is not read as one image per patient. Introduced in
    ``notebooks/01_explore_data.ipynb``.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    groups = [(str(name), rows["images"].to_numpy()) for name, rows in per_patient.groupby("label", sort=False)]
    top = int(per_patient["images"].max()) if len(per_patient) else 1
    ax.hist([g[1] for g in groups], bins=np.arange(0.5, top + 1.5), stacked=True, label=[g[0] for g in groups])
    title = "Images per patient (group)" if grouped else "No patient ids: each image is its own group"
    ax.set(xlabel="images per patient", ylabel="patients" if grouped else "groups", title=title)
    whole_number_ticks(ax.xaxis, range(1, top + 1))  # counts: whole numbers only
    whole_number_ticks(ax.yaxis)
    # Beside the axes, top entry = top of the stack.
    ax.legend(fontsize="small", reverse=True, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def interactive_browser(images: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> Callable[..., None]:
    """ipywidgets: a class picker and an image slider over that class's images.

    For ``INTERACTIVE = True`` in ``notebooks/01_explore_data.ipynb``; headless runs show the sample grid instead.
    """
    import ipywidgets as widgets

    labels = np.asarray(labels)
    members = {str(c): np.flatnonzero(labels == k) for k, c in enumerate(classes)}
    picker = widgets.Dropdown(options=list(members), description="class")
    slider = widgets.IntSlider(value=0, min=0, max=max(0, len(members[picker.value]) - 1), description="image")

    def on_class(change) -> None:
        slider.max = max(0, len(members[change["new"]]) - 1)
        slider.value = 0

    picker.observe(on_class, names="value")

    def show(name: str, i: int) -> None:
        idx = members[name]
        if len(idx):
            fig, ax = plt.subplots(figsize=(3.5, 3.5))
            ax.imshow(images[idx[min(i, len(idx) - 1)]])
            ax.set_title(f"{name} #{min(i, len(idx) - 1)}")
            ax.axis("off")
            plt.show()

    return widgets.interact(show, name=picker, i=slider)

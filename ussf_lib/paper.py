"""Table-driven metadata: class names, normalization constants, the paper's protocol and its reported numbers.

Every other module reads these values from here, so a constant is written once (MedMNIST's habit).
Introduced in ``notebooks/01_explore_data.ipynb``.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources

import pandas as pd

#: The paper's four classes, in the order its section 2.1 lists them. (Its Table 2 lists benign first;
#: ``tables/reported_table2.csv`` keeps the table's order.)
PAPER_CLASSES: tuple[str, ...] = ("normal", "benign", "primary", "metastatic")

#: Per-channel mean and std the paper normalizes with (section 2.4), on images scaled to [0, 1].
PAPER_MEAN: tuple[float, float, float] = (0.2394, 0.2421, 0.2381)
PAPER_STD: tuple[float, float, float] = (0.2173, 0.2177, 0.2155)

#: ImageNet statistics, for torchvision weights trained on ImageNet.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "paper": (PAPER_MEAN, PAPER_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}

#: ``pd.read_csv`` options for the project's own tables that hold class names: only an empty cell is missing,
#: so classes called "NA", "None" or "nan" stay names (pandas reads those as missing by default).
LABEL_SAFE_CSV: dict[str, object] = {"keep_default_na": False, "na_values": [""]}

#: File extensions read as images (lower case, with the dot).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"})

#: The paper's training protocol (section 2.4). CLI flags and notebook parameters default to these.
PAPER_PROTOCOL: dict[str, float | int | tuple[float, float]] = {
    "image_size": 224,
    "epochs": 150,
    "batch_size": 64,
    "folds": 5,
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "weight_decay": 1e-4,
}

#: The paper's private dataset. Patients, images, format and size are the paper's (section 2.1); the class counts
#: are not in the paper: they come from the same authors' other reports, as transcribed in ../shared/paper/README.md.
PAPER_DATASET: dict[str, object] = {
    "patients": 480,
    "images": 3392,
    "format": "BMP",
    "width": 480,
    "height": 350,
    "class_counts": {"normal": 1217, "benign": 601, "primary": 236, "metastatic": 1338},
}

#: Headline metrics in the run folder's summary.json and the Table 1 layout: overall accuracy, then macro averages
#: over classes (one-vs-rest) of the others. The paper's Table 1 reports accuracy only; its abstract adds precision,
#: sensitivity and specificity (the means of its Table 2); it reports no F1 or AUC figures.
METRIC_NAMES: tuple[str, ...] = ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")

#: One-vs-rest metrics computed per class, in per_class.csv.
PER_CLASS_METRICS: tuple[str, ...] = ("precision", "sensitivity", "specificity", "f1", "auc")

#: The per-class metrics the paper reports in Table 2 (columns of ``tables/reported_table2.csv``).
PAPER_TABLE2_METRICS: tuple[str, ...] = ("precision", "sensitivity", "specificity")

#: Per-class metrics in the Table 2 layout of ``ussf compare`` and notebook 05: the paper's three, plus F1.
TABLE2_METRICS: tuple[str, ...] = (*PAPER_TABLE2_METRICS, "f1")

#: The model whose figures the paper's abstract reports.
PAPER_MODEL = "us_sfnet"

#: Registry names of the paper's architecture: at the paper's size, and at CPU size (``us_sfnet_tiny``, the same
#: layout narrower and shallower). A single run of one of them shows the paper's US-SFNet figures beside its own;
#: an ablation such as ``us_sfnet_nofft`` or ``us_sfnet_tiny_nofreq`` is another model and shows none.
PAPER_ARCHITECTURE: tuple[str, ...] = (PAPER_MODEL, "us_sfnet_tiny")


def is_papers_task(classes: Iterable[str]) -> bool:
    """Whether a run's classes are the paper's four lymph-node classes: only then do the paper's figures sit
    beside it (a "benign" breast lesion is not a "benign" lymph node)."""
    return set(classes) == set(PAPER_CLASSES)


def paper_table1() -> pd.DataFrame:
    """Table 1 of the paper: 5-fold accuracy (%) mean and std per model, keyed by registry name.

    As transcribed. The paper's text has one inconsistency with it: the accuracy gain it quotes over "ViT-Base"
    (17.3 points) is US-SFNet's over the ``vit_l_16`` row (92.89 - 75.59), not over ``vit_b_16`` (15.62), so the
    two ViT rows may be swapped in the paper. Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    with resources.files("ussf_lib").joinpath("tables/reported_table1.csv").open() as fh:
        return pd.read_csv(fh)


def paper_table2() -> pd.DataFrame:
    """Table 2 of the paper: one-vs-rest precision, sensitivity, specificity (%) per class and model.

    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    with resources.files("ussf_lib").joinpath("tables/reported_table2.csv").open() as fh:
        return pd.read_csv(fh)


def paper_headline() -> dict[str, float]:
    """The paper's headline figures for US-SFNet (%), as its abstract gives them.

    Accuracy is Table 1's 5-fold mean; precision, sensitivity and specificity are the means over the four
    classes of Table 2 (the abstract's 90.46 / 89.95 / 97.49 are exactly those macro averages, rounded).
    """
    t1 = paper_table1().set_index("model")
    t2 = paper_table2()
    ours = t2[t2["model"] == PAPER_MODEL]
    headline = {"accuracy": float(t1.at[PAPER_MODEL, "accuracy_mean"])}
    for name in PAPER_TABLE2_METRICS:
        # Half-up rounding as printed in the paper (90.455 -> 90.46); round() would give 90.45.
        mean = Decimal(str(round(float(ours[f"{name}_mean"].mean()), 6)))
        headline[name] = float(mean.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    return headline

"""Rebuild a run folder's tables and figures from its ``predictions.csv`` and ``history.csv`` files alone.

Nothing here needs a model, so a table or a plot can be regenerated (``ussf report RUN``) without retraining.
Introduced in ``notebooks/04_train_cross_validation.ipynb`` (learning curves) and
``notebooks/05_evaluate_confusion_matrices.ipynb`` (predictions and tables).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ussf_lib.evaluation import plots
from ussf_lib.errors import UserError
from ussf_lib.paper import (LABEL_SAFE_CSV, METRIC_NAMES, PAPER_ARCHITECTURE, PAPER_MODEL, PAPER_TABLE2_METRICS,
                           PER_CLASS_METRICS, TABLE2_METRICS, is_papers_task, paper_headline, paper_table2)
from ussf_lib.evaluation.metrics import fold_confusions, format_mean_std, summarize_predictions


def run_classes(run_dir: str | Path) -> list[str]:
    """The run's class order, from its ``classes.json`` (columns ``prob_<class>`` follow it).

    Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    path = Path(run_dir) / "classes.json"
    if not path.is_file():
        if (Path(run_dir) / "compare.json").is_file():  # a comparison holds one run folder per model
            models = sorted(p.parent.name for p in Path(run_dir).glob("*/classes.json"))
            example = f"`ussf report {Path(run_dir) / models[0]}`, " if models else ""
            raise UserError(f"{run_dir}: is a comparison folder; report one of its models ({example}...), or rebuild "
                            f"its tables with `ussf compare --out {run_dir} --tables-only`")
        raise UserError(f"{run_dir}: no classes.json; pass a run folder written by `ussf cv`")
    return json.loads(path.read_text())


def load_predictions(run_dir: str | Path) -> pd.DataFrame:
    """All folds' out-of-fold predictions of a run, concatenated (columns path,label,fold,pred,prob_<class>...).

    Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    files = sorted(Path(run_dir).glob("folds/*/predictions.csv"), key=lambda p: int(p.parent.name))
    if not files:
        raise UserError(f"{run_dir}: no folds/*/predictions.csv yet; train first with `ussf cv`")
    return pd.concat([_read_predictions(f) for f in files], ignore_index=True)


def _read_predictions(path: Path) -> pd.DataFrame:
    damaged = (f"{path}: damaged ({{}}); delete it and run `ussf cv --resume {path.parents[2]}` to predict that "
               "fold again")
    try:
        frame = pd.read_csv(path, dtype={"path": str, "label": str, "pred": str}, **LABEL_SAFE_CSV)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(damaged.format(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)) from None
    missing = [c for c in ("path", "label", "fold", "pred") if c not in frame.columns]
    if missing or not any(c.startswith("prob_") for c in frame.columns):
        raise UserError(damaged.format(f"no {', '.join(missing) or 'prob_<class>'} column"))
    return frame


def load_histories(run_dir: str | Path) -> dict[int, pd.DataFrame]:
    """Each fold's ``history.csv`` (one row per epoch), keyed by fold number; ``{}`` before the first epoch ends.

    Introduced in ``notebooks/04_train_cross_validation.ipynb`` (learning curves).
    """
    files = sorted(Path(run_dir).glob("folds/*/history.csv"), key=lambda p: int(p.parent.name))
    return {int(f.parent.name): pd.read_csv(f) for f in files}


def beside_the_paper(model: str | None, classes: Iterable[str]) -> bool:
    """Whether a single run's tables show the paper's US-SFNet figures: for a run of the paper's architecture
    (:data:`~ussf_lib.paper.PAPER_ARCHITECTURE`: ``us_sfnet`` or its CPU-sized ``us_sfnet_tiny``; the columns are
    labelled as the paper's model) on the paper's four lymph-node classes. A baseline's run gets none (the columns
    would be another model's), nor does an ablation's (``us_sfnet_nofft`` ... is not the paper's model), nor does
    other data (a "benign" breast lesion is not a "benign" lymph node). Comparisons
    (:mod:`ussf_lib.evaluation.tables`) match each model to its own row of the paper's tables instead.
    """
    return bool(model) and str(model) in PAPER_ARCHITECTURE and is_papers_task(classes)


def results_table(summary: dict, model: str | None = None) -> pd.DataFrame:
    """The headline table: one row per metric with mean, std and ``mean ± std`` in percent, and the paper's
    abstract figures beside it where :func:`beside_the_paper`."""
    rows = []
    headline = paper_headline()
    for name in METRIC_NAMES:
        stats = summary.get(name) or {}
        mean, std = stats.get("mean"), stats.get("std")
        row = {"metric": name,
               "mean_pct": None if mean is None else round(100 * mean, 2),
               "std_pct": None if std is None else round(100 * std, 2),
               "mean ± std (%)": "n/a" if mean is None else format_mean_std(mean, std if std is not None else float("nan"))}
        if beside_the_paper(model, summary.get("classes", [])):
            row["paper US-SFNet (%)"] = headline.get(name)
        rows.append(row)
    return pd.DataFrame(rows)


def table2_beside_paper(run_dir: str | Path) -> pd.DataFrame:
    """The run's ``per_class.csv`` in the layout of the paper's Table 2, as ``mean ± std`` (%) strings.

    One row per class (the run's order) with precision, sensitivity, specificity and F1, and the paper's
    US-SFNet figures beside them (``paper US-SFNet <metric>``) where :func:`beside_the_paper` (a US-SFNet run on
    the paper's four classes). Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    run_dir = Path(run_dir)
    classes = run_classes(run_dir)
    config_file = run_dir / "config.json"
    model = json.loads(config_file.read_text()).get("model") if config_file.is_file() else None
    per_class = pd.read_csv(run_dir / "per_class.csv", dtype={"class": str}, **LABEL_SAFE_CSV).set_index("class")
    table = pd.DataFrame(index=pd.Index(classes, name="class"))
    for m in TABLE2_METRICS:
        table[m] = [format_mean_std(per_class.at[c, f"{m}_mean"], per_class.at[c, f"{m}_std"]) for c in classes]
    if beside_the_paper(model, classes):
        paper = paper_table2().set_index("model").loc[PAPER_MODEL].set_index("class")
        for m in PAPER_TABLE2_METRICS:
            table[f"paper US-SFNet {m}"] = [
                format_mean_std(paper.at[c, f"{m}_mean"], paper.at[c, f"{m}_std"], percent=False) for c in classes]
    return table


def write_report(run_dir: str | Path, partial_ok: bool = False) -> dict:
    """Write summary.json, per_class.csv, results.csv/.md, fold metrics and the figures; return the summary.

    The tables cover the folds that have a ``predictions.csv``. When the run's config names more folds the run
    is unfinished: that is a :class:`UserError` (nothing is rewritten), or with ``partial_ok`` (a run of
    chosen folds) a warning naming the missing ones.
    """
    run_dir = Path(run_dir)
    classes = run_classes(run_dir)
    pred = load_predictions(run_dir)
    summary, per_class = summarize_predictions(pred, classes)
    summary["classes"] = list(classes)
    config_file = run_dir / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    model = config.get("model")
    missing = sorted(set(range(int(config.get("folds", 0)))) - {int(k) for k in pred["fold"].unique()})
    if missing:
        message = (f"{run_dir}: fold(s) {missing} of {config['folds']} have no predictions.csv, so the run is "
                   f"unfinished; finish it with `ussf cv --resume {run_dir}`")
        if not partial_ok:
            raise UserError(message + " (nothing was rewritten)")
        warnings.warn(message + "; the tables cover the other folds only", stacklevel=2)
    summary["model"] = model
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    per_class.to_csv(run_dir / "per_class.csv", index=False)
    table = results_table(summary, model)
    table.to_csv(run_dir / "results.csv", index=False)
    (run_dir / "results.md").write_text(
        f"# Cross-validation results: {model} ({summary.get('n_folds', '?')} folds)\n\n"
        + table.astype(object).where(table.notna(), None).to_markdown(index=False, missingval="n/a")
        + "\n\n## Per class (one-vs-rest, mean ± std over folds, %)\n\n"
        + _per_class_markdown(per_class) + "\n"
    )
    for k, fold_metrics in enumerate(summary.get("per_fold", [])):
        fold_dir = run_dir / "folds" / str(sorted(pred["fold"].unique())[k])
        (fold_dir / "metrics.json").write_text(json.dumps(fold_metrics, indent=2))
    pooled = sum(fold_confusions(pred, classes).values())
    pd.DataFrame(pooled, index=classes, columns=classes).to_csv(run_dir / "confusion_matrix.csv")
    figures = [
        plots.plot_confusion_pair(pooled, classes, title=f"{model}: pooled over folds", out=run_dir / "confusion_matrix.png"),
        plots.plot_roc(pred, classes, out=run_dir / "roc.png"),
    ]
    histories = load_histories(run_dir)
    if histories:
        figures.append(plots.plot_learning_curves(histories, out=run_dir / "learning_curves.png"))
    for fig in figures:
        plt.close(fig)
    return summary


def _per_class_markdown(per_class: pd.DataFrame) -> str:
    rows = []
    for _, r in per_class.iterrows():
        row = {"class": r["class"]}
        for m in PER_CLASS_METRICS:
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            row[m] = "n/a" if mean is None or (isinstance(mean, float) and np.isnan(mean)) else format_mean_std(mean, std)
        row["support"] = int(r["support"])
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False)

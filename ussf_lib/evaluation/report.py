"""Rebuild a run folder's tables and figures from its ``predictions.csv`` and ``history.csv`` files alone.

Nothing here needs a model, so a table or a plot can be regenerated (``ussf report RUN``) without retraining.
Beside the image-level tables, :func:`write_report` scores calibration (ECE, Brier, ``calibration.png``) and,
when the run knows its patients, the same metrics per patient (:func:`patient_level`); ``docs/evaluation.md``
describes both.
Introduced in ``notebooks/04_train_cross_validation.ipynb`` (learning curves) and
``notebooks/05_evaluate_confusion_matrices.ipynb`` (predictions and tables).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ussf_lib import files
from ussf_lib.evaluation import plots
from ussf_lib.errors import UserError
from ussf_lib.paper import (LABEL_SAFE_CSV, METRIC_NAMES, PAPER_ARCHITECTURE, PAPER_MODEL, PAPER_TABLE2_METRICS,
                           PER_CLASS_METRICS, TABLE2_METRICS, is_papers_task, paper_headline, paper_table2)
from ussf_lib.evaluation.metrics import (CALIBRATION_METRICS, ECE_BINS, MIXED_LABEL_RULE, PATIENT_RULE,
                                         fold_confusions, format_mean_std, patient_predictions,
                                         summarize_predictions, temperature_summary)


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


def run_groups(run_dir: str | Path, pred: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """Each prediction's patient id (aligned with ``pred``), or ``(None, why not)``; the second item says where
    the ids came from when there are some.

    The ids are ``predictions.csv``'s ``group`` column when it has one, else ``splits.csv``'s ``group``, joined by
    ``path``. A run made without patient ids has none: the data index names each image its own group (its path),
    and folds that keep near-duplicates together (``--dedup-folds``, the default) name a cluster after its first
    image's path. So groups that are all paths of the run's images are not patients.
    """
    run_dir = Path(run_dir)
    splits_file = run_dir / "splits.csv"
    splits = None
    if splits_file.is_file():
        try:
            splits = pd.read_csv(splits_file, dtype={"path": str, "label": str, "group": str}, **LABEL_SAFE_CSV)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            if "group" not in pred.columns:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return None, f"splits.csv is not readable ({why})"
    if "group" in pred.columns:
        groups, source = pred["group"], "predictions.csv's group column"
    elif splits is None:
        return None, "the run has no splits.csv to read the patients from"
    elif "group" not in splits.columns or "path" not in splits.columns:
        return None, "splits.csv has no path and group columns"
    else:
        by_path = splits.drop_duplicates("path").set_index("path")["group"]
        groups, source = pred["path"].astype(str).map(by_path), "splits.csv's group column"
        unknown = pred.loc[groups.isna(), "path"]
        if len(unknown):
            return None, (f"{len(unknown)} predicted image(s) are not in splits.csv (e.g. {unknown.iloc[0]!r}), or "
                          "have no group there")
    if groups.isna().any():
        return None, f"{int(groups.isna().sum())} prediction(s) have no group"
    groups = groups.astype(str)
    paths = set(pred["path"].astype(str)) | (set(splits["path"].astype(str)) if splits is not None
                                             and "path" in splits.columns else set())
    if groups.isin(paths).all():
        return None, ("the run has no patient ids (every image's group is an image path: its own, or that of a "
                      "near-duplicate it was kept with); a manifest with --group-col gives them")
    return groups.rename("group"), source


def patient_level(run_dir: str | Path, pred: pd.DataFrame, classes: list[str]
                  ) -> tuple[dict | None, pd.DataFrame | None, list[str]]:
    """Patient-level summary, its per-class table and notes; ``(None, None, [why])`` when there are no patients.

    Each patient's prediction is the mean probability over its images (:data:`PATIENT_RULE`, via
    :func:`~ussf_lib.evaluation.metrics.patient_predictions`), scored per fold with the image-level metrics and
    summarised over folds. The summary is ``{"rule", "patients", "images", "mixed_label_patients",
    "mixed_label_rule", <metric>: {"mean", "std"}, ..., "per_fold": [... with each fold's "patients"],
    "n_folds"}``; patients whose images carry more than one label are left out (:data:`MIXED_LABEL_RULE`) and a
    note names them.
    """
    groups, source = run_groups(run_dir, pred)
    if groups is None:
        return None, None, [f"patient level: not computed, {source}"]
    notes = []
    table, mixed = patient_predictions(pred.assign(group=groups.to_numpy()), classes)
    if mixed:
        notes.append(f"patient level: {len(mixed)} patient(s) have images of more than one label (e.g. "
                     f"{mixed[0]!r}) and are left out; check their labels")
    if table.empty:
        return None, None, [*notes, "patient level: not computed, no patient with a single label is left"]
    spread = table.groupby("group")["fold"].nunique()
    if (spread > 1).any():
        notes.append(f"patient level: {int((spread > 1).sum())} patient(s) have images in more than one fold "
                     f"(e.g. {spread.index[spread > 1][0]!r}); each fold scores its own part of them")
    summary, per_class = summarize_predictions(table, classes)
    per_fold_patients = table.groupby("fold").size()
    for entry in summary["per_fold"]:
        entry["patients"] = int(per_fold_patients[entry["fold"]])
    out = {"rule": PATIENT_RULE, "patients": int(len(table)), "images": int(table["images"].sum()),
           "groups_from": source, "mixed_label_patients": len(mixed), "mixed_label_rule": MIXED_LABEL_RULE}
    out.update({k: v for k, v in summary.items() if k != "classes"})
    return out, per_class, notes


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


def write_report(run_dir: str | Path, partial_ok: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Write summary.json, per_class.csv, results.csv/.md, fold metrics and the figures; return the summary.

    The tables cover the folds that have a ``predictions.csv``. When the run's config names more folds the run
    is unfinished: that is a :class:`UserError` (nothing is rewritten), or with ``partial_ok`` (a run of
    chosen folds) a warning naming the missing ones.

    Calibration (``ece``, ``brier`` in the summary and each fold's metrics.json; ``calibration.png``) is always
    written. When the run has patient ids (:func:`run_groups`) the summary gains ``patient_level`` and
    ``per_class_patient.csv`` is written (each fold's metrics.json gets its fold's ``patient_level`` too);
    otherwise one line saying why goes to ``log`` (default: stderr), as do notes on patients left out.
    """
    log = log if log is not None else (lambda line: print(line, file=sys.stderr))
    run_dir = Path(run_dir)
    run_classes(run_dir)  # refuses a folder that is not a run before anything, the lock included, is written there
    with files.run_lock(run_dir):
        return _write_report(run_dir, partial_ok, log)


def _write_report(run_dir: Path, partial_ok: bool, log: Callable[[str], None]) -> dict:
    """:func:`write_report` under the run folder's lock."""
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
    patients, per_class_patient, notes = patient_level(run_dir, pred, classes)
    if patients is not None:
        summary["patient_level"] = patients
    for note in notes:
        log(note)
    scaled = temperature_summary(pred, classes, read_temperatures(run_dir))
    if scaled is not None:
        summary["temperature_scaled"] = scaled
    then = f"ussf report {run_dir}"
    files.write_text(run_dir / "summary.json", json.dumps(summary, indent=2), then)
    files.write_csv(per_class, run_dir / "per_class.csv", then)
    if per_class_patient is not None:
        files.write_csv(per_class_patient, run_dir / "per_class_patient.csv", then)
    else:
        (run_dir / "per_class_patient.csv").unlink(missing_ok=True)  # from earlier data; it would mislead
    table = results_table(summary, model)
    files.write_csv(table, run_dir / "results.csv", then)
    files.write_text(run_dir / "results.md",
        f"# Cross-validation results: {model} ({summary.get('n_folds', '?')} folds)\n\n"
        + table.astype(object).where(table.notna(), None).to_markdown(index=False, missingval="n/a")
        + "\n\n## Per class (one-vs-rest, mean ± std over folds, %)\n\n"
        + _per_class_markdown(per_class) + "\n"
        + _calibration_markdown(summary)
        + (_patient_markdown(patients, per_class_patient) if patients is not None else ""), then)
    patient_folds = {e["fold"]: e for e in patients["per_fold"]} if patients is not None else {}
    for k, fold_metrics in enumerate(summary.get("per_fold", [])):
        fold_id = sorted(pred["fold"].unique())[k]
        fold_dir = run_dir / "folds" / str(fold_id)
        fold_patients = patient_folds.get(fold_metrics.get("fold", fold_id))
        if fold_patients is not None:
            fold_metrics = {**fold_metrics, "patient_level": {"rule": PATIENT_RULE, **{
                key: value for key, value in fold_patients.items() if key != "fold"}}}
        files.write_text(fold_dir / "metrics.json", json.dumps(fold_metrics, indent=2), then)
    pooled = sum(fold_confusions(pred, classes).values())
    files.write_csv(pd.DataFrame(pooled, index=classes, columns=classes), run_dir / "confusion_matrix.csv", then,
                    index=True)
    figures = [
        plots.plot_confusion_pair(pooled, classes, title=f"{model}: pooled over folds", out=run_dir / "confusion_matrix.png"),
        plots.plot_roc(pred, classes, out=run_dir / "roc.png"),
        plots.plot_calibration(pred, classes, out=run_dir / "calibration.png"),
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




def _calibration_table(summary: dict) -> str:
    """ECE and Brier as ``mean ± std`` (fractions, three decimals); empty for a summary without them."""
    rows = [{"metric": name, "mean ± std": format_mean_std(summary[name].get("mean"), summary[name].get("std"),
                                                         percent=False, digits=3)}
            for name in CALIBRATION_METRICS if isinstance(summary.get(name), dict)]
    return pd.DataFrame(rows).to_markdown(index=False) if rows else ""


def _calibration_markdown(summary: dict) -> str:
    table = _calibration_table(summary)
    if not table:
        return ""
    scaled = summary.get("temperature_scaled")
    extra = "" if not scaled else (
        "\n\nWith --temperature-scaling, on the same folds (raw → temperature-scaled; T per fold "
        + ", ".join(f"{t:.2f}" for t in scaled["temperatures"].values()) + "):\n\n"
        + pd.DataFrame([{"metric": m, "raw": format_mean_std(scaled[f"{m}_raw"]["mean"], scaled[f"{m}_raw"]["std"],
                                                             percent=False, digits=3),
                         "temperature-scaled": format_mean_std(scaled[m]["mean"], scaled[m]["std"], percent=False,
                                                               digits=3)} for m in ("ece", "brier")]
                       ).to_markdown(index=False))
    return ("\n## Calibration (lower is better, mean ± std over folds)\n\n"
            f"ece: {ECE_BINS}-bin expected calibration error of the top-class probability (0..1); brier: "
            "multi-class Brier score (0..2). Reliability diagram of all predictions pooled: calibration.png.\n\n"
            + table + extra + "\n")


def read_temperatures(run_dir: str | Path) -> dict[int, float]:
    """fold -> temperature, from the folds' ``temperature.json`` (written by ``--temperature-scaling``)."""
    found = {}
    for f in Path(run_dir).glob("folds/*/temperature.json"):
        try:
            found[int(f.parent.name)] = float(json.loads(f.read_text())["temperature"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            raise UserError(f"{f}: damaged; delete it and that fold's predictions.csv, then `ussf cv --resume` "
                            "the run to fit it again") from None
    return found


def _patient_markdown(patients: dict, per_class: pd.DataFrame) -> str:
    table = results_table(patients)
    calibration = _calibration_table(patients)
    mixed = patients.get("mixed_label_patients", 0)
    return (f"\n## Patient level ({patients['patients']} patients, {patients['images']} images; "
            f"{patients['rule']})\n\n"
            + (f"{mixed} patient(s) with images of more than one label left out.\n\n" if mixed else "")
            + table.astype(object).where(table.notna(), None).to_markdown(index=False, missingval="n/a")
            + "\n\n" + _per_class_markdown(per_class) + "\n"
            + (f"\nCalibration per patient:\n\n{calibration}\n" if calibration else ""))

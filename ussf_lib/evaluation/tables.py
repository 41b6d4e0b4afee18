"""The paper's Tables 1 and 2, the paired comparison and the per-class chart, rebuilt from a comparison folder.

:func:`write_comparison` reads only the run folders that :func:`ussf_lib.training.compare.compare` left in ``OUT``
(``summary.json``, ``per_class.csv``, ``history.csv``, ``splits.csv``), so the tables can be rebuilt at any time
without a model (``ussf compare --tables-only``)::

    OUT/table1.csv/.md        Table 1 layout: overall accuracy and macro precision, sensitivity, specificity, F1, AUC
                              (mean ± std over folds, %) per model, the paper's reported accuracy beside it
    OUT/table2.csv/.md        Table 2 layout: one-vs-rest precision, sensitivity, specificity, F1 per model and class
    OUT/per_class_bars.png    Table 2 as grouped bars
    OUT/paired.csv/.md        every model against the reference (us_sfnet, else the first model) fold by fold:
                              differences, Nadeau–Bengio corrected t-test, bootstrap CI (see ussf_lib.evaluation.stats)

The CSVs hold fractions, as every run folder does (``accuracy_mean`` 0.83, not 83), the paper's reported
figures included (divided by 100 here); the markdown tables print percent.
Introduced in ``notebooks/06_compare_baselines.ipynb``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ussf_lib import files
from ussf_lib.evaluation import plots
from ussf_lib.errors import UserError
from ussf_lib.paper import (LABEL_SAFE_CSV, METRIC_NAMES, PAPER_MODEL, PAPER_TABLE2_METRICS, TABLE2_METRICS,
                           is_papers_task, paper_table1, paper_table2)
from ussf_lib.evaluation.metrics import format_mean_std
from ussf_lib.evaluation.stats import N_BOOT, paired_comparison

#: Macro metrics of Table 1, in column order.
TABLE1_METRICS: tuple[str, ...] = METRIC_NAMES
#: Metrics compared fold by fold in paired.csv.
PAIRED_METRICS: tuple[str, ...] = ("accuracy", "f1")
#: The model the others are compared with when it is in the list.
REFERENCE_MODEL = PAPER_MODEL


def reference_model(models: Sequence[str]) -> str:
    """``us_sfnet`` when compared, else the first model listed.

    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    return REFERENCE_MODEL if REFERENCE_MODEL in models else models[0]


def _log_quiet(_: str) -> None:
    pass


def same_folds(a: str | Path, b: str | Path) -> bool:
    """Whether two splits.csv files put every image in the same fold (row order does not matter)."""
    fa = pd.read_csv(a, dtype={"path": str}).set_index("path")["fold"].sort_index()
    fb = pd.read_csv(b, dtype={"path": str}).set_index("path")["fold"].sort_index()
    return fa.index.equals(fb.index) and bool((fa.to_numpy() == fb.to_numpy()).all())


def _finished_runs(out: Path, models: Sequence[str] | None) -> list[str]:
    if models is None:
        manifest = out / "compare.json"
        if manifest.is_file():
            models = json.loads(manifest.read_text())["models"]
        else:
            models = sorted(p.parent.name for p in out.glob("*/summary.json"))
    finished = [m for m in models if (out / m / "summary.json").is_file()]
    if not finished:
        there = sorted(p.parent.name for p in out.glob("*/summary.json"))
        if there:  # models were named, but not those that finished here
            raise UserError(f"{out}: no finished run of {', '.join(models)}; finished here: {', '.join(there)} "
                            "(choose among them with --models, or leave --models out)")
        raise UserError(f"{out}: no finished model run (OUT/<model>/summary.json); run `ussf compare` first")
    return finished


def _fraction(value) -> float:
    return math.nan if value is None else float(value)


def _from_percent(value) -> float:
    """A figure the paper prints in percent (two decimals) as a fraction, without float noise (0.9289, not
    0.9289000000000001)."""
    return round(float(value) / 100, 6)


def _run_settings(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _train_seconds(run_dir: Path) -> float:
    """Seconds spent training over all folds: ``train_seconds`` (the epochs' steps, without evaluation), or the
    whole epochs' ``seconds`` in a history too old to have it."""
    total = 0.0
    for f in run_dir.glob("folds/*/history.csv"):
        hist = pd.read_csv(f)
        column = "train_seconds" if "train_seconds" in hist.columns else "seconds"
        if column in hist.columns:
            total += float(hist[column].sum())
    return total


def table1(out: str | Path, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Table 1 layout: one row per finished model; ``<metric>_mean``/``_std`` as fractions, and the paper's
    accuracy (also a fraction) for runs on the paper's four classes (NaN for other data, as in :func:`table2`)."""
    out = Path(out)
    reported = paper_table1().set_index("model")
    rows = []
    for name in _finished_runs(out, models):
        summary = json.loads((out / name / "summary.json").read_text())
        same_task = is_papers_task(summary.get("classes", []))
        cfg = _run_settings(out / name)
        row: dict = {"model": name, "n_folds": summary.get("n_folds"), "epochs": cfg.get("epochs"),
                     "image_size": cfg.get("image_size")}
        for m in TABLE1_METRICS:
            stats = summary.get(m) or {}
            row[f"{m}_mean"], row[f"{m}_std"] = _fraction(stats.get("mean")), _fraction(stats.get("std"))
        for s in ("mean", "std"):  # the paper prints percent
            row[f"paper_accuracy_{s}"] = _from_percent(reported[f"accuracy_{s}"].get(name, math.nan)) if same_task else math.nan
        row["train_seconds"] = round(_train_seconds(out / name), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def table2(out: str | Path, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Table 2 layout: one row per finished model and class (class order of the runs), values as fractions.

    Columns ``model, class, <metric>_mean, <metric>_std`` for precision, sensitivity, specificity, F1, and
    ``paper_<metric>_mean/_std`` where the paper reports that model and class, for runs whose classes are the
    paper's four lymph-node classes (a "benign" breast lesion is not a "benign" lymph node: other data get NaN).
    """
    out = Path(out)
    reported = paper_table2().set_index(["model", "class"])
    rows = []
    for name in _finished_runs(out, models):
        per_class = pd.read_csv(out / name / "per_class.csv", dtype={"class": str}, **LABEL_SAFE_CSV)
        same_task = is_papers_task(per_class["class"])
        for _, r in per_class.iterrows():
            row: dict = {"model": name, "class": r["class"]}
            for m in TABLE2_METRICS:
                row[f"{m}_mean"] = float(r[f"{m}_mean"])
                row[f"{m}_std"] = float(r[f"{m}_std"])
            row["support"] = int(r["support"])
            for m in PAPER_TABLE2_METRICS:
                for s in ("mean", "std"):
                    key = (name, row["class"])
                    known = same_task and key in reported.index
                    row[f"paper_{m}_{s}"] = _from_percent(reported.at[key, f"{m}_{s}"]) if known else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _per_fold(out: Path, name: str, metric: str) -> pd.Series:
    summary = json.loads((out / name / "summary.json").read_text())
    return pd.Series({int(f["fold"]): (math.nan if f.get(metric) is None else float(f[metric]))
                      for f in summary["per_fold"]})


def fold_test_train_ratio(splits_csv: str | Path) -> float:
    """Mean over folds of ``n_test / n_train`` (``1/(k-1)`` for equal folds): the Nadeau–Bengio correction term."""
    folds = pd.read_csv(splits_csv)["fold"]
    n = len(folds)
    return float(np.mean([c / (n - c) for c in folds.value_counts().to_numpy()]))


def paired_table(out: str | Path, models: Sequence[str] | None = None, n_boot: int = N_BOOT,
                 seed: int = 0) -> pd.DataFrame:
    """Every finished model against the reference on the same folds; differences are ``reference - model`` in points.

    One row per model and metric (accuracy, macro F1): per-fold differences ``diff_fold_<k>``, their mean and std,
    the corrected resampled t-test (``t``, ``df``, ``p_value``; ``naive_p_value`` is the uncorrected paired t-test,
    shown for contrast only), the bootstrap 95% CI (``ci_low``, ``ci_high``) and the ``n_test/n_train`` ratio used.
    Runs made on different folds are a :class:`UserError`.
    """
    out = Path(out)
    names = _finished_runs(out, models)
    ref = reference_model(names)
    ref_splits = out / ref / "splits.csv"
    ratio = fold_test_train_ratio(ref_splits)
    rows = []
    for name in names:
        if name == ref:
            continue
        if not same_folds(ref_splits, out / name / "splits.csv"):
            raise UserError(f"{out / name} was run on other folds than {out / ref}; a paired comparison needs "
                            "identical folds (run both with `ussf compare`, or `ussf cv --splits`)")
        for metric in PAIRED_METRICS:
            a, b = _per_fold(out, ref, metric), _per_fold(out, name, metric)
            folds = sorted(set(a.index) & set(b.index))
            res = paired_comparison(a.loc[folds].to_numpy(), b.loc[folds].to_numpy(), ratio, n_boot=n_boot, seed=seed)
            row: dict = {"model": name, "reference": ref, "metric": metric}
            row.update({f"diff_fold_{k}": 100.0 * d for k, d in zip(folds, res.diffs)})
            row.update(mean_diff=100.0 * res.mean_diff, std_diff=100.0 * res.std_diff, t=res.t, df=res.df,
                       p_value=res.p_value, naive_p_value=res.naive_p_value, ci_low=100.0 * res.ci_low,
                       ci_high=100.0 * res.ci_high, test_train_ratio=res.test_train_ratio, n_folds=res.n_folds)
            rows.append(row)
    return pd.DataFrame(rows)


# --- markdown ---------------------------------------------------------------------------------------------------


def _fmt(mean: float, std: float) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return format_mean_std(mean, None if std is None or not math.isfinite(std) else std)


def majority_line(out: Path, names: Sequence[str]) -> str:
    """One sentence: the accuracy of always predicting the most frequent class (the floor a model must beat)."""
    labels = pd.read_csv(out / names[0] / "splits.csv", dtype={"label": str}, **LABEL_SAFE_CSV)["label"]
    counts = labels.value_counts()
    return (f"Always predicting the most frequent class ({counts.index[0]!r}, {counts.iloc[0]} of {len(labels)} "
            f"images) would score {100 * counts.iloc[0] / len(labels):.2f}% accuracy.")


def _settings_line(out: Path, names: Sequence[str]) -> str:
    cfg = _run_settings(out / names[0])
    data = cfg.get("data") or cfg.get("manifest") or "?"
    epochs = cfg.get("epochs")
    return (f"Data `{data}`; {cfg.get('folds')} folds (shared `splits.csv`), {epochs} epoch{'' if epochs == 1 else 's'}, "
            f"{cfg.get('image_size')} px, batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, seed {cfg.get('seed')}.")


PAPER_NOTE = ("The paper's figures are those it reports for its private cervical lymph-node set (4 classes, "
              "224 px, 150 epochs); they are beside ours for orientation, not as a like-for-like comparison "
              "unless the data and protocol are the paper's.")


def table1_markdown(t1: pd.DataFrame) -> str:
    """:func:`table1` as a markdown table: ``mean ± std`` per metric, the paper's accuracy (only when some row
    has it), training time. Introduced in ``notebooks/06_compare_baselines.ipynb``."""
    rows = []
    has_paper = t1["paper_accuracy_mean"].notna().any()
    for _, r in t1.iterrows():
        row = {"model": r["model"]}
        for m in TABLE1_METRICS:
            row[m] = _fmt(r[f"{m}_mean"], r[f"{m}_std"])
        if has_paper:
            row["paper accuracy"] = _fmt(r["paper_accuracy_mean"], r["paper_accuracy_std"])
        seconds = r["train_seconds"]
        row["train time (s)"] = f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}"
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def table2_markdown(t2: pd.DataFrame) -> str:
    """:func:`table2` as a markdown table; the paper's columns appear only when some row has a paper figure.

    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    rows = []
    has_paper = t2[[c for c in t2.columns if c.startswith("paper_")]].notna().any().any()
    for _, r in t2.iterrows():
        row = {"model": r["model"], "class": r["class"]}
        for m in TABLE2_METRICS:
            row[m] = _fmt(r[f"{m}_mean"], r[f"{m}_std"])
        if has_paper:
            for m in PAPER_TABLE2_METRICS:
                row[f"paper {m}"] = _fmt(r[f"paper_{m}_mean"], r[f"paper_{m}_std"])
        row["support"] = int(r["support"])
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _undefined_or(value: float, spec: str) -> str:
    return "undefined (no spread)" if math.isnan(value) else format(value, spec)


def paired_markdown(paired: pd.DataFrame) -> str:
    """:func:`paired_table` as a markdown table, one row per model and metric (read with :data:`PAIRED_NOTE`).

    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    if paired.empty:
        return "(only one model: nothing to pair)"
    rows = []
    diff_cols = [c for c in paired.columns if c.startswith("diff_fold_")]
    for _, r in paired.iterrows():
        rows.append({
            "reference − model": f"{r['reference']} − {r['model']}",
            "metric": r["metric"],
            "per-fold differences (points)": ", ".join(f"{r[c]:+.2f}" for c in diff_cols if math.isfinite(r[c])),
            "mean diff": f"{r['mean_diff']:+.2f}",
            "95% bootstrap CI": f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
            "corrected t": _undefined_or(r["t"], ".2f"),
            "p (corrected)": _undefined_or(r["p_value"], ".3f"),
            "p (naive, do not use)": _undefined_or(r["naive_p_value"], ".3f"),
        })
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


PAIRED_NOTE = (
    "Differences are reference − model in percentage points, fold by fold on identical folds (positive: the "
    "reference is better). p (corrected): Nadeau–Bengio corrected resampled t-test, t = mean / sqrt((1/k + "
    "n_test/n_train) · s²) with k − 1 degrees of freedom (Nadeau & Bengio 2003; Bouckaert & Frank 2004). "
    "The naive paired t-test ignores that training sets overlap and is shown only to make the correction "
    f"visible. The bootstrap CI resamples the k fold differences (percentile, {N_BOOT:,} resamples, seed 0): with "
    "few folds it describes the spread, it does not correct for overlap. When every fold differs by the same amount "
    "the test is undefined (no spread to judge it by); with 2 folds any test has 1 degree of freedom: compare "
    "models on 5 or more folds."
)


def per_class_long(t2: pd.DataFrame, include_paper: bool = True) -> pd.DataFrame:
    """Table 2 in the long layout :func:`~ussf_lib.evaluation.plots.plot_per_class_bars` reads; the paper's rows as
    ``<model> (paper)``. Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    cols = ["model", "class", *[f"{m}_{s}" for m in TABLE2_METRICS for s in ("mean", "std")]]
    frames = [t2[cols]]
    if include_paper:
        paper = t2.dropna(subset=["paper_precision_mean"])
        if len(paper):
            p = pd.DataFrame({"model": paper["model"] + " (paper)", "class": paper["class"]})
            for m in TABLE2_METRICS:
                for s in ("mean", "std"):
                    p[f"{m}_{s}"] = paper.get(f"paper_{m}_{s}", pd.Series(math.nan, index=paper.index))
            frames.append(p)
    return pd.concat(frames, ignore_index=True)


def write_comparison(out: str | Path, models: Sequence[str] | None = None, log: Callable[[str], None] = _log_quiet
                     ) -> dict[str, pd.DataFrame]:
    """(Re)write table1, table2, paired (.csv and .md) and per_class_bars.png from the run folders in ``out``.

    ``models`` defaults to those in ``out/compare.json`` (else every ``out/*/summary.json``); unfinished models are
    left out. Returns ``{"table1", "table2", "paired"}`` DataFrames.
    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    out = Path(out)
    names = _finished_runs(out, models)
    with files.run_lock(out):
        return _write_tables(out, names, models, log)


def _write_tables(out: Path, names: list[str], models: Sequence[str] | None, log: Callable[[str], None]
                  ) -> dict[str, pd.DataFrame]:
    """:func:`write_comparison` under the comparison folder's lock."""
    then = "run the same command again"
    if models is not None and len(names) < len(models):
        log(f"not finished yet, left out: {[m for m in models if m not in names]}")
    t1, t2, paired = table1(out, names), table2(out, names), paired_table(out, names)
    settings = _settings_line(out, names)
    # The note explains the paper's columns, so it goes only where they are (runs on the paper's classes).
    note1 = " " + PAPER_NOTE if t1["paper_accuracy_mean"].notna().any() else ""
    note2 = "\n\n" + PAPER_NOTE if t2.filter(like="paper_").notna().any().any() else ""
    files.write_csv(t1, out / "table1.csv", then)
    files.write_text(out / "table1.md",
        "# Table 1 layout: accuracy and macro metrics per model (mean ± std over folds, %)\n\n" + settings + "\n\n"
        + table1_markdown(t1) + "\n\n" + majority_line(out, names) + note1 + "\n", then)
    files.write_csv(t2, out / "table2.csv", then)
    files.write_text(out / "table2.md",
        "# Table 2 layout: one-vs-rest metrics per model and class (mean ± std over folds, %)\n\n" + settings
        + "\n\n" + table2_markdown(t2) + note2 + "\n", then)
    files.write_csv(paired, out / "paired.csv", then)
    files.write_text(out / "paired.md",
        f"# Paired comparison with {reference_model(names)} on identical folds\n\n" + settings + "\n\n"
        + paired_markdown(paired) + "\n\n" + PAIRED_NOTE + "\n", then)
    fig = plots.plot_per_class_bars(per_class_long(t2), metric_cols=TABLE2_METRICS, out=out / "per_class_bars.png")
    plt.close(fig)
    return {"table1": t1, "table2": t2, "paired": paired}


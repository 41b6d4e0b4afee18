"""Tables of a comparison repeated over several seeds (``ussf compare --seeds 0,1,2``).

Each seed is a whole comparison in ``OUT/seed_<s>/`` (its own folds, shared by every model of that seed). The tables
pool every (seed, fold) pair: Table-1-style figures are mean ± std over folds and seeds, per-class sensitivity
likewise, and every model is compared with the reference by the Nadeau–Bengio corrected resampled t-test over all
k·r paired differences (Bouckaert and Frank's form for r repetitions of k-fold cross-validation: the correction
term ``n_test/n_train`` is unchanged, ``1/(k·r)`` replaces ``1/k``). Reads run folders only.
Introduced in ``docs/results/busi_ablation_cpu.md``'s study.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ussf_lib.errors import UserError
from ussf_lib.evaluation.metrics import fold_confusions
from ussf_lib.evaluation.report import load_predictions, run_classes
from ussf_lib.evaluation.stats import paired_comparison
from ussf_lib.evaluation.tables import fold_test_train_ratio, reference_model

#: The per-fold figures pooled over seeds.
SEED_METRICS = ("accuracy", "f1", "auc", "ece")


def seed_folder(out: str | Path, seed: int) -> Path:
    """Where seed ``seed``'s comparison lives inside ``out``."""
    return Path(out) / f"seed_{seed}"


def fold_rows(out: str | Path, seeds: Sequence[int], models: Sequence[str]) -> pd.DataFrame:
    """One row per model, seed and fold: the headline metrics and each class's sensitivity (``sens_<class>``)."""
    rows = []
    for seed in seeds:
        for model in models:
            run = seed_folder(out, seed) / model
            if not (run / "summary.json").is_file():
                raise UserError(f"{run}: not finished; rerun `ussf compare --seeds` with the same --out to finish it")
            summary = json.loads((run / "summary.json").read_text())
            classes = run_classes(run)
            confusions = fold_confusions(load_predictions(run), classes)
            for fold in summary["per_fold"]:
                row = {"model": model, "seed": seed, "fold": int(fold["fold"])}
                row.update({m: fold.get(m) for m in SEED_METRICS})
                cm = confusions[int(fold["fold"])]
                with np.errstate(invalid="ignore", divide="ignore"):
                    row.update({f"sens_{c}": float(cm[i, i] / cm[i].sum()) for i, c in enumerate(classes)})
                rows.append(row)
    return pd.DataFrame(rows)


def seeds_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof 1) over folds and seeds per model, as fractions; ``n`` counts the (seed, fold) pairs."""
    values = [c for c in rows.columns if c not in ("model", "seed", "fold")]
    grouped = rows.groupby("model", sort=False)[values]
    table = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_std"))
    table.insert(0, "n", rows.groupby("model", sort=False).size())
    return table.reset_index()


def seeds_paired(out: str | Path, rows: pd.DataFrame, seeds: Sequence[int]) -> pd.DataFrame:
    """Every model against the reference over all (seed, fold) pairs: differences ``reference - model`` in points."""
    models = list(dict.fromkeys(rows["model"]))
    ref = reference_model(models)
    ratio = float(np.mean([fold_test_train_ratio(seed_folder(out, s) / "splits.csv") for s in seeds]))
    keyed = rows.set_index(["model", "seed", "fold"]).sort_index()
    result = []
    for model in models:
        if model == ref:
            continue
        for metric in ("accuracy", "f1"):
            a, b = keyed.loc[ref, metric], keyed.loc[model, metric]
            pairs = a.index.intersection(b.index)
            res = paired_comparison(a.loc[pairs].to_numpy(float), b.loc[pairs].to_numpy(float), ratio)
            result.append({"model": model, "reference": ref, "metric": metric, "n_pairs": len(pairs),
                           "mean_diff": 100 * res.mean_diff, "std_diff": 100 * res.std_diff, "t": res.t,
                           "df": res.df, "p_value": res.p_value, "ci_low": 100 * res.ci_low,
                           "ci_high": 100 * res.ci_high, "test_train_ratio": ratio})
    return pd.DataFrame(result)


def _pct(mean: float, std: float) -> str:
    return "n/a" if not np.isfinite(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


def write_seed_tables(out: str | Path, seeds: Sequence[int], models: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Write ``seeds_folds.csv``, ``seeds_table.csv``, ``seeds_paired.csv`` and ``seeds.md`` in ``out``."""
    out = Path(out)
    rows = fold_rows(out, seeds, models)
    table, paired = seeds_table(rows), seeds_paired(out, rows, seeds)
    rows.to_csv(out / "seeds_folds.csv", index=False)
    table.to_csv(out / "seeds_table.csv", index=False)
    paired.to_csv(out / "seeds_paired.csv", index=False)
    metric_cols = [c[:-5] for c in table.columns if c.endswith("_mean")]
    shown = pd.DataFrame({"model": table["model"], "n": table["n"],
                          **{c: [_pct(m, s) for m, s in zip(table[f"{c}_mean"], table[f"{c}_std"])]
                             for c in metric_cols}})
    ref = reference_model(list(models))
    diff = f"{ref} − model (points)"
    tests = paired.assign(**{diff: [f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]" for d, lo, hi in
                                    zip(paired["mean_diff"], paired["ci_low"], paired["ci_high"])],
                             "p (corrected)": [f"{p:.3f}" if np.isfinite(p) else "undefined"
                                               for p in paired["p_value"]]})
    text = (f"# {len(models)} models over seeds {', '.join(map(str, seeds))}: mean ± std over folds and seeds (%)\n\n"
            + shown.to_markdown(index=False) + "\n\n## Paired with " + ref
            + " (Nadeau–Bengio corrected t-test over all seed × fold pairs; bootstrap 95% CI)\n\n"
            + tests[["model", "metric", "n_pairs", diff, "p (corrected)"]].to_markdown(index=False)
            + "\n")
    (out / "seeds.md").write_text(text)
    return {"folds": rows, "table": table, "paired": paired}

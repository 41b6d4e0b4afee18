"""ussf_lib.paper: the paper's numbers are written once, and they are the paper's."""

from __future__ import annotations

import re

from ussf_lib.evaluation import tables as compare_tables
from ussf_lib.evaluation import metrics
from ussf_lib.paper import (METRIC_NAMES, PAPER_CLASSES, PAPER_MODEL, PAPER_TABLE2_METRICS, PER_CLASS_METRICS,
                           TABLE2_METRICS, paper_headline, paper_table1, paper_table2)


def _paper_text(paper_dir) -> str:
    (path,) = sorted(paper_dir.glob("*.txt"))
    return path.read_text()


def _figures(text: str) -> set[str]:
    """Every ``12.34%`` in the text (the OCR turns ``±`` into several characters, so std is read separately)."""
    return set(re.findall(r"(\d{1,3}\.\d{2})%", text))


def test_headline_is_the_abstract(paper_dir):
    head = paper_headline()
    assert head == {"accuracy": 92.89, "precision": 90.46, "sensitivity": 89.95, "specificity": 97.49}
    text = " ".join(_paper_text(paper_dir).split())
    assert ("92.89% accuracy, 90.46% precision, 89.95% sensitivity and 97.49% specificity") in text


def test_reported_tables_hold_the_papers_figures(paper_dir):
    text = _paper_text(paper_dir)
    figures = _figures(text)
    t1 = paper_table1()
    assert len(t1) == 13 and t1["model"].iloc[0] == PAPER_MODEL
    assert {f"{v:.2f}" for v in t1["accuracy_mean"]} <= figures
    t2 = paper_table2()
    assert set(t2["class"]) == set(PAPER_CLASSES)
    for m in PAPER_TABLE2_METRICS:
        assert {f"{v:.2f}" for v in t2[f"{m}_mean"]} <= figures, m
    # US-SFNet's rows, class by class, in the paper's column order (OCR leaves "|" between some columns)
    ours = t2[t2["model"] == PAPER_MODEL].set_index("class")
    for cls in PAPER_CLASSES:
        row = r"\S*\s+(?:\|\s+)?".join(re.escape(f"{ours.at[cls, f'{m}_mean']:.2f}%") for m in PAPER_TABLE2_METRICS)
        assert re.search(rf"{cls.title()}\s+(?:\|\s+)?{row}", text), cls


#: ``92.89%(+0.42)``: the OCR writes the ``±`` as ``+``, ``£``, ``%``, ``*`` or drops it.
_PAIR = r"(\d{1,3}\.\d{2})%\(\D?(\d{1,2}\.\d{2})\)"


def test_table1_means_and_stds_row_by_row(paper_dir):
    text = _paper_text(paper_dir)
    region = text[text.index("Table 1."):text.index("Table 2.")]
    # The OCR prints the first five rows beside their names and the last eight after the names, in row order.
    pairs = [(float(m), float(s)) for m, s in re.findall(_PAIR, region)]
    t1 = paper_table1()
    assert pairs == list(zip(t1["accuracy_mean"], t1["accuracy_std"]))


def test_table2_means_and_stds_row_by_row(paper_dir):
    text = _paper_text(paper_dir)
    region = text[text.index("Model Type Precision"):text.index("COCULISON")]
    rows = []
    for line in region.splitlines():
        cls = re.search(r"(Benign|Normal|Primary|Metastatic)", line)
        pairs = re.findall(_PAIR, line)
        if cls and pairs:
            assert len(pairs) == 3, line
            rows.append([cls.group(1).lower()] + [float(v) for pair in pairs for v in pair])
    t2 = paper_table2()
    columns = ["class"] + [f"{m}_{s}" for m in PAPER_TABLE2_METRICS for s in ("mean", "std")]
    assert rows == t2[columns].values.tolist()


def test_metric_lists_are_shared_not_copied():
    assert compare_tables.TABLE1_METRICS is METRIC_NAMES and compare_tables.TABLE2_METRICS is TABLE2_METRICS
    assert metrics.PER_CLASS_METRICS is PER_CLASS_METRICS
    assert TABLE2_METRICS[:3] == PAPER_TABLE2_METRICS and set(TABLE2_METRICS) <= set(PER_CLASS_METRICS)
    assert {f"{m}_{s}" for m in PAPER_TABLE2_METRICS for s in ("mean", "std")} <= set(paper_table2().columns)

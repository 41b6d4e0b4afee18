"""Find exact and near-duplicate images, and duplicates filed under different labels (``ussf audit``).

Two images are related when

* their files are byte-identical (same sha256), or their decoded RGB pixels are identical (the same picture
  saved twice in different formats) — an *exact* duplicate; or
* their perceptual hashes (``imagehash.phash`` with ``hash_size**2`` bits, of the full-resolution image) differ
  in at most ``threshold`` bits — a *near* duplicate (a re-export, a re-scale, calipers added).

A *cluster* is a connected component of that relation (so duplicates of duplicates join one cluster); a
cluster whose images carry more than one label is a *conflict*: at least one of its labels is wrong, or the
picture is ambiguous. BUSI (``../shared/datasets/busi``) holds both kinds, and identical files under two
labels. Cross-validation keeps every cluster inside one fold (:func:`ussf_lib.data.folds.index_groups`), otherwise a
copy of a test image would be in the training set.

The hashes are computed in the same pass that decodes the images for training (:func:`ussf_lib.data.index.decode_index`),
so deduplicated folds cost about one perceptual hash per image (BUSI's 780: a couple of seconds on 2 cores).
Introduced in ``notebooks/01_explore_data.ipynb``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ussf_lib.data.index import ImageIndex, decode_index
from ussf_lib.errors import UserError
from ussf_lib.files import write_csv, write_text

#: Defaults shared by ``ussf audit`` and the deduplicated folds of ``ussf cv``.
HASH_SIZE = 8
THRESHOLD = 4

#: Columns of ``audit_clusters.csv``.
CLUSTER_COLUMNS: tuple[str, ...] = ("cluster", "path", "label", "sha256", "phash", "kind")


def check_hash_settings(hash_size: int, threshold: int, threshold_flag: str = "--dup-threshold") -> None:
    """Raise :class:`UserError` for a hash size or threshold that cannot work (``threshold_flag`` names it)."""
    if isinstance(hash_size, bool) or not isinstance(hash_size, (int, np.integer)) or not 2 <= hash_size <= 32:
        raise UserError(f"--hash-size {hash_size}: use a whole number from 2 to 32 (8 gives 64-bit hashes)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 <= threshold < hash_size ** 2:
        raise UserError(f"{threshold_flag} {threshold}: use a whole number of bits from 0 to {hash_size ** 2 - 1} "
                        f"(a hash has {hash_size ** 2} bits; 4 is the default for 64)")


def image_hashes(index: ImageIndex, hash_size: int = HASH_SIZE, *, workers: int | None = None,
                 progress: bool = False, cache_dir: str | Path | None = None,
                 skip_bad: bool = False) -> tuple[ImageIndex, pd.DataFrame, pd.DataFrame]:
    """Hash every image of ``index`` (sha256 of the bytes, sha256 of the pixels, phash): one read per file.

    Returns the readable images' index, their hashes (columns ``sha256``, ``pixels``, ``phash``) and the skipped
    files (``path``, ``reason``; empty unless ``skip_bad``, otherwise an unreadable file is a :class:`UserError`).
    """
    check_hash_settings(hash_size, 0)
    decoded = decode_index(index, None, cache_dir=cache_dir, workers=workers, progress=progress, skip_bad=skip_bad,
                           hash_size=hash_size)
    return decoded.index, decoded.hashes, decoded.skipped


def _bits_in_hex(n_hex: int) -> int:
    """Bits of a ``hash_size``-square hash written as ``n_hex`` hex digits (imagehash pads to whole digits)."""
    for size in range(2, 65):
        if -(-size * size // 4) == n_hex:
            return size * size
    raise ValueError(f"a perceptual hash of {n_hex} hex digits is not a square hash")


def _hash_bits(phashes: pd.Series | np.ndarray, n_bits: int) -> np.ndarray:
    """Hex perceptual hashes -> (N, n_bits) array of 0/1 (the bit order of ``imagehash``)."""
    rows = [np.array(list(format(int(h, 16), f"0{n_bits}b")), dtype=np.uint8) for h in phashes]
    return np.stack(rows) if rows else np.zeros((0, n_bits), dtype=np.uint8)


def near_pairs(bits: np.ndarray, threshold: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) whose bit vectors differ in at most ``threshold`` places (blocked, so N can be large)."""
    b = bits.astype(np.float32)
    nb = 1.0 - b
    pairs_i, pairs_j = [], []
    for start in range(0, len(b), block):
        stop = min(start + block, len(b))
        # Hamming distance as two matrix products: bits that are 1 here and 0 there, plus the reverse.
        dist = b[start:stop] @ nb.T + nb[start:stop] @ b.T
        i, j = np.nonzero(dist <= threshold + 0.5)
        i = i + start
        keep = j > i
        pairs_i.append(i[keep])
        pairs_j.append(j[keep])
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(pairs_i) if pairs_i else empty), (np.concatenate(pairs_j) if pairs_j else empty)


def _same_value_pairs(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking every image to the next one with the same value (enough for connected components)."""
    codes, _ = pd.factorize(values)
    order = np.argsort(codes, kind="stable")
    same = codes[order][1:] == codes[order][:-1]
    return order[:-1][same], order[1:][same]


def _components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component id per node, numbered 0, 1, ... in order of each component's first node (deterministic)."""
    i = np.concatenate([e[0] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    j = np.concatenate([e[1] for e in edges]) if edges else np.zeros(0, dtype=np.int64)
    _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    _, first = np.unique(labels, return_index=True)
    renumber = np.empty(len(first), dtype=np.int64)
    renumber[np.argsort(np.argsort(first))] = np.arange(len(first))
    return renumber[labels]


def exact_ids(hashes: pd.DataFrame) -> np.ndarray:
    """One id per image; images with identical bytes or identical decoded pixels share it."""
    return _components(len(hashes), [_same_value_pairs(hashes["sha256"]), _same_value_pairs(hashes["pixels"])])


def clusters_from_hashes(hashes: pd.DataFrame, threshold: int = THRESHOLD) -> np.ndarray:
    """One cluster id per image (rows of ``hashes``): exact duplicates plus phash distance <= ``threshold``.

    Ids run 0, 1, ... in order of each cluster's first image; an image without duplicates has its own id.
    """
    bits = _hash_bits(hashes["phash"], _bits_in_hex(len(hashes["phash"].iloc[0])) if len(hashes) else 64)
    return _components(len(hashes), [_same_value_pairs(hashes["sha256"]), _same_value_pairs(hashes["pixels"]),
                                     near_pairs(bits, threshold)])


def cluster_ids(index: ImageIndex, hash_size: int = HASH_SIZE, threshold: int = THRESHOLD, *,
                hashes: pd.DataFrame | None = None, progress: bool = False,
                cache_dir: str | Path | None = None) -> np.ndarray:
    """One duplicate-cluster id per image of ``index`` (its row order); singletons get their own id.

    Pass ``hashes`` (rows as ``index``) to skip reading the files. Every image must be readable.
    """
    check_hash_settings(hash_size, threshold)
    if hashes is None:
        _, hashes, _ = image_hashes(index, hash_size, progress=progress, cache_dir=cache_dir)
    if len(hashes) != len(index):
        raise ValueError(f"{len(hashes)} hash rows for {len(index)} images")
    return clusters_from_hashes(hashes, threshold)


@dataclass
class AuditResult:
    """What :func:`audit_index` finds.

    ``clusters``: one row per image that has a duplicate (columns :data:`CLUSTER_COLUMNS`; ``kind`` is
    ``exact`` when every image of the cluster is identical, else ``near``), sorted by cluster. ``conflicts``: the
    rows of clusters whose images carry more than one label. ``summary``: counts (see :func:`audit_index`).
    ``ids``: the cluster id of every image of ``index`` (the readable images), ``hashes`` their hashes.
    """

    clusters: pd.DataFrame
    conflicts: pd.DataFrame
    summary: dict[str, Any]
    ids: np.ndarray
    index: ImageIndex
    hashes: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))

    def describe(self, max_conflicts: int = 10) -> str:
        """A few printable lines: what was found, and the clusters with conflicting labels."""
        s = self.summary
        lines = [
            f"{s['images']} images: {s['exact_clusters']} exact-duplicate group(s) ({s['exact_images']} images), "
            f"{s['clusters']} duplicate cluster(s) in all ({s['images_in_clusters']} images, phash distance <= "
            f"{s['threshold']} of {s['hash_size'] ** 2} bits, largest {s['largest_cluster']})",
            f"{s['conflict_clusters']} cluster(s) carry different labels ({s['conflict_images']} images), "
            f"{s['exact_conflict_clusters']} of them identical images",
        ]
        for cluster, rows in list(self.conflicts.groupby("cluster", sort=True))[:max_conflicts]:
            members = ", ".join(f"{p} [{lab}]" for p, lab in zip(rows["path"], rows["label"]))
            lines.append(f"  cluster {cluster} ({rows['kind'].iloc[0]}): {members}")
        if s["conflict_clusters"] > max_conflicts:
            lines.append(f"  ... {s['conflict_clusters'] - max_conflicts} more (see audit_clusters.csv)")
        if s["unreadable"]:
            lines.append(f"{s['unreadable']} unreadable file(s) left out")
        return "\n".join(lines)


def audit_index(index: ImageIndex, hash_size: int = HASH_SIZE, threshold: int = THRESHOLD, *,
                hashes: pd.DataFrame | None = None, progress: bool = False, skip_bad: bool = False,
                cache_dir: str | Path | None = None) -> AuditResult:
    """Exact and near-duplicate clusters of ``index``, and the clusters whose images carry different labels.

    ``summary`` keys: ``images``, ``hash_size``, ``threshold``, ``exact_clusters`` / ``exact_images`` (groups of
    identical images), ``clusters`` / ``images_in_clusters`` / ``largest_cluster`` (all duplicate clusters),
    ``conflict_clusters`` / ``conflict_images`` (clusters with more than one label),
    ``exact_conflict_clusters`` (identical images under different labels), ``unreadable``.
    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    check_hash_settings(hash_size, threshold)
    skipped = pd.DataFrame(columns=["path", "reason"])
    if hashes is None:
        index, hashes, skipped = image_hashes(index, hash_size, progress=progress, skip_bad=skip_bad,
                                              cache_dir=cache_dir)
    hashes = hashes.reset_index(drop=True)
    ids = clusters_from_hashes(hashes, threshold)
    exact = exact_ids(hashes)
    frame = pd.DataFrame({"cluster": ids, "path": index.frame["relpath"].to_numpy(),
                          "label": index.frame["label"].to_numpy(), "sha256": hashes["sha256"].to_numpy(),
                          "phash": hashes["phash"].to_numpy(), "exact": exact})
    sizes = frame.groupby("cluster")["path"].transform("size")
    dup = frame[sizes > 1].copy()
    dup["kind"] = np.where(dup.groupby("cluster")["exact"].transform("nunique") == 1, "exact", "near")
    n_labels = dup.groupby("cluster")["label"].transform("nunique")
    conflicts = dup[n_labels > 1]
    exact_sizes = frame.groupby("exact")["path"].transform("size")
    exact_labels = frame.groupby("exact")["label"].transform("nunique")
    summary = {
        "images": int(len(frame)),
        "hash_size": int(hash_size),
        "threshold": int(threshold),
        "exact_clusters": int(frame.loc[exact_sizes > 1, "exact"].nunique()),
        "exact_images": int((exact_sizes > 1).sum()),
        "clusters": int(dup["cluster"].nunique()),
        "images_in_clusters": int(len(dup)),
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "conflict_clusters": int(conflicts["cluster"].nunique()),
        "conflict_images": int(len(conflicts)),
        "exact_conflict_clusters": int(frame.loc[(exact_sizes > 1) & (exact_labels > 1), "exact"].nunique()),
        "unreadable": int(len(skipped)),
        "classes": {c: int(n) for c, n in index.class_counts().items()},
    }
    columns = list(CLUSTER_COLUMNS)
    return AuditResult(clusters=dup[columns].sort_values(["cluster", "path"], kind="stable").reset_index(drop=True),
                       conflicts=conflicts[columns].sort_values(["cluster", "path"], kind="stable").reset_index(drop=True),
                       summary=summary, ids=ids, index=index, hashes=hashes, skipped=skipped)


def write_audit(result: AuditResult, out: str | Path) -> list[Path]:
    """Write ``audit_clusters.csv`` and ``audit_summary.json`` (and ``skipped.csv`` when files were left out).

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    out = result.index.check_outside(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "audit_clusters.csv", out / "audit_summary.json"]
    write_csv(result.clusters, written[0])
    summary = dict(result.summary, root=str(result.index.root), source=result.index.source,
                   skipped=result.skipped.to_dict(orient="records"))
    write_text(written[1], json.dumps(summary, indent=2))
    if len(result.skipped):
        written.append(out / "skipped.csv")
        write_csv(result.skipped, written[-1])
    return written

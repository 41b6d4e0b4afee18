"""The synthetic lymph-node phantom: layout, determinism, class morphology and learnability."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ussf_lib.errors import UserError
from ussf_lib.paper import PAPER_CLASSES
from ussf_lib.data.phantom import (
    MASK_LABELS,
    NODE_MASK_VALUES,
    PHANTOM_CLASSES,
    PHANTOM_MARKER,
    class_counts,
    generate_phantom,
    is_phantom_folder,
    min_images_per_class,
    patient_sizes,
    patients_per_class,
    render_node,
    render_view,
    sample_patient,
)


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "label", "patient"]
        return list(reader)


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def node_stats(img: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Measurements a sonographer makes, taken on the label mask and the image."""
    node = np.isin(mask, NODE_MASK_VALUES)
    zz, xx = np.nonzero(node)
    ev = np.sort(np.linalg.eigvalsh(np.cov(np.vstack([zz, xx]).astype(float))))
    return {
        "area": float(node.mean()),
        "short_long": float(np.sqrt(ev[0] / ev[1])),  # short/long axis ratio from second moments
        "node_mean": float(img[node].mean()),
        "hilum": float((mask == 2).sum() / node.sum()),
        "necrosis_or_calc": float(np.isin(mask, (3, 4)).any()),
    }


# ---- render_node -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 224])
@pytest.mark.parametrize("label", PHANTOM_CLASSES)
def test_render_node_is_a_grayscale_uint8_image_with_a_node(label, size):
    img, mask = render_node(label, np.random.default_rng(1), size, return_mask=True)
    assert img.dtype == np.uint8 and img.shape == (size, size)
    assert mask.dtype == np.uint8 and mask.shape == (size, size)
    assert set(np.unique(mask)) <= set(MASK_LABELS)
    assert np.isin(mask, NODE_MASK_VALUES).any(), "every image shows its node"
    assert img.std() > 5 and 10 < img.mean() < 200, "speckled, neither blank nor saturated"
    assert np.array_equal(render_node(label, np.random.default_rng(1), size), img), "same rng, same image"


def test_render_node_depends_on_the_rng_and_rejects_unknown_labels():
    a = render_node("normal", np.random.default_rng(0), 32)
    b = render_node("normal", np.random.default_rng(1), 32)
    assert not np.array_equal(a, b)
    with pytest.raises(UserError, match="unknown phantom class"):
        render_node("lymphoma", np.random.default_rng(0), 32)
    with pytest.raises(UserError):
        render_node("normal", np.random.default_rng(0), 4)


def test_views_of_one_patient_show_the_same_node_with_new_speckle():
    rng = np.random.default_rng(3)
    patient = sample_patient("benign", rng)
    (i1, m1), (i2, m2) = (render_view(patient, rng, 64, return_mask=True) for _ in range(2))
    assert not np.array_equal(i1, i2)
    s1, s2 = node_stats(i1, m1), node_stats(i2, m2)
    assert 0.6 < s1["area"] / s2["area"] < 1.6 and abs(s1["short_long"] - s2["short_long"]) < 0.15


def test_class_morphology_follows_the_sonographic_criteria():
    """Medians over patients: the teaching points of data_README.md, in the expected direction."""
    stats: dict[str, list[dict[str, float]]] = {}
    for ci, label in enumerate(PHANTOM_CLASSES):
        rng = np.random.default_rng([11, ci])
        stats[label] = [node_stats(*render_node(label, rng, 64, return_mask=True)) for _ in range(16)]

    def med(label: str, key: str) -> float:
        return float(np.median([s[key] for s in stats[label]]))

    # oval benign nodes vs round malignant ones (short/long axis 0.5 is the classic cut-off)
    for oval in ("normal", "benign"):
        assert med(oval, "short_long") < 0.5
    for round_ in ("primary", "metastatic"):
        assert med(round_, "short_long") > 0.55
    # reactive nodes are enlarged; lymphoma is markedly hypoechoic
    assert med("benign", "area") > 1.5 * med("normal", "area")
    assert med("primary", "node_mean") < med("normal", "node_mean") - 15
    assert med("primary", "node_mean") < med("metastatic", "node_mean")
    # echogenic hilum preserved in normal (and mostly benign) nodes, lost in malignant ones
    assert med("normal", "hilum") > 0.1 > max(med("primary", "hilum"), med("metastatic", "hilum"))
    assert np.mean([s["hilum"] > 0 for s in stats["benign"]]) > 0.4
    # only metastases carry cystic necrosis or calcifications here
    assert np.mean([s["necrosis_or_calc"] for s in stats["metastatic"]]) > 0.3
    assert not any(s["necrosis_or_calc"] for label in ("normal", "benign") for s in stats[label])


def test_calcifications_cast_a_shadow_and_fluid_enhances_behind():
    """Attenuation is integrated along depth: below a calcification it is darker, below lymphoma brighter."""
    rng = np.random.default_rng(5)
    patient = sample_patient("metastatic", rng)
    patient.calcifications = [(0.0, 0.0, 0.4)]
    patient.necrosis, patient.vessel, patient.angle_deg = [], None, 0.0
    imgs, masks = zip(*(render_view(patient, rng, 128, return_mask=True) for _ in range(6)))
    shadow, beside = [], []
    for img, mask in zip(imgs, masks):
        rows, cols = np.nonzero(mask == 4)
        col, row = int(np.median(cols)), int(rows.max())
        below = img[row + 8:, col - 1:col + 2].astype(float)
        nodes_col = np.isin(mask, NODE_MASK_VALUES).any(axis=0)
        side = [c for c in range(128) if not nodes_col[c] and abs(c - col) > 20]
        shadow.append(below.mean())
        beside.append(img[row + 8:, side].astype(float).mean())
    print(f"shadow {np.mean(shadow):.1f} vs beside {np.mean(beside):.1f}")
    assert np.mean(shadow) < np.mean(beside) - 15

    patient = sample_patient("primary", rng)
    patient.vessel, patient.attenuation_factor = None, 0.3
    gains = []
    for _ in range(6):
        img, mask = render_view(patient, rng, 128, return_mask=True)
        node = np.isin(mask, NODE_MASK_VALUES)
        cols = np.flatnonzero(node.any(axis=0))
        bottom = int(np.nonzero(node)[0].max())
        mid = cols[len(cols) // 3: 2 * len(cols) // 3]
        outside = [c for c in range(128) if c < cols.min() - 10 or c > cols.max() + 10]
        gains.append(img[bottom + 3:, mid].astype(float).mean() - img[bottom + 3:, outside].astype(float).mean())
    print(f"posterior enhancement {np.mean(gains):.1f} gray levels")
    assert np.mean(gains) > 5


# ---- generate_phantom -----------------------------------------------------------------------------------------

def test_phantom_layout_manifest_and_patients(phantom_dir):
    rows = read_manifest(phantom_dir / "manifest.csv")
    assert len(rows) == 20 * len(PAPER_CLASSES)
    assert sorted(p.name for p in phantom_dir.iterdir() if p.is_dir()) == sorted(PAPER_CLASSES)
    on_disk = sorted(p.relative_to(phantom_dir).as_posix() for p in phantom_dir.rglob("*.png"))
    assert on_disk == sorted(r["path"] for r in rows)
    per_patient: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for r in rows:
        assert "\\" not in r["path"] and r["path"].startswith(f"{r['label']}/{r['patient']}_")
        assert r["patient"].startswith(f"{r['label']}_p")
        per_patient.setdefault(r["patient"], set()).add(r["label"])
        counts[r["patient"]] = counts.get(r["patient"], 0) + 1
    assert all(len(labels) == 1 for labels in per_patient.values()), "no patient spans two classes"
    assert all(8 <= n <= 10 for n in counts.values())
    for label in PAPER_CLASSES:
        assert sum(r["label"] == label for r in rows) == 20
    with Image.open(phantom_dir / rows[0]["path"]) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (32, 32)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kw = dict(n_per_class=9, image_size=16, classes=("normal", "primary"))
    a = tree_digest(generate_phantom(tmp_path / "a", seed=4, **kw).parent)
    b = tree_digest(generate_phantom(tmp_path / "b", seed=4, **kw).parent)
    c = tree_digest(generate_phantom(tmp_path / "c", seed=5, **kw).parent)
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert sum(a[k] != c[k] for k in a if k.endswith(".png")) >= 16


def test_patients_do_not_depend_on_dataset_size(tmp_path):
    small = generate_phantom(tmp_path / "s", n_per_class=9, image_size=16, classes=("benign",))
    large = generate_phantom(tmp_path / "l", n_per_class=40, image_size=16, classes=("benign",))
    first = read_manifest(small)[0]["path"]
    assert (small.parent / first).read_bytes() == (large.parent / first).read_bytes()


@pytest.mark.parametrize("n", [1, 7, 8, 11, 17, 20, 22, 31, 250, 1001])
def test_patient_sizes_cover_the_images(n):
    sizes = patient_sizes(n, (8, 10), np.random.default_rng(n))
    assert sum(sizes) == n
    if math.ceil(n / 10) <= n // 8:  # a split into 8-10 exists (e.g. not for 11 or 21-23)
        assert all(8 <= s <= 10 for s in sizes)
    else:
        assert max(sizes) - min(sizes) <= 1


def test_patients_per_class_counts_what_generate_phantom_writes(tmp_path):
    manifest = generate_phantom(tmp_path / "ph", n_per_class=11, image_size=16, seed=3)
    patients = {r["patient"] for r in read_manifest(manifest) if r["label"] == "benign"}
    assert len(patients) == patients_per_class(11) == 2 and patients_per_class(10) == 1
    for folds in (2, 3, 5, 10):
        n = min_images_per_class(folds)
        assert patients_per_class(n) >= folds > patients_per_class(n - 1)


def test_the_balanced_default_writes_the_same_bytes_as_before_class_ratio_existed(tmp_path):
    manifest = generate_phantom(tmp_path / "p", n_per_class=3, image_size=16, seed=0, classes=("normal", "primary"))
    digest = hashlib.sha256()
    for name, _ in tree_digest(manifest.parent).items():  # names and bytes of every file, the marker included
        digest.update(name.encode())
        digest.update((manifest.parent / name).read_bytes())
    assert digest.hexdigest() == "98436030c81e520324daa7a8d38a55cbd9de7b96ef0544a73141d4b396508797"
    explicit = generate_phantom(tmp_path / "q", n_per_class=3, image_size=16, seed=0, classes=("normal", "primary"),
                                class_ratio="1,1")
    assert tree_digest(explicit.parent) == tree_digest(manifest.parent)


def test_class_ratio_sets_the_images_per_class(tmp_path):
    assert class_counts(100) == dict.fromkeys(PAPER_CLASSES, 100)
    paper = class_counts(100, "paper")  # normal 1217, benign 601, primary 236, metastatic 1338
    assert paper == {"normal": 91, "benign": 45, "primary": 18, "metastatic": 100}
    assert class_counts(57, "5.7,1,1,1") == {"normal": 57, "benign": 10, "primary": 10, "metastatic": 10}
    assert class_counts(10, [1, 1000, 1, 1]) == {"normal": 1, "benign": 10, "primary": 1, "metastatic": 1}
    manifest = generate_phantom(tmp_path / "p", n_per_class=30, image_size=16, seed=1, class_ratio="paper")
    rows = read_manifest(manifest)
    written = {c: sum(r["label"] == c for r in rows) for c in PAPER_CLASSES}
    assert written == class_counts(30, "paper") == {"normal": 27, "benign": 13, "primary": 5, "metastatic": 30}
    marker = json.loads((manifest.parent / PHANTOM_MARKER).read_text())
    assert marker["class_counts"] == written and is_phantom_folder(manifest.parent)
    # the smaller classes hold the balanced phantom's first images, unchanged
    balanced = generate_phantom(tmp_path / "b", n_per_class=30, image_size=16, seed=1)
    first_primary = next(r["path"] for r in rows if r["label"] == "primary")
    assert (manifest.parent / first_primary).read_bytes() == (balanced.parent / first_primary).read_bytes()


@pytest.mark.parametrize("ratio, match", [("5.7,1,1", "3 weight"), ("a,b,c,d", "not a list of numbers"),
                                          ("1,0,1,1", "positive"), ({"normal": 2}, "no weight for 'benign'")])
def test_a_bad_class_ratio_is_refused_before_anything_is_written(tmp_path, ratio, match):
    with pytest.raises(UserError, match=match):
        generate_phantom(tmp_path / "x", n_per_class=4, image_size=16, class_ratio=ratio)
    assert not (tmp_path / "x").exists()


def test_cli_phantom_class_ratio(tmp_path, capsys):
    from ussf_lib.cli import main

    assert main(["phantom", "--out", str(tmp_path / "p"), "--n-per-class", "12", "--image-size", "16",
                 "--class-ratio", "paper"]) == 0
    rows = read_manifest(tmp_path / "p" / "manifest.csv")
    assert {c: sum(r["label"] == c for r in rows) for c in PAPER_CLASSES} == class_counts(12, "paper")
    assert main(["phantom", "--out", str(tmp_path / "q"), "--class-ratio", "1,2"]) == 2
    assert "--class-ratio '1,2' gives 2 weight(s) for 4 classes" in capsys.readouterr().err


def test_refuses_a_folder_with_other_data_and_leaves_it_alone(tmp_path):
    out = tmp_path / "mydata"
    (out / "benign").mkdir(parents=True)
    (out / "benign" / "scan.png").write_bytes(b"not really a png")
    with pytest.raises(UserError) as err:
        generate_phantom(out, n_per_class=2, image_size=16)
    message = str(err.value)
    assert str(out) in message and "\n" not in message and "--out" in message
    assert [p.name for p in out.rglob("*")] == ["benign", "scan.png"]
    (out / "manifest.csv").write_text("path,label\nbenign/scan.png,benign\n")
    with pytest.raises(UserError, match="not a phantom"):
        generate_phantom(out, n_per_class=2, image_size=16)
    assert (out / "benign" / "scan.png").read_bytes() == b"not really a png"


@pytest.mark.parametrize("name", ["scan.png", "benign_p000_00.png"])
def test_a_users_manifest_in_the_phantoms_own_layout_is_not_taken_for_a_phantom(tmp_path, name):
    # path,label,patient is also the manifest users are told to write for --group-col patient, and a file named
    # as the phantom names its images may still be the user's.
    out = tmp_path / "mydata"
    (out / "benign").mkdir(parents=True)
    (out / "benign" / name).write_bytes(b"a user's scan")
    (out / "manifest.csv").write_text(f"path,label,patient\nbenign/{name},benign,p1\n")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert not is_phantom_folder(out)
    with pytest.raises(UserError, match=f"{PHANTOM_MARKER}.*choose a new or empty --out"):
        generate_phantom(out, n_per_class=2, image_size=16)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (out / "benign" / name).read_bytes() == b"a user's scan"


def test_a_phantom_whose_manifest_was_edited_is_no_longer_replaced(tmp_path):
    out = tmp_path / "ph"
    manifest = generate_phantom(out, n_per_class=9, image_size=16, classes=("normal",))
    assert is_phantom_folder(out)
    (out / "normal" / "mine.png").write_bytes(b"a user's scan")
    manifest.write_text(manifest.read_text() + "normal/mine.png,normal,p9\n")
    assert not is_phantom_folder(out)
    with pytest.raises(UserError, match="not a phantom"):
        generate_phantom(out, n_per_class=9, image_size=16, classes=("normal",))
    assert (out / "normal" / "mine.png").read_bytes() == b"a user's scan"
    assert len(list(out.rglob("*.png"))) == 10


def test_regenerating_over_a_previous_phantom_replaces_it(tmp_path):
    out = tmp_path / "ph"
    generate_phantom(out, n_per_class=20, image_size=16, classes=("normal", "metastatic"))
    manifest = generate_phantom(out, n_per_class=9, image_size=16, classes=("normal",))
    rows = read_manifest(manifest)
    assert len(rows) == 9
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(r["path"] for r in rows)
    assert not (out / "metastatic").exists()
    marker = json.loads((out / PHANTOM_MARKER).read_text())
    assert marker["n_per_class"] == 9 and marker["classes"] == ["normal"]
    assert marker["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="unknown phantom class"):
        generate_phantom(tmp_path / "x", n_per_class=2, image_size=16, classes=("normal", "cyst"))
    with pytest.raises(UserError):
        generate_phantom(tmp_path / "x", n_per_class=0, image_size=16)
    with pytest.raises(UserError):
        generate_phantom(tmp_path / "x", n_per_class=2, image_size=16, images_per_patient=(5, 3))


# ---- learnable, but not trivially -----------------------------------------------------------------------------

class TinyCNN(torch.nn.Module):
    def __init__(self, n_classes: int) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


def test_a_tiny_cnn_learns_the_phantom_in_one_epoch_but_not_perfectly(tmp_path, one_thread):
    torch.manual_seed(0)
    manifest = generate_phantom(tmp_path / "ph", n_per_class=100, image_size=32, seed=0)
    rows = read_manifest(manifest)
    x = np.stack([np.asarray(Image.open(manifest.parent / r["path"]), dtype=np.float32) for r in rows])
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
    y = np.array([PHANTOM_CLASSES.index(r["label"]) for r in rows])
    patients = {label: sorted({r["patient"] for r in rows if r["label"] == label}) for label in PHANTOM_CLASSES}
    held_out = {p for ps in patients.values() for p in ps[6:]}  # grouped split: 6 patients per class train
    test = np.array([r["patient"] in held_out for r in rows])
    train_idx = np.flatnonzero(~test)
    np.random.default_rng(0).shuffle(train_idx)
    assert 4 * 6 * 8 <= len(train_idx) <= 4 * 6 * 10 and test.sum() >= 4 * 3 * 8

    xt, yt = torch.from_numpy(x)[:, None], torch.from_numpy(y)
    net = TinyCNN(len(PHANTOM_CLASSES))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for i in range(0, len(train_idx), 8):  # one epoch
        batch = torch.from_numpy(train_idx[i:i + 8])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt[batch]), yt[batch]).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(xt[torch.from_numpy(np.flatnonzero(test))]).argmax(1).numpy() == y[test]).mean())
    print(f"tiny CNN, one epoch on {len(train_idx)} images: held-out accuracy {accuracy:.3f}")
    assert 0.35 < accuracy < 1.0, accuracy


def test_sampled_patients_follow_the_class_priors():
    """The patient-level distributions of CLASS_PRIORS (size, shape, hilum, cortex echogenicity) are what
    sample_patient draws: mean and sd of the clipped normals, and the frequency of an echogenic hilum."""
    from ussf_lib.data.phantom import CLASS_PRIORS

    n = 4000
    for ci, (name, prior) in enumerate(CLASS_PRIORS.items()):
        rng = np.random.default_rng([29, ci])
        patients = [sample_patient(name, rng) for _ in range(n)]
        for field in ("long_axis_mm", "sl_ratio", "cortex_db"):
            values = np.array([getattr(p, field) for p in patients])
            mean, sd = getattr(prior, field)
            assert abs(values.mean() - mean) < 0.1 * sd, (name, field, values.mean())
            assert 0.9 * sd < values.std() < 1.1 * sd, (name, field, values.std())
        hilum = np.mean([p.has_hilum for p in patients])
        assert abs(hilum - prior.p_hilum) < 0.02, (name, hilum)

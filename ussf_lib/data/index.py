"""Find images, validate them, and decode them once into a uint8 cache.

Two ways to describe a dataset, both read in place (nothing is ever written into a data folder):

* a class-folder tree ``ROOT/<class>/**/*.{png,bmp,jpg,jpeg,tif,tiff}``; hidden entries
  (``.ipynb_checkpoints``) and non-image files are skipped and counted;
* a CSV manifest with columns ``path,label`` and an optional group column (patient id), paths relative to
  the manifest's folder or absolute, pointing anywhere (:meth:`ImageIndex.check_outside` says which folders
  then count as data).

Every image is converted to RGB and resized to ``image_size`` exactly once; training then reads batches from
the uint8 array (see :func:`decode_images`) and normalizes them on the training device
(:func:`normalize_batch`). Introduced in ``notebooks/01_explore_data.ipynb``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
import stat
import time
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ussf_lib.errors import UserError
from ussf_lib.paper import IMAGE_EXTENSIONS, NORMALIZATIONS

#: Pillow warns above ``MAX_IMAGE_PIXELS`` and raises above twice that; both are treated as a decompression bomb.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


@dataclass
class ImageIndex:
    """The images of a dataset with their labels, before any pixel is read.

    ``frame`` has one row per image with columns ``path`` (absolute, symlinks resolved: the file read),
    ``relpath`` (the image's name in run folders: relative to ``root`` with forward slashes, or for a manifest's
    image outside its folder the absolute path as listed), ``label`` (class name), ``target`` (index into
    ``classes``) and ``group`` (patient id, or the name itself when no group is known, so every image is its own
    group).
    """

    frame: pd.DataFrame
    classes: list[str]
    root: Path
    source: str
    group_col: str | None = None
    ignored: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def targets(self) -> np.ndarray:
        return self.frame["target"].to_numpy(dtype=np.int64)

    @property
    def has_groups(self) -> bool:
        return self.group_col is not None

    def class_counts(self) -> pd.Series:
        """Images per class, in class order (classes with no image show 0)."""
        return self.frame["label"].value_counts().reindex(self.classes, fill_value=0)

    def subset(self, keep: np.ndarray | Sequence[bool]) -> "ImageIndex":
        """The same index with only the rows where ``keep`` is true (classes and root unchanged)."""
        keep = np.asarray(keep, dtype=bool)
        return dataclasses.replace(self, frame=self.frame[keep].reset_index(drop=True), ignored=dict(self.ignored))

    def listed_paths(self) -> list[Path]:
        """Each image's path as the manifest lists it (``..`` folded, symlinks kept), or as the tree holds it."""
        return [Path(name) if Path(name).is_absolute() else self.root / name for name in self.frame["relpath"]]

    def check_outside(self, folder: str | Path, flag: str) -> Path:
        """Raise :class:`UserError` when ``folder`` (an output) lies in the data; returns it resolved.

        A tree's data are its whole root. A manifest's (``M`` its folder) are: ``M`` itself; under ``M``, the
        folders holding its images and those between them and ``M`` (all of ``M`` if images lie directly in it),
        so ``M/runs`` may sit beside ``M/images``; for images elsewhere (``../``, absolute paths, the targets of
        symlinks), every folder holding one of them, and also the folder ``C`` holding them all when they lie in
        ``C`` or its direct sub-folders (a data set's root, ``busi`` above ``busi/benign``; not ``/`` or ``/tmp``
        above unrelated folders), except ``M``'s own branch when ``C`` also holds ``M`` (a manifest kept inside
        a data set). Nothing is ever written into a user's data.
        """
        if self.source != "manifest":
            return check_outside(folder, self.root, flag)
        folder, root = Path(folder).expanduser().resolve(), self.root
        image_dirs = {p.parent for p in self.listed_paths()} | {Path(p).parent for p in self.frame["path"]}
        inner: set[Path] = set()
        elsewhere: set[Path] = set()
        for image_dir in image_dirs:
            if image_dir != root and root not in image_dir.parents:
                elsewhere.add(image_dir)
                continue
            while image_dir not in inner:  # the image's folder up to, not including, M (unless M holds it)
                inner.add(image_dir)
                if image_dir == root or image_dir.parent == root:
                    break
                image_dir = image_dir.parent
        chain = (folder, *folder.parents)
        hit = root if folder == root else next((f for f in chain if f in inner or f in elsewhere), None)
        if hit is None and elsewhere:
            common = Path(os.path.commonpath([str(f) for f in elsewhere]))
            data_set_root = common != Path(common.anchor) and all(f == common or f.parent == common
                                                                  for f in elsewhere)
            in_manifests_branch = folder == root or root in folder.parents
            hit = common if data_set_root and common in chain and not in_manifests_branch else None
        if hit is not None:
            raise _inside_the_data(flag, folder, hit)
        return folder

    def describe(self) -> str:
        """One line: how many images, per class, and what was ignored."""
        counts = ", ".join(f"{c} {n}" for c, n in self.class_counts().items())
        skipped = ", ".join(f"{n} {IGNORED_NAMES.get(why, why)}" for why, n in self.ignored.items() if n)
        groups = f", {self.frame['group'].nunique()} groups ({self.group_col})" if self.has_groups else ""
        return f"{len(self)} images in {len(self.classes)} classes ({counts}){groups}" + (
            f"; ignored {skipped}" if skipped else ""
        )


def check_outside(folder: str | Path, root: str | Path, flag: str) -> Path:
    """Raise :class:`UserError` when the output ``folder`` is ``root`` (a data folder) or inside it; returns
    ``folder`` resolved. A manifest's data are wider than its folder: :meth:`ImageIndex.check_outside`."""
    folder, root = Path(folder).expanduser().resolve(), Path(root).resolve()
    if folder == root or root in folder.parents:
        raise _inside_the_data(flag, folder, root)
    return folder


def _inside_the_data(flag: str, folder: Path, data_folder: Path) -> UserError:
    return UserError(f"{flag} {folder}: is inside the data folder {data_folder}; nothing is written into the data, "
                     "choose a folder outside it")


#: How :meth:`ImageIndex.describe` names what a folder scan ignored.
IGNORED_NAMES = {"special": "special (FIFO, socket or device, never opened)"}
#: Group-column values that mean "no group" (compared stripped and case-folded): ``NaN``, ``None``, ``NULL``, ...
MISSING_GROUP_VALUES = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>"})
#: What to do with an image whose group is missing (the ``missing_groups`` run setting).
MISSING_GROUP_CHOICES = ("refuse", "own")
#: The problem of a file whose name is not valid UTF-8 (run folders are UTF-8 CSV and JSON).
NAME_PROBLEM = "file name is not valid UTF-8 (rename it)"


def printable(name: str) -> str:
    """``name`` with the bytes of an undecodable (non-UTF-8) file name shown as ``\\xNN``: safe to print and to
    write into UTF-8 files."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # the surrogate escapes of bytes that are not UTF-8
        return False
    return True


def entry_kind(path: Path) -> str:
    """``"file"``, ``"special"`` (FIFO, socket, device: never opened), ``"broken"`` (a dangling symbolic link or a
    loop of them) or ``"gone"`` (vanished since the folder was listed), following symbolic links."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken" if os.path.islink(path) else "gone"
    except OSError:  # ELOOP and kin
        return "broken"
    return "file" if stat.S_ISREG(st.st_mode) else "special"


def _check_label_spellings(labels: Iterable[str], where: Path | str) -> None:
    """Refuse class names that are not UTF-8, or that differ only in case or Unicode form (``Benign`` and
    ``benign``; a full-width ``Ｂenign``): they are one class to a reader, two to the model."""
    labels = sorted(set(labels))
    odd = [printable(c) for c in labels if not _is_utf8(c)]
    if odd:
        raise UserError(f"{where}: class name {odd[0]!r} is not valid UTF-8; rename that class folder")
    spellings: dict[str, list[str]] = {}
    for c in labels:
        spellings.setdefault(unicodedata.normalize("NFKC", c).casefold(), []).append(c)
    clashes = [names for names in spellings.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(repr(c) for c in names) for names in clashes)
        raise UserError(f"{where}: class names {listed} differ only in case or Unicode form; give each class one "
                        "spelling (rename the class folders, or fix the label column)")


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _finish_index(rows: pd.DataFrame, classes: Sequence[str] | None, root: Path, source: str,
                  group_col: str | None, ignored: dict[str, int], where: Path | None = None) -> ImageIndex:
    where = where or root  # what error messages name: the folder tree, or the manifest file
    found = sorted(rows["label"].unique())
    _check_label_spellings([*found, *(classes or [])], where if classes is None else "--classes / " + str(where))
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise UserError(f"--classes {','.join(classes)}: {', '.join(repeated)} is listed twice; name each class once")
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UserError(
                f"{where}: labels {unknown} are not in the class list {classes}; add them to --classes or remove those images"
            )
    if len(classes) < 2:
        raise UserError(
            f"{where}: only one class ({', '.join(classes) or 'none'}) was found; classification needs at least two "
            "class folders (ROOT/<class>/*.png) or two labels in the manifest"
        )
    rows = rows.sort_values(["label", "relpath"], kind="stable").reset_index(drop=True)
    rows["target"] = rows["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    rows = rows.sort_values(["target", "relpath"], kind="stable").reset_index(drop=True)
    return ImageIndex(frame=rows[["path", "relpath", "label", "target", "group"]], classes=list(classes),
                      root=root, source=source, group_col=group_col, ignored=ignored)


def _unreadable_folder(exc: OSError) -> None:
    # os.walk skips a folder it cannot list without a word; its images would silently drop out of the data.
    raise UserError(f"{exc.filename}: cannot be read ({exc.strerror}); fix its permissions, or move it out of the "
                    "data folder")


def index_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageIndex:
    """Index a class-folder tree ``ROOT/<class>/<image>`` (sub-folders inside a class are searched too).

    Class order is ``classes`` when given, else sorted folder names. Empty class folders are skipped with a
    warning. Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"{root}: no such folder; pass --data with a folder that holds one sub-folder per class")
    if not root.is_dir():
        raise UserError(f"{root}: is a file, not a folder; pass a CSV with --manifest, or a class-folder tree with --data")
    ignored = {"hidden": 0, "non-image": 0}
    rows: list[tuple[str, str, str]] = []
    empty: list[Path] = []
    for class_dir in sorted(root.iterdir()):
        if _is_hidden(class_dir.name):
            ignored["hidden"] += 1
            continue
        if not class_dir.is_dir():
            ignored["non-image"] += 1
            continue
        n_before = len(rows)
        for dirpath, dirnames, filenames in os.walk(class_dir, onerror=_unreadable_folder):
            hidden = [d for d in dirnames if _is_hidden(d)]
            ignored["hidden"] += len(hidden)
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for name in sorted(filenames):
                if _is_hidden(name):
                    ignored["hidden"] += 1
                elif Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    path = Path(dirpath) / name
                    kind = entry_kind(path)
                    if kind == "special":  # a FIFO would block its reader forever: never opened, only counted
                        ignored["special"] = ignored.get("special", 0) + 1
                        continue
                    # A broken link or a vanished file stays in, under its own name: decoding reports it (or
                    # --skip-bad leaves it out) naming the link in the data, not its target.
                    real = str(path.resolve()) if kind == "file" else os.path.abspath(path)
                    rows.append((real, path.relative_to(root).as_posix(), class_dir.name))
                else:
                    ignored["non-image"] += 1
        if len(rows) == n_before:
            empty.append(class_dir)
    if empty and len({label for _, _, label in rows}) >= 2:  # otherwise the error below names them
        for class_dir in empty:
            warnings.warn(f"{class_dir}: class folder holds no images and is ignored", stacklevel=2)
    if not rows:
        raise UserError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} inside class sub-folders); "
            "lay the data out as ROOT/<class>/<image>"
        )
    frame = pd.DataFrame(rows, columns=["path", "relpath", "label"])
    frame["group"] = frame["relpath"]
    if empty and frame["label"].nunique() < 2 and classes is None:
        raise UserError(f"{root}: only one class ({frame['label'].iloc[0]}) holds images; the class folder(s) "
                        f"{', '.join(d.name for d in empty)} are empty. Classification needs images in at least two "
                        "class folders (ROOT/<class>/*.png)")
    return _finish_index(frame, classes, root.resolve(), "folder", None, ignored)


def index_manifest(manifest: str | Path, group_col: str | None = None,
                   classes: Sequence[str] | None = None, missing_groups: str = "refuse") -> ImageIndex:
    """Index a CSV manifest with columns ``path,label`` (+ optional ``group_col``); paths are relative to its folder
    (or absolute), and may point anywhere, e.g. into a shared read-only data set.

    A row whose group is empty or a missing-value spelling (:data:`MISSING_GROUP_VALUES`: ``NaN``, ``None``,
    ``NULL``, ``NA``, ...) is refused, or with ``missing_groups="own"`` becomes a group of its own.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    manifest = Path(manifest).expanduser()
    if manifest.is_dir():
        raise UserError(f"{manifest}: is a folder; pass --manifest the CSV file itself, or --data for a class-folder tree")
    if not manifest.is_file():
        raise UserError(f"{manifest}: no such manifest file; pass --manifest with a CSV that has columns path,label")
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{manifest}: not a readable CSV ({str(exc).splitlines()[0]}); save it as UTF-8 CSV with columns path,label") from None
    missing = [c for c in ("path", "label", *([group_col] if group_col else [])) if c not in table.columns]
    if missing:
        raise UserError(
            f"{manifest}: missing column(s) {missing} (has {list(table.columns)}); the manifest needs path,label"
            + (f" and {group_col}" if group_col else "")
        )
    if table.empty:
        raise UserError(f"{manifest}: the manifest has no rows; add one row per image")
    base = manifest.parent.resolve()
    abs_paths, names, problems = [], [], []
    for rel in table["path"]:
        listed = Path(os.path.normpath(base / rel))  # as written, ``..`` folded, symlinks kept
        kind = entry_kind(listed) if rel.strip() else "gone"
        path = listed.resolve() if kind == "file" else listed
        # The image's name in the run folder: its path from the manifest's folder, or its absolute path when it
        # lies elsewhere, so that folds and fingerprints do not depend on where the manifest is kept.
        names.append(listed.relative_to(base).as_posix() if base in listed.parents else listed.as_posix())
        if not rel.strip():
            problems.append("a row has an empty path")
        elif kind == "broken":
            problems.append(f"{rel!r} is a broken symbolic link (its target does not exist, or the links loop)")
        elif kind == "gone":
            problems.append(f"{rel!r} does not exist")
        elif kind == "special" and listed.is_dir():
            problems.append(f"{rel!r} is a folder")
        elif kind == "special":
            problems.append(f"{rel!r} is not a regular file (a FIFO, socket or device)")
        abs_paths.append(str(path))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{manifest}: {problems[0]}{more}; list image files, relative to {base} or absolute")
    # Compared as resolved files, not as text: 'a/x.png' and './a/x.png' are one image listed twice.
    resolved = pd.Series(abs_paths)
    repeats = resolved[resolved.duplicated()]
    if len(repeats):
        spellings = " and ".join(repr(p) for p in table["path"][(resolved == repeats.iloc[0]).to_numpy()])
        raise UserError(f"{manifest}: {repeats.nunique()} image(s) listed more than once, e.g. {spellings}; "
                        "keep one row per image")
    frame = pd.DataFrame({
        "path": abs_paths,
        "relpath": names,
        "label": table["label"].str.strip(),
    })
    if (frame["label"] == "").any():
        raise UserError(f"{manifest}: {int((frame['label'] == '').sum())} row(s) have an empty label; fill in the label column")
    frame["group"] = frame["relpath"]
    if group_col:
        groups = table[group_col].str.strip()
        missing = groups.str.casefold().isin(MISSING_GROUP_VALUES).to_numpy()
        if missing.any() and missing_groups != "own":
            first = int(np.flatnonzero(missing)[0])
            raise UserError(
                f"{manifest}: {int(missing.sum())} row(s) have an empty {group_col} or one that means missing "
                f"(NaN, None, NULL, NA), e.g. line {first + 2}: {table['path'].iloc[first]!r} with "
                f"{group_col} {table[group_col].iloc[first]!r}; fill in one id per patient, or pass "
                "--missing-groups own to make each such image a group of its own")
        # With "own", an image without a group is its own group, named after the image (as without --group-col).
        frame["group"] = np.where(missing, frame["relpath"].to_numpy(), groups.to_numpy())
    return _finish_index(frame, classes, base, "manifest", group_col, {}, where=manifest)


def load_index(data: str | Path | None = None, manifest: str | Path | None = None, group_col: str | None = None,
               classes: Sequence[str] | None = None, missing_groups: str = "refuse") -> ImageIndex:
    """Index either a class-folder tree (``data``) or a manifest (``manifest``); exactly one must be given.

    A folder that contains ``manifest.csv`` (as the phantom writes) is still read as a folder tree unless the
    manifest is named, so the two descriptions never disagree silently. ``missing_groups`` (``"refuse"`` or
    ``"own"``) is what becomes of manifest rows without a group (:func:`index_manifest`).
    """
    if (data is None) == (manifest is None):
        raise UserError("give exactly one of --data DIR (class-folder tree) or --manifest CSV")
    if missing_groups not in MISSING_GROUP_CHOICES:
        raise UserError(f"--missing-groups {missing_groups}: must be one of {', '.join(MISSING_GROUP_CHOICES)}")
    if manifest is not None:
        return index_manifest(manifest, group_col=group_col, classes=classes, missing_groups=missing_groups)
    if group_col:
        raise UserError(f"--group-col {group_col} needs --manifest (a folder tree has no group column)")
    return index_folder(data, classes=classes)


def _open_rgb(source: str | Path | io.BytesIO) -> Image.Image:
    """Decode one image at full resolution to RGB (the conversions of :func:`read_image`, without resizing)."""
    with Image.open(source) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            im = Image.fromarray(arr.astype(np.uint8), mode="L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im)
        rgb = im.convert("RGB")
        rgb.load()
        return rgb


@contextlib.contextmanager
def _bomb_is_error():
    """Turn Pillow's DecompressionBombWarning into an exception.

    Warning filters are process-wide (Python < 3.14), so decoding threads are covered when the calling thread
    sets this around the whole pool; the threads themselves never touch the filters.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


class NotARegularFile(OSError):
    """A path that is a FIFO, socket or device: opened without blocking, then refused unread."""


def read_file_bytes(path: str | Path) -> bytes:
    """The bytes of one image file. Anything but a regular file (a FIFO, a socket, a device) is refused with
    :class:`NotARegularFile` before a byte is read: opened non-blocking, a FIFO cannot hang the reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb", closefd=True) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
        return fh.read()


def file_digest(raw: bytes) -> bytes:
    """The content hash of one file's bytes (BLAKE2b, 16 bytes): what caches and fingerprints are keyed by."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def _read_problem(exc: BaseException, path: str | Path | None = None) -> str:
    """Why a file could not be read, as a short phrase without the path."""
    if isinstance(exc, NotARegularFile):
        return "not a regular file (a FIFO, socket or device); not read"
    if isinstance(exc, FileNotFoundError) and path is not None:
        return ("broken symbolic link (its target does not exist)" if os.path.islink(path)
                else "vanished (the file no longer exists)")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(exc, OSError) and exc.errno in (errno.ENXIO, errno.ENODEV):  # a socket, a device without driver
        return "not a regular file (a FIFO, socket or device); not read"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"more pixels than the decompression-bomb limit ({Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS})"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can read (wrong extension, or not an image at all)"
    text = str(exc).splitlines()[0].strip() if str(exc).strip() else ""
    return f"cannot read image ({text or type(exc).__name__})"


def _fix_for(problem: str) -> str:
    return "downscale it or remove it" if "decompression-bomb" in problem else "replace or remove the file"


def read_image(path: str | Path, image_size: int) -> np.ndarray:
    """Decode one image to RGB uint8 of shape (image_size, image_size, 3).

    Grayscale, 16-bit, palette, RGBA/LA, CMYK and 1-bit images are converted; 16-bit data is rescaled by its
    own range rather than clipped. Raises :class:`UserError` for unreadable files (FIFOs and other special
    files are never read) and decompression bombs.
    """
    path = Path(path)
    try:
        with _bomb_is_error():
            rgb = _open_rgb(io.BytesIO(read_file_bytes(path)))
        return np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8).copy()
    except Exception as exc:  # a broken file can make a Pillow plugin raise almost anything
        problem = _read_problem(exc, path)
        raise UserError(f"{printable(str(path))}: {problem}; {_fix_for(problem)}") from None


#: Columns of the per-image hashes (:func:`decode_index` with ``hash_size``, and :mod:`ussf_lib.data.audit`).
HASH_COLUMNS: tuple[str, ...] = ("sha256", "pixels", "phash")


def image_hash_row(raw: bytes, rgb: Image.Image, hash_size: int) -> tuple[str, str, str]:
    """(sha256 of the file's bytes, sha256 of the decoded RGB pixels, perceptual hash as hex) of one image.

    The perceptual hash is ``imagehash.phash`` with ``hash_size`` (``hash_size**2`` bits) of the full-resolution
    RGB image, so it does not depend on ``--image-size``.
    """
    import imagehash

    pixels = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    return hashlib.sha256(raw).hexdigest(), pixels, str(imagehash.phash(rgb, hash_size=hash_size))


def fingerprint(index: ImageIndex, digests: Sequence[bytes] | None = None) -> str:
    """A sha256 over the sorted file list, labels and file contents: two runs on the same data share it.

    ``digests`` (:func:`file_digest` per row of ``index``, as :attr:`Decoded.digests` gives them) are the
    contents of the bytes that were decoded, so the fingerprint is that of the pixels trained on even if a file
    is rewritten afterwards; without them each file is read here. Names are hashed as the bytes the file system
    holds (``os.fsencode``), so a name that is not UTF-8 hashes too.
    """
    if digests is None:
        digests = [file_digest(read_file_bytes(path)) for path in index.frame["path"]]
    digest = hashlib.sha256()
    for relpath, label, content in sorted(zip(index.frame["relpath"], index.frame["label"], digests)):
        digest.update(os.fsencode(relpath) + b"\0" + os.fsencode(label) + b"\0")
        digest.update(content)
    return digest.hexdigest()


def _cache_key(digests: Sequence[bytes | None], size: int, kind: str) -> str:
    """The cache key of images with these contents (in this order) at ``size``: a file rewritten in place, with
    the same size and time stamp, gets a new key. Unreadable files (``None``) count as such."""
    digest = hashlib.sha256(f"{kind}:{size}:{len(digests)}".encode())
    for content in digests:
        digest.update(content if content is not None else b"unreadable".ljust(16, b"\0"))
    return digest.hexdigest()[:24]


@dataclass
class Decoded:
    """What :func:`decode_index` returns.

    ``index`` holds the readable images only (all of them unless ``skip_bad``), ``images`` their uint8 pixels
    (row ``i`` is ``index.frame`` row ``i``), ``skipped`` the left-out files (columns ``path``, ``reason``;
    ``path`` relative to the data root) and ``hashes`` (columns :data:`HASH_COLUMNS`, rows as ``index``) when
    asked for with ``hash_size``. ``digests`` holds :func:`file_digest` of the bytes each image was decoded from
    (rows as ``index``), for :func:`fingerprint`.
    """

    index: ImageIndex
    images: np.ndarray | None
    skipped: pd.DataFrame
    hashes: pd.DataFrame | None = None
    digests: list[bytes] | None = None


def _pool_map(fn: Any, n: int, workers: int | None, progress: bool, desc: str) -> list:
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    # Pillow and hashlib release the GIL on large buffers, so threads scale without copying arrays between processes.
    with _bomb_is_error(), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, range(n)), total=n, desc=desc, unit="img", disable=not progress,
                         mininterval=2.0, leave=False))


def _scan(paths: Sequence[str], image_size: int | None, hash_size: int | None, workers: int | None,
          progress: bool) -> tuple[np.ndarray | None, list[tuple[str, str, str] | None] | None, list[bytes | None],
                               dict[int, str]]:
    """One pass over the files: each file's bytes read once, hashed (:func:`file_digest`) and decoded from those
    very bytes into resized pixels and/or hashes; a problem phrase for every unreadable file."""
    out = np.zeros((len(paths), image_size, image_size, 3), dtype=np.uint8) if image_size else None
    hashes: list[tuple[str, str, str] | None] | None = [None] * len(paths) if hash_size else None
    digests: list[bytes | None] = [None] * len(paths)

    def _one(i: int) -> str | None:
        try:
            raw = read_file_bytes(paths[i])
            digests[i] = file_digest(raw)
            if out is None and hashes is None:
                return None
            rgb = _open_rgb(io.BytesIO(raw))
            if out is not None:
                out[i] = np.asarray(rgb.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)
            if hashes is not None:
                hashes[i] = image_hash_row(raw, rgb, hash_size)
        except Exception as exc:  # a broken file can make a Pillow plugin raise almost anything
            return _read_problem(exc, paths[i])
        return None

    results = _pool_map(_one, len(paths), workers, progress, "decode")
    return out, hashes, digests, {i: e for i, e in enumerate(results) if e}


def _digest_files(paths: Sequence[str], workers: int | None, progress: bool
                  ) -> tuple[list[bytes | None], dict[int, str]]:
    """:func:`file_digest` of every file (``None`` and a problem phrase for those that cannot be read): the cache
    key's input. Reading and hashing costs far less than decoding."""
    digests: list[bytes | None] = [None] * len(paths)

    def _one(i: int) -> str | None:
        try:
            digests[i] = file_digest(read_file_bytes(paths[i]))
        except OSError as exc:
            return _read_problem(exc, paths[i])
        return None

    results = _pool_map(_one, len(paths), workers, progress, "hash")
    return digests, {i: e for i, e in enumerate(results) if e}


def _cache_folder(index: ImageIndex, cache_dir: str | Path) -> Path:
    cache_dir = index.check_outside(cache_dir, "--cache-dir")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"--cache-dir {cache_dir}: is a file, not a folder; choose a folder for the decoded images")
    return cache_dir


def _read_pixel_cache(img_file: Path, n: int, bad: dict[int, str]) -> np.ndarray | None:
    """The cached pixels (memory-mapped), adding the files it found unreadable to ``bad``; ``None`` if damaged."""
    try:
        images = np.load(img_file, mmap_mode="r")
        meta_file = img_file.with_suffix(".json")
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        if images.shape[0] != n:
            raise ValueError(f"{images.shape[0]} images for {n} files")
        bad.update({int(i): why for i, why in meta.get("bad", {}).items()})
        return images
    except (ValueError, OSError, EOFError) as exc:
        # The cache is ours (never the user's data): a damaged one (a disk filled up mid-write, a copy cut
        # short) is decoded again and replaced, not trusted or fatal.
        warnings.warn(f"{img_file}: damaged cache ({exc}); decoding the images again", stacklevel=3)
        return None


#: A cache's temporary file older than this was left by a killed process (a write takes seconds to minutes).
STALE_CACHE_TEMP_SECONDS = 3600


def _keep_in_cache(target: Path, write: Any) -> None:
    """Write one cache file whole with ``write(file)``. The cache only saves time, so a refused write (a full disk,
    a read-only folder) is a warning and the run goes on; temporary files of killed writers are removed."""
    from ussf_lib.files import TEMP_GLOB, write_error, writing

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for stale in target.parent.glob(TEMP_GLOB):  # several processes may fill one cache: only old ones go
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > STALE_CACHE_TEMP_SECONDS:
                    stale.unlink()
        with writing(target) as tmp:
            with open(tmp, "wb") as fh:
                write(fh)
    except (OSError, UserError) as exc:
        problem = str(exc) if isinstance(exc, UserError) else str(write_error(target, exc))
        warnings.warn(f"{problem.split('; ')[0]}; the decoded images are not kept in --cache-dir this time",
                      stacklevel=3)


def _write_pixel_cache(img_file: Path, index: ImageIndex, images: np.ndarray, image_size: int,
                       bad: dict[int, str]) -> None:
    # The sidecar goes first and both are renamed into place whole, so a reader (another process filling the same
    # cache) never finds the pixels without it or half a file.
    sidecar = json.dumps({"root": printable(str(index.root)), "n": len(images), "image_size": image_size,
                          "bad": {str(i): why for i, why in sorted(bad.items())}})
    _keep_in_cache(img_file.with_suffix(".json"), lambda fh: fh.write(sidecar.encode()))
    _keep_in_cache(img_file, lambda fh: np.save(fh, images))


def _write_hash_cache(hash_file: Path, hashes: list, bad: dict[int, str]) -> None:
    table = pd.DataFrame([h or ("", "", "") for h in hashes], columns=list(HASH_COLUMNS))
    table["problem"] = [bad.get(i, "") for i in range(len(hashes))]
    _keep_in_cache(hash_file, lambda fh: fh.write(table.to_csv(index=False).encode()))


def _refuse_unreadable(names: Sequence[str], bad: dict[int, str]) -> None:
    """Every bad file in one message, before any training starts, so one pass fixes them all."""
    items = [f"{printable(str(names[i]))}: {bad[i]}" for i in sorted(bad)]
    listing = " | ".join(items[:5]) + (f" | ... {len(items) - 5} more" if len(items) > 5 else "")
    raise UserError(f"{len(items)} unreadable image(s): {listing}; replace or remove them, "
                    "or pass --skip-bad to leave them out")


def decode_index(index: ImageIndex, image_size: int | None, cache_dir: str | Path | None = None,
                 workers: int | None = None, progress: bool = True, skip_bad: bool = False,
                 hash_size: int | None = None) -> Decoded:
    """Decode every image of ``index`` once: uint8 pixels at ``image_size`` and, with ``hash_size``, hashes.

    Every unreadable file (corrupt, truncated, not an image, decompression bomb, a broken symbolic link, a file
    that vanished, a FIFO or other special file, a name that is not UTF-8) is found in one pass. Without
    ``skip_bad`` they are all listed in one :class:`UserError`, named as in the data (a link, not its target);
    with it they are left out of the returned index and listed in ``skipped``. ``image_size=None`` computes hashes
    only. With ``cache_dir`` both the pixels (``images_<key>.npy``, returned memory-mapped) and the hashes
    (``hashes_<key>.csv``) are kept there, keyed by the files' contents (:func:`file_digest`, in order) and
    ``image_size`` / ``hash_size``; ``cache_dir`` must be outside the data. A file rewritten in place misses the
    cache whatever its size and time stamp.
    """
    paths = list(index.frame["path"])
    names = [str(p) for p in index.listed_paths()]
    n = len(paths)
    # Run folders are UTF-8 CSV and JSON: a name that is not UTF-8 cannot be written there.
    name_bad = {i: NAME_PROBLEM for i, rel in enumerate(index.frame["relpath"]) if not _is_utf8(rel)}
    img_file = hash_file = None
    digests: list[bytes | None] | None = None
    bad: dict[int, str] = {}  # problems found while reading and decoding (what the cache remembers)
    if cache_dir is not None and (image_size or hash_size):
        folder = _cache_folder(index, cache_dir)
        digests, read_bad = _digest_files(paths, workers, progress)
        bad.update(read_bad)
        img_file = folder / f"images_{_cache_key(digests, image_size, 'v2')}.npy" if image_size else None
        hash_file = folder / f"hashes_{_cache_key(digests, hash_size, 'h2')}.csv" if hash_size else None
    images: np.ndarray | None = None
    hashes: list | None = None
    if img_file is not None and img_file.is_file():
        images = _read_pixel_cache(img_file, n, bad)
    if hash_file is not None and hash_file.is_file():
        table = pd.read_csv(hash_file, dtype=str, keep_default_na=False)
        hashes = [tuple(r) if r[0] else None for r in table[list(HASH_COLUMNS)].itertuples(index=False)]
        bad.update({i: why for i, why in enumerate(table["problem"]) if why})
    need_pixels = bool(image_size) and images is None
    need_hashes = bool(hash_size) and hashes is None
    if need_pixels or need_hashes or digests is None:
        new_images, new_hashes, new_digests, new_bad = _scan(paths, image_size if need_pixels else None,
                                                             hash_size if need_hashes else None, workers, progress)
        if digests is not None:  # the cache was chosen by the contents hashed before: they must not have changed
            changed = [i for i, (a, b) in enumerate(zip(digests, new_digests)) if a and b and a != b]
            if changed:
                raise UserError(f"{printable(names[changed[0]])}: changed while it was being read ({len(changed)} "
                                "file(s) did); run again once nothing is writing into the data")
        digests = [a or b for a, b in zip(new_digests, digests)] if digests is not None else new_digests
        bad.update(new_bad)
        images = new_images if need_pixels else images
        hashes = new_hashes if need_hashes else hashes
    if (bad or name_bad) and not skip_bad:
        _refuse_unreadable(names, {**bad, **name_bad})
    if need_pixels and img_file is not None:
        _write_pixel_cache(img_file, index, images, image_size, bad)
    if need_hashes and hash_file is not None:
        _write_hash_cache(hash_file, hashes, bad)
    bad = {**bad, **name_bad}
    keep = np.ones(n, dtype=bool)
    keep[list(bad)] = False
    skipped = pd.DataFrame({"path": [printable(index.frame["relpath"].iloc[i]) for i in sorted(bad)],
                            "reason": [bad[i] for i in sorted(bad)]}, columns=["path", "reason"])
    hash_frame = None
    if hashes is not None:
        hash_frame = pd.DataFrame([h for h, k in zip(hashes, keep) if k], columns=list(HASH_COLUMNS))
    kept_digests = [d for d, k in zip(digests, keep) if k]
    if bad:
        index = index.subset(keep)
        if images is not None:
            images = np.ascontiguousarray(images[keep])
    return Decoded(index=index, images=images, skipped=skipped, hashes=hash_frame, digests=kept_digests)


def decode_images(index: ImageIndex, image_size: int, cache_dir: str | Path | None = None,
                  workers: int | None = None, progress: bool = True) -> np.ndarray:
    """Decode every image of ``index`` once into a uint8 array of shape (N, image_size, image_size, 3).

    With ``cache_dir`` the array is stored there as a ``.npy`` file keyed by the files' contents and
    ``image_size`` and returned memory-mapped, so a later run, fold or sweep on the same data starts without
    decoding. ``cache_dir`` must not be inside the data folder. All unreadable files are listed in one
    :class:`UserError`; :func:`decode_index` can skip them instead (``skip_bad``) and also hash the images.
    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    return decode_index(index, image_size, cache_dir=cache_dir, workers=workers, progress=progress).images


def normalize_batch(batch: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor,
                    channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC batch (already on the training device) -> float32 NCHW, scaled to [0, 1] then standardized.

    ``mean`` and ``std`` may be float32 tensors already on the device (:func:`normalization_on`), which saves
    two host-to-device copies per batch in a training loop. Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def normalization_on(device: torch.device, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 tensors on ``device``, made once for every :func:`normalize_batch` of a loop."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def resolve_normalization(name_or_values: str | Iterable[Sequence[float]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"paper"`` or ``"imagenet"`` (see :data:`ussf_lib.paper.NORMALIZATIONS`), or an explicit ``(mean, std)``."""
    if isinstance(name_or_values, str):
        if name_or_values not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {name_or_values!r}; use one of {sorted(NORMALIZATIONS)}")
        return NORMALIZATIONS[name_or_values]
    mean, std = name_or_values
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)

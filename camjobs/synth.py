"""Synthetic dermoscopy datasets in the real HAM10000 file layout.

Used by ``camjobs synth`` and ``camjobs demo``: a few hundred images are generated,
a small classifier is trained on them, and its CAM boxes are compared with the
boxes of the synthetic lesion masks (and with a centre-box baseline).

Output layout (exactly the files and names of the HAM10000 release)::

    out_dir/
      HAM10000_metadata.csv                     lesion_id,image_id,dx,dx_type,age,sex,localization
      HAM10000_images_part_1/ISIC_0024306.jpg   600x450 RGB JPEG (first half of the ids)
      HAM10000_images_part_2/ISIC_00xxxxx.jpg   (second half of the ids)
      HAM10000_segmentations_lesion_tschandl/ISIC_0024306_segmentation.png   8-bit 0/255

As in the real metadata file, rows are grouped by ``dx`` (real order: bkl, nv, df,
mel, vasc, bcc, akiec) and by lesion, image ids are not in row order, and some
lesions have 2-3 images (same lesion, different view: placement, rotation, zoom,
background, hairs).

Each image is drawn by ``camjobs.synth_image.render_image`` (the lesion and its confounders);
this module plans the rows and writes the files. Deterministic for a seed.

This module must not import ray or torch.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from camjobs.config import SynthLayout
from camjobs.layouts import MASK_SUFFIX
from camjobs.synth_image import HAM10000_CLASSES, render_image, seed_words

__all__ = [
    "HAM10000_CLASSES",
    "DEFAULT_CLASSES",
    "SUPPORTED_LAYOUTS",
    "METADATA_COLUMNS",
    "LOCALIZATIONS",
    "FIRST_IMAGE_NUMBER",
    "SynthSummary",
    "synth_dataset",
]

DEFAULT_CLASSES = ("mel", "nv", "bkl")
SUPPORTED_LAYOUTS = SynthLayout.values()
METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
FIRST_IMAGE_NUMBER = 24306  # ISIC_0024306 is the first image id of HAM10000

METADATA_FILE = "HAM10000_metadata.csv"
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
MASK_DIR = "HAM10000_segmentations_lesion_tschandl"
JPEG_QUALITY = 90

# Row order of dx groups in the real HAM10000_metadata.csv.
_REAL_DX_ORDER = ("bkl", "nv", "df", "mel", "vasc", "bcc", "akiec")

# Real localization vocabulary with its HAM10000 frequencies (used as weights).
LOCALIZATIONS = (
    "back",
    "lower extremity",
    "trunk",
    "upper extremity",
    "abdomen",
    "face",
    "chest",
    "foot",
    "unknown",
    "neck",
    "scalp",
    "hand",
    "ear",
    "genital",
    "acral",
)
_LOC_WEIGHTS = np.array([2192, 2077, 1404, 1118, 1022, 745, 407, 319, 234, 168, 128, 90, 56, 48, 7], dtype=float)
_DX_TYPES = ("histo", "follow_up", "consensus", "confocal")
# Approximate per-class dx_type mix of the real set (mel, bcc, akiec are histo-confirmed).
_DX_TYPE_P = {
    "akiec": (1.0, 0.0, 0.0, 0.0),
    "bcc": (1.0, 0.0, 0.0, 0.0),
    "bkl": (0.62, 0.0, 0.30, 0.08),
    "df": (0.65, 0.0, 0.35, 0.0),
    "mel": (1.0, 0.0, 0.0, 0.0),
    "nv": (0.33, 0.55, 0.11, 0.01),
    "vasc": (0.55, 0.0, 0.45, 0.0),
}
# (mean, std) of patient age per class, roughly as in HAM10000.
_AGE = {
    "akiec": (67, 12),
    "bcc": (67, 13),
    "bkl": (64, 13),
    "df": (53, 15),
    "mel": (61, 15),
    "nv": (47, 16),
    "vasc": (52, 20),
}
# Images per lesion: 10,015 images of 7,470 lesions in the real set (mean ~1.34).
_VIEWS_P = (0.74, 0.18, 0.08)


# --------------------------------------------------------------------------- summary
@dataclass
class SynthSummary:
    out_dir: Path
    n: int
    class_counts: dict[str, int]
    metadata_csv: Path
    layout: str = "ham10000"
    width: int = 600
    height: int = 450
    image_dirs: tuple[Path, ...] = field(default_factory=tuple)
    mask_dir: Path | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- metadata plan
def _plan(n: int, seed: int, classes: Sequence[str]) -> list[dict]:
    """Rows of the metadata CSV in file order; each row also carries its render seeds."""
    rng = np.random.default_rng([*seed_words(seed), 0])
    lesions: list[dict] = []
    counts = {c: 0 for c in classes}
    total = 0
    while total < n:
        k = int(rng.choice(3, p=_VIEWS_P)) + 1
        k = min(k, n - total)
        # balanced-ish: the class with the fewest images so far (random tie break)
        m = min(counts.values())
        cands = [c for c in classes if counts[c] == m]
        dx = cands[int(rng.integers(len(cands)))]
        counts[dx] += k
        total += k
        mu, sd = _AGE[dx]
        age = float(np.clip(5 * round(rng.normal(mu, sd) / 5), 0, 85))
        u = rng.random()
        sex = "male" if u < 0.54 else "female" if u < 0.995 else "unknown"
        loc = LOCALIZATIONS[int(rng.choice(len(LOCALIZATIONS), p=_LOC_WEIGHTS / _LOC_WEIGHTS.sum()))]
        dx_type = _DX_TYPES[int(rng.choice(4, p=_DX_TYPE_P[dx]))]
        lesions.append(dict(dx=dx, k=k, age=age, sex=sex, localization=loc, dx_type=dx_type))
    n_les = len(lesions)
    lesion_nums = rng.choice(max(10_000, 2 * n_les), size=n_les, replace=False)
    image_nums = FIRST_IMAGE_NUMBER + rng.permutation(n)
    order = {d: i for i, d in enumerate(_REAL_DX_ORDER)}
    lesion_order = sorted(range(n_les), key=lambda i: (order[lesions[i]["dx"]], i))
    rows: list[dict] = []
    j = 0
    for li in lesion_order:
        les = lesions[li]
        for _ in range(les["k"]):
            num = int(image_nums[j])
            j += 1
            rows.append(
                dict(
                    lesion_id=f"HAM_{int(lesion_nums[li]):07d}",
                    image_id=f"ISIC_{num:07d}",
                    dx=les["dx"],
                    dx_type=les["dx_type"],
                    age=les["age"],
                    sex=les["sex"],
                    localization=les["localization"],
                    _image_num=num,
                    _lesion_num=int(lesion_nums[li]),
                )
            )
    return rows


# --------------------------------------------------------------------------- dataset
def _checked(layout: str, n: int, classes: Sequence[str], width: int, height: int) -> tuple[str, ...]:
    """The classes as a tuple, once every argument of synth_dataset is known to be usable."""
    if layout not in SUPPORTED_LAYOUTS:
        raise ValueError(f"unsupported layout {layout!r}; supported layouts: {', '.join(SUPPORTED_LAYOUTS)}")
    classes = tuple(classes)
    if not classes:
        raise ValueError("classes must not be empty")
    bad = [c for c in classes if c not in HAM10000_CLASSES]
    if bad:
        raise ValueError(f"unknown classes {bad}; HAM10000 dx codes are {HAM10000_CLASSES}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate classes in {classes}")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if int(width) < 32 or int(height) < 32:
        raise ValueError(f"width and height must be >= 32, got {width}x{height}")
    return classes


def _write_metadata(csv_path: Path, rows: list[dict]) -> None:
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(METADATA_COLUMNS)
        for r in rows:
            wr.writerow(
                [r["lesion_id"], r["image_id"], r["dx"], r["dx_type"], repr(r["age"]), r["sex"], r["localization"]]
            )


def _write_image(image_id: str, rgb: np.ndarray, mask: np.ndarray, image_dir: Path, mask_dir: Path) -> None:
    """<image_dir>/<image_id>.jpg (quality JPEG_QUALITY) and <mask_dir>/<image_id>_segmentation.png."""
    ok, jpg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"JPEG encoding failed for {image_id}")
    (image_dir / f"{image_id}.jpg").write_bytes(jpg.tobytes())
    ok, png = cv2.imencode(".png", mask)
    if not ok:  # pragma: no cover
        raise RuntimeError(f"PNG encoding failed for {image_id}")
    (mask_dir / f"{image_id}{MASK_SUFFIX}.png").write_bytes(png.tobytes())


def _write_images(
    rows: list[dict], seed: int, size: tuple[int, int], img_dirs: tuple[Path, ...], mask_dir: Path, progress: bool
) -> None:
    """Render and write every row's image and mask, in image-number order."""
    width, height = size
    # first half of the image ids in part_1, the rest in part_2 (as in the real release)
    split = FIRST_IMAGE_NUMBER + (len(rows) + 1) // 2
    todo = sorted(rows, key=lambda r: r["_image_num"])
    it = todo
    if progress:
        from tqdm import tqdm

        it = tqdm(todo, desc="synth", unit="img")
    for r in it:
        rgb, mask = render_image(
            r["dx"],
            seed=(*seed_words(seed), 1, r["_image_num"]),
            lesion_seed=(*seed_words(seed), 2, r["_lesion_num"]),
            width=width,
            height=height,
        )
        _write_image(r["image_id"], rgb, mask, img_dirs[0] if r["_image_num"] < split else img_dirs[1], mask_dir)


def synth_dataset(
    out_dir: str | Path,
    *,
    layout: str = "ham10000",
    n: int = 200,
    seed: int = 0,
    classes: Sequence[str] = DEFAULT_CLASSES,
    width: int = 600,
    height: int = 450,
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic dermoscopy dataset of ``n`` images in the given ``layout``.

    Only ``layout="ham10000"`` (the real HAM10000 file layout, see the module
    docstring) is supported.  Deterministic for ``seed``: the same seed gives a
    byte-identical metadata CSV and identical image/mask pixels.
    """
    classes = _checked(layout, n, classes, width, height)
    n, width, height = int(n), int(width), int(height)

    t0 = time.perf_counter()
    out = Path(out_dir)
    img_dirs = tuple(out / d for d in IMAGE_DIRS)
    mask_dir = out / MASK_DIR
    for d in (*img_dirs, mask_dir):
        d.mkdir(parents=True, exist_ok=True)

    rows = _plan(n, seed, classes)
    csv_path = out / METADATA_FILE
    _write_metadata(csv_path, rows)
    _write_images(rows, seed, (width, height), img_dirs, mask_dir, progress)

    class_counts = {c: 0 for c in classes}
    for r in rows:
        class_counts[r["dx"]] += 1
    return SynthSummary(
        out_dir=out,
        n=n,
        class_counts=class_counts,
        metadata_csv=csv_path,
        layout=layout,
        width=width,
        height=height,
        image_dirs=img_dirs,
        mask_dir=mask_dir,
        seconds=time.perf_counter() - t0,
    )

"""Write tiny datasets in the real public dermoscopy download layouts, for tests.

Each ``make_*`` function writes real (small) JPEG/PNG files and CSVs with the real column names
into ``root`` and returns a ``FixtureInfo`` describing what a correct reader must find. Images
show a dark elliptical "lesion" on a skin-coloured background; where a mask is written it is
exactly that ellipse (255 inside, 0 outside), so localization tests can score against it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

HAM10000_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
ISIC2017_CLASSES = ["melanoma", "nevus", "seborrheic_keratosis"]
ISIC2018_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC2019_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
ISIC2020_CLASSES = ["benign", "malignant"]


def noise_jpegs(folder: Path, count: int, size: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """`count` JPEGs of random pixels (height, width = size) named img000.jpg...: a "folder" layout."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.jpg")
    return folder


@dataclass
class FixtureInfo:
    root: Path
    layout: str
    classes: list[str]
    labels: dict[str, str | None]  # image_id -> expected label, for every image written
    paths: dict[str, Path]  # image_id -> image file
    masks: dict[str, Path] = field(default_factory=dict)  # image_id -> mask file, where one was written
    decoys: list[Path] = field(default_factory=list)  # files a reader must NOT list as images

    @property
    def image_ids(self) -> list[str]:
        return sorted(self.labels)


def _ellipse(size: tuple[int, int], seed: int) -> tuple[tuple[int, int], tuple[int, int], float]:
    rng = np.random.default_rng(seed)
    w, h = size
    centre = (int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65)))
    axes = (max(2, int(w * rng.uniform(0.12, 0.25))), max(2, int(h * rng.uniform(0.12, 0.25))))
    return centre, axes, float(rng.uniform(0, 180))


def lesion_mask(size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """uint8 HxW mask, 255 on the lesion ellipse of image `seed`."""
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    centre, axes, angle = _ellipse(size, seed)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 255, thickness=-1)
    return mask


def lesion_image(size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """uint8 HxWx3 BGR image: noisy skin tone with a dark brown lesion where lesion_mask is set."""
    w, h = size
    rng = np.random.default_rng(seed + 10_000)
    image = np.empty((h, w, 3), np.float32)
    image[:] = (150, 170, 215)  # BGR skin tone
    image[lesion_mask(size, seed) > 0] = (40, 60, 100)  # dark brown lesion
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """Encode lesion_image as the file's extension says (.jpg/.jpeg/.png, any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode("." + path.suffix.lower().lstrip(".").replace("jpeg", "jpg"), lesion_image(size, seed))
    assert ok, path
    path.write_bytes(data.tobytes())  # not cv2.imwrite: it mishandles non-ASCII paths on some platforms
    return path


def write_mask(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", lesion_mask(size, seed))
    assert ok, path
    path.write_bytes(data.tobytes())
    return path


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def isic_id(number: int) -> str:
    return f"ISIC_{number:07d}"


def _one_hot(classes: list[str], label: str) -> list[str]:
    return ["1.0" if name == label else "0.0" for name in classes]


def make_ham10000(
    root: Path,
    n: int = 6,
    *,
    n_masks: int = 2,
    size=(64, 48),
    dataset_column: bool = False,
    part_dirs=("HAM10000_images_part_1", "HAM10000_images_part_2"),
) -> FixtureInfo:
    """HAM10000 (Harvard Dataverse): images split over part_1/part_2, metadata CSV, tschandl masks."""
    root = Path(root)
    info = FixtureInfo(root, "ham10000", HAM10000_CLASSES, {}, {})
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"] + (
        ["dataset"] if dataset_column else []
    )
    rows = []
    for i in range(n):
        image_id, dx = isic_id(24306 + i), HAM10000_CLASSES[i % len(HAM10000_CLASSES)]
        info.labels[image_id] = dx
        info.paths[image_id] = write_image(root / part_dirs[i % len(part_dirs)] / f"{image_id}.jpg", size, i)
        if i < n_masks:
            info.masks[image_id] = write_mask(
                root / "HAM10000_segmentations_lesion_tschandl" / f"{image_id}_segmentation.png", size, i
            )
        rows.append(
            [f"HAM_{i:07d}", image_id, dx, "histo", 45.0 + i, "male" if i % 2 else "female", "back"]
            + (["vidir_modern"] if dataset_column else [])
        )
    write_csv(root / "HAM10000_metadata.csv", header, rows)
    return info


def make_isic2017(
    root: Path, n: int = 6, *, split: str = "Training", n_masks: int | None = None, size=(64, 48), start: int = 0
) -> FixtureInfo:
    """ISIC 2017: <split>_Data/ (with a _superpixels.png decoy per image), Part1 masks, Part3 CSV.

    split is "Training", "Validation" or "Test_v2"; call it several times on one root for several
    splits (use `start` to keep the ids distinct). Labels cycle melanoma, seborrheic_keratosis, nevus.
    """
    root = Path(root)
    info = FixtureInfo(root, "isic2017", ISIC2017_CLASSES, {}, {})
    n_masks = n if n_masks is None else n_masks
    flags = {"melanoma": (1, 0), "seborrheic_keratosis": (0, 1), "nevus": (0, 0)}
    rows = []
    for i in range(start, start + n):
        image_id, label = isic_id(i), ["melanoma", "seborrheic_keratosis", "nevus"][i % 3]
        info.labels[image_id] = label
        info.paths[image_id] = write_image(root / f"ISIC-2017_{split}_Data" / f"{image_id}.jpg", size, i)
        superpixels = root / f"ISIC-2017_{split}_Data" / f"{image_id}_superpixels.png"
        info.decoys.append(write_mask(superpixels, size, i))
        if i - start < n_masks:
            info.masks[image_id] = write_mask(
                root / f"ISIC-2017_{split}_Part1_GroundTruth" / f"{image_id}_segmentation.png", size, i
            )
        mel, sk = flags[label]
        rows.append(
            [image_id, f"{mel}.0" if i % 2 else mel, f"{sk}.0" if i % 2 else sk]
        )  # the real files mix 0 and 0.0
    write_csv(root / f"ISIC-2017_{split}_Part3_GroundTruth.csv", ["image_id", "melanoma", "seborrheic_keratosis"], rows)
    return info


def make_isic2018(
    root: Path, n: int = 7, *, gt_in_folder: bool = False, n_masks: int = 2, size=(64, 48)
) -> FixtureInfo:
    """ISIC 2018 Task 3 training input + one-hot ground truth (at root or in its folder), Task 1 masks."""
    root = Path(root)
    info = FixtureInfo(root, "isic2018", ISIC2018_CLASSES, {}, {})
    input_dir = root / "ISIC2018_Task3_Training_Input"
    rows = []
    for i in range(n):
        image_id, label = isic_id(24306 + i), ISIC2018_CLASSES[i % len(ISIC2018_CLASSES)]
        info.labels[image_id] = label
        info.paths[image_id] = write_image(input_dir / f"{image_id}.jpg", size, i)
        if i < n_masks:
            info.masks[image_id] = write_mask(
                root / "ISIC2018_Task1_Training_GroundTruth" / f"{image_id}_segmentation.png", size, i
            )
        rows.append([image_id, *_one_hot(ISIC2018_CLASSES, label)])
    for name in ("ATTRIBUTION.txt", "LICENSE.txt"):
        (input_dir / name).write_text("CC-BY-NC 4.0\n")
        info.decoys.append(input_dir / name)
    gt = "ISIC2018_Task3_Training_GroundTruth"
    write_csv(root / gt / f"{gt}.csv" if gt_in_folder else root / f"{gt}.csv", ["image", *ISIC2018_CLASSES], rows)
    return info


def make_isic2019(root: Path, n: int = 9, *, metadata: bool = True, size=(64, 48)) -> FixtureInfo:
    """ISIC 2019 training input + one-hot ground truth; every third id ends in _downsampled, like the real set."""
    root = Path(root)
    info = FixtureInfo(root, "isic2019", ISIC2019_CLASSES, {}, {})
    gt_rows, meta_rows = [], []
    for i in range(n):
        image_id = isic_id(i) + ("_downsampled" if i % 3 == 0 else "")
        label = ISIC2019_CLASSES[i % len(ISIC2019_CLASSES)]
        info.labels[image_id] = label
        info.paths[image_id] = write_image(root / "ISIC_2019_Training_Input" / f"{image_id}.jpg", size, i)
        gt_rows.append([image_id, *_one_hot(ISIC2019_CLASSES, label)])
        meta_rows.append([image_id, 55, "anterior torso", f"BCN_{i:07d}" if i % 2 else "", "male"])
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ["image", *ISIC2019_CLASSES], gt_rows)
    if metadata:
        write_csv(
            root / "ISIC_2019_Training_Metadata.csv",
            ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
            meta_rows,
        )
    return info


def make_isic2020(root: Path, n: int = 4, *, v2: bool = False, size=(64, 48)) -> FixtureInfo:
    """ISIC 2020 train/ JPEGs + ground truth CSV (v2 adds lesion_id); every third image malignant."""
    root = Path(root)
    info = FixtureInfo(root, "isic2020", ISIC2020_CLASSES, {}, {})
    header = [
        "image_name",
        "patient_id",
        *(["lesion_id"] if v2 else []),
        "sex",
        "age_approx",
        "anatom_site_general_challenge",
        "diagnosis",
        "benign_malignant",
        "target",
    ]
    rows = []
    for i in range(n):
        image_id, malignant = isic_id(2637011 + i), i % 3 == 2
        info.labels[image_id] = "malignant" if malignant else "benign"
        info.paths[image_id] = write_image(root / "train" / f"{image_id}.jpg", size, i)
        rows.append(
            [
                image_id,
                f"IP_{7279968 + i}",
                *([f"IL_{7972535 + i}"] if v2 else []),
                "male",
                45.0,
                "head/neck",
                "melanoma" if malignant else "unknown",
                info.labels[image_id],
                int(malignant),
            ]
        )
    write_csv(
        root / ("ISIC_2020_Training_GroundTruth_v2.csv" if v2 else "ISIC_2020_Training_GroundTruth.csv"), header, rows
    )
    return info


# isic-cli's metadata.csv: isic_id, attribution, copyright_license, then the images' metadata fields sorted.
ISIC_ARCHIVE_HEADER = ["isic_id", "attribution", "copyright_license"] + sorted(
    [
        "age_approx",
        "anatom_site_general",
        "benign_malignant",
        "concomitant_biopsy",
        *(f"diagnosis_{level}" for level in range(1, 6)),
        "diagnosis_confirm_type",
        "image_type",
        "lesion_id",
        "melanocytic",
        "patient_id",
        "sex",
    ]
)
# ISIC 2017's three classes in the Archive's hierarchical diagnosis (levels 1-3) and its legacy benign_malignant.
ISIC_ARCHIVE_DIAGNOSES = {
    "melanoma": ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive", "malignant"),
    "seborrheic_keratosis": ("Benign", "Benign epidermal proliferations", "Seborrheic keratosis", "benign"),
    "nevus": ("Benign", "Benign melanocytic proliferations", "Nevus", "benign"),
}


def make_isic_archive(root: Path, photos: Path, *, copies: int = 1) -> FixtureInfo:
    """What `isic image download DIR` writes, from the real photographs of an ISIC 2017 folder (isic2017-mini).

    Flat ISIC_<id>.jpg files, metadata.csv with isic-cli's columns, attribution.txt, licenses/<license>.txt,
    plus a hidden partial download (.isic-partial.<pid>.<name>) as a decoy. Each photograph i of
    the 2017 ground truth appears `copies` times under ids ISIC_10<i><copy>, like one lesion imaged
    on several visits: photographs 0-3 carry lesion_id IL_700000<i>; 4 and 5 none; patient_id
    IP_800000<i // 2>, but none for 5. One more image (ISIC_1099999, photograph 0's bytes) has no
    diagnosis and no ids. Labels (info.labels) are diagnosis_3's.
    """
    root = Path(root)
    info = FixtureInfo(root, "isic-archive", sorted(d[2] for d in ISIC_ARCHIVE_DIAGNOSES.values()), {}, {})
    truth = list(csv.DictReader((photos / "ISIC-2017_Training_Part3_GroundTruth.csv").open()))
    rows, licenses = [], {}
    for i, row in enumerate(truth):
        label = (
            "melanoma"
            if float(row["melanoma"])
            else "seborrheic_keratosis"
            if float(row["seborrheic_keratosis"])
            else "nevus"
        )
        diagnosis = ISIC_ARCHIVE_DIAGNOSES[label]
        for copy in range(copies):
            image_id = f"ISIC_10{i:02d}{copy:03d}"
            rows.append(
                _archive_row(
                    image_id,
                    i,
                    diagnosis,
                    lesion=f"IL_{7000000 + i}" if i < 4 else "",
                    patient=f"IP_{8000000 + i // 2}" if i != 5 else "",
                )
            )
            info.labels[image_id] = diagnosis[2]
            info.paths[image_id] = root / f"{image_id}.jpg"
            info.paths[image_id].parent.mkdir(parents=True, exist_ok=True)
            info.paths[image_id].write_bytes(
                (photos / "ISIC-2017_Training_Data" / f"{row['image_id']}.jpg").read_bytes()
            )
    rows.append(_archive_row("ISIC_1099999", 0, ("",) * 4, lesion="", patient=""))
    info.labels["ISIC_1099999"] = None
    info.paths["ISIC_1099999"] = root / "ISIC_1099999.jpg"
    info.paths["ISIC_1099999"].write_bytes(info.paths[rows[0]["isic_id"]].read_bytes())
    with open(root / "metadata.csv", "w", newline="", encoding="utf8") as f:
        writer = csv.DictWriter(f, ISIC_ARCHIVE_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    (root / "attribution.txt").write_text("\n\n".join(sorted({r["attribution"] for r in rows})), encoding="utf8")
    for row in rows:
        licenses[row["copyright_license"]] = root / "licenses" / f"{row['copyright_license']}.txt"
    for name, path in licenses.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"{name} licence text\n")
    partial = root / ".isic-partial.4242.ISIC_1099998.jpg"
    partial.write_bytes(b"\xff\xd8\xff")
    info.decoys += [root / "metadata.csv", root / "attribution.txt", partial, *licenses.values()]
    return info


def _archive_row(image_id: str, photo: int, diagnosis: tuple[str, ...], *, lesion: str, patient: str) -> dict:
    """One metadata.csv row as isic-cli writes it: every column, "" where the Archive has no value."""
    row = dict.fromkeys(ISIC_ARCHIVE_HEADER, "")
    row.update(
        isic_id=image_id,
        attribution="ViDIR Group, Department of Dermatology, Medical University of Vienna"
        if photo % 2
        else "Anonymous",
        copyright_license="CC-BY-NC" if photo % 2 else "CC-0",
        age_approx=str(40 + 5 * photo),
        anatom_site_general="posterior torso",
        benign_malignant=diagnosis[3],
        diagnosis_1=diagnosis[0],
        diagnosis_2=diagnosis[1],
        diagnosis_3=diagnosis[2],
        image_type="dermoscopic",
        lesion_id=lesion,
        patient_id=patient,
        sex="female" if photo % 2 else "male",
    )
    return row


def make_folder(root: Path, size=(64, 48)) -> FixtureInfo:
    """A plain folder tree: nested dirs, spaces, non-ASCII, upper-case extensions, plus decoys
    (hidden files, __MACOSX, a text file) that must not be listed."""
    root = Path(root)
    info = FixtureInfo(root, "folder", [], {}, {})
    for i, rel in enumerate(
        ["a.jpg", "b.PNG", "c.JPEG", "sub dir/Ünïcode name.jpg", "sub dir/deeper/x.Jpg", "z/ISIC_0024306.png"]
    ):
        image_id = rel.rsplit(".", 1)[0]
        info.labels[image_id] = None
        info.paths[image_id] = write_image(root / rel, size, i)
    for rel in [".hidden.jpg", ".cache/thumb.jpg", "__MACOSX/sub dir/._a.jpg", "_staging/part.png"]:
        info.decoys.append(write_image(root / rel, size, 99))
    (root / "notes.txt").write_text("not an image\n")
    info.decoys.append(root / "notes.txt")
    return info


MAKERS = {
    "ham10000": make_ham10000,
    "isic2017": make_isic2017,
    "isic2018": make_isic2018,
    "isic2019": make_isic2019,
    "isic2020": make_isic2020,
    "folder": make_folder,
}

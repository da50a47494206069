"""Benchmark data, made once and reused: synthetic HAM10000-layout datasets (camjobs.synth), and
tiny noise JPEGs where decoding is not what a benchmark is about."""

from __future__ import annotations

import csv
import math
import os
import shutil
import sys
import time
from pathlib import Path

FIRST_ID = 24306  # ISIC_0024306 is HAM10000's first image id
PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
MASKS = "HAM10000_segmentations_lesion_tschandl"


def image_paths(data: Path) -> list[str]:
    return sorted(str(p) for part in PARTS for p in (Path(data) / part).glob("*.jpg"))


def ham10000(
    cache: Path, images: int, unique: int | None = None, width: int = 600, height: int = 450, processes: int = 1
) -> Path:
    """`images` synthetic JPEGs in the HAM10000 layout under `cache`, made once: `unique` of them
    (all by default) by camjobs.synth in `processes` parallel chunks (one seed each), renumbered
    into one id sequence; the rest copies of those under new image and lesion ids (no masks)."""
    unique = min(unique or images, images)
    target = Path(cache) / f"ham10000-n{images}-u{unique}-{width}x{height}"
    if (target / "HAM10000_metadata.csv").is_file() and len(image_paths(target)) == images:
        return target
    started = time.time()
    print(f"making {images} JPEGs ({unique} synthesized) in {target} ...", file=sys.stderr, flush=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    chunks = max(1, min(processes, math.ceil(unique / 8)))
    jobs = [
        (str(scratch / f"chunk{k}"), unique // chunks + (k < unique % chunks), k, width, height) for k in range(chunks)
    ]
    if chunks == 1:
        _synth_chunk(jobs[0])
    else:
        import multiprocessing

        # forkserver: the workers inherit neither a CUDA context nor OpenMP threads of this process
        with multiprocessing.get_context("forkserver").Pool(chunks) as pool:
            pool.map(_synth_chunk, jobs)
    rows = _renumber(scratch, chunks, images)
    _add_copies(scratch, rows, unique, images)
    with open(scratch / "HAM10000_metadata.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    print(f"made in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    return target


def _synth_chunk(job: tuple) -> None:
    from camjobs.synth import synth_dataset

    folder, n, seed, width, height = job
    synth_dataset(folder, n=n, seed=seed, width=width, height=height)


def _renumber(scratch: Path, chunks: int, images: int) -> list[dict]:
    """The chunks' images and masks moved into one layout under one id sequence; the first half of
    `images` in part 1, the rest in part 2."""
    parts = [scratch / part for part in PARTS]
    for folder in (*parts, scratch / MASKS):
        folder.mkdir(parents=True, exist_ok=True)
    rows, lesions = [], {}
    for k in range(chunks):
        chunk = scratch / f"chunk{k}"
        with open(chunk / "HAM10000_metadata.csv", newline="") as file:
            for row in sorted(csv.DictReader(file), key=lambda r: r["image_id"]):
                old, new = row["image_id"], f"ISIC_{FIRST_ID + len(rows):07d}"
                row.update(image_id=new, lesion_id=lesions.setdefault((k, row["lesion_id"]), f"HAM_{len(lesions):07d}"))
                source = next(chunk.glob(f"HAM10000_images_part_*/{old}.jpg"))
                os.replace(source, parts[len(rows) >= images // 2] / f"{new}.jpg")
                os.replace(chunk / MASKS / f"{old}_segmentation.png", scratch / MASKS / f"{new}_segmentation.png")
                rows.append(row)
        shutil.rmtree(chunk)
    return rows


def _add_copies(scratch: Path, rows: list[dict], unique: int, images: int) -> None:
    """Copies of the synthesized images up to `images`, each under a new image id and its own lesion."""
    parts, half, lesions = [scratch / part for part in PARTS], images // 2, len({r["lesion_id"] for r in rows})
    for index in range(unique, images):
        source = rows[index % unique]
        row = dict(source, image_id=f"ISIC_{FIRST_ID + index:07d}", lesion_id=f"HAM_{lesions + index:07d}")
        shutil.copyfile(
            parts[index % unique >= half] / f"{source['image_id']}.jpg", parts[index >= half] / f"{row['image_id']}.jpg"
        )
        rows.append(row)


def tiny_jpegs(folder: Path, images: int, layout: str = "ham10000") -> Path:
    """`images` 64x48 noise JPEGs, made once: in the HAM10000 layout (with its metadata) or as a
    plain folder. Real files, cheap to decode."""
    import cv2
    import numpy as np

    folder = Path(folder)
    images_dir = folder / PARTS[0] if layout == "ham10000" else folder
    images_dir.mkdir(parents=True, exist_ok=True)
    names = [f"ISIC_{i:07d}" if layout == "ham10000" else f"img{i:06d}" for i in range(images)]
    done = len(list(images_dir.glob("*.jpg")))
    rng = np.random.default_rng(done)
    for name in names[done:]:
        cv2.imwrite(str(images_dir / f"{name}.jpg"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    if layout == "ham10000":
        rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
        rows += [f"HAM_{i:07d},{name},{('mel', 'nv', 'bkl')[i % 3]},histo,50,male,back" for i, name in enumerate(names)]
        (folder / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    return folder

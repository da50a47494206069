"""The nightly benchmark's data: a simulated archive of N images made of hard links to a few hundred
real JPEGs, a small checkpoint, and done rows seeded with camjobs' own writer (benchmarks/nightly.py).

    WORK/sources/            the distinct JPEGs (copies, so that the links lie on WORK's file system)
    WORK/sources.json        their names, sizes, sha256, sizes in pixels and labels
    WORK/model-resnet18-64.pt, WORK/model.json   an untrained, seeded resnet18 at 64 px, and its identity
    WORK/<layout>-<N>/       the archive: image i is a hard link to source i % S, made once (.complete marks it)

Layouts: `isic-archive` (what `isic image download` writes: flat ISIC_<7 digits>.jpg and metadata.csv with
isic_id and diagnosis_3) or `folder` (ISIC_<7 digits>.jpg in sub-folders of 1,000; image_id "<folder>/<name>").
Hard links share their inode: every link has its source's bytes, size and modification time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2017-sample"
MODEL_ARCH, MODEL_SIZE = "resnet18", 64
PER_FOLDER = 1000  # images per sub-folder in the folder layout
ROWS_PER_FILE = 100_000  # seeded rows per Parquet file


def image_name(index: int) -> str:
    return f"ISIC_{index:07d}.jpg"


def image_id(layout: str, index: int) -> str:
    stem = image_name(index)[: -len(".jpg")]
    return stem if layout == "isic-archive" else f"{index // PER_FOLDER:04d}/{stem}"


def relative_path(layout: str, index: int) -> str:
    return image_name(index) if layout == "isic-archive" else f"{index // PER_FOLDER:04d}/{image_name(index)}"


# --------------------------------------------------------------------------- the distinct JPEGs
def _sample_sources(sample: Path) -> list[tuple[Path, str | None]]:
    """The ISIC 2017 sample's JPEGs with their labels (Part 3 ground truth)."""
    labels = {}
    for table in sample.glob("*Part3_GroundTruth.csv"):
        with open(table, newline="") as file:
            for row in csv.DictReader(file):
                melanoma, keratosis = float(row["melanoma"]), float(row["seborrheic_keratosis"])
                labels[row["image_id"]] = "melanoma" if melanoma else "seborrheic_keratosis" if keratosis else "nevus"
    paths = sorted(p for p in sample.rglob("*.jpg") if not p.stem.endswith("_superpixels"))
    return [(p, labels.get(p.stem)) for p in paths]


def _synthetic_sources(work: Path, count: int) -> list[tuple[Path, str | None]]:
    """camjobs.synth's JPEGs (benchmarks.datasets), where the real sample is absent."""
    from benchmarks import datasets

    data = datasets.ham10000(work / "synth", count)
    with open(data / "HAM10000_metadata.csv", newline="") as file:
        labels = {row["image_id"]: row["dx"] for row in csv.DictReader(file)}
    return [(Path(p), labels.get(Path(p).stem)) for p in datasets.image_paths(data)]


def sources(work: Path, count: int, sample: Path = SAMPLE) -> list[dict]:
    """Up to `count` distinct JPEGs copied into WORK/sources, made once: name, size, sha256, pixels, label."""
    index = work / "sources.json"
    if index.is_file() and json.loads(index.read_text())["asked"] == count:
        return json.loads(index.read_text())["sources"]
    from PIL import Image

    picked = (_sample_sources(sample) if sample.is_dir() else [])[:count] or _synthetic_sources(work, count)
    folder = work / "sources"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    found = []
    for k, (path, label) in enumerate(picked):
        target = folder / f"src-{k:04d}.jpg"
        shutil.copyfile(path, target)
        data = target.read_bytes()
        with Image.open(target) as image:
            width, height = image.size  # the sample's JPEGs carry no EXIF rotation
        found.append(
            {
                "name": target.name,
                "origin": str(path),
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": width,
                "height": height,
                "label": label,
            }
        )
    index.write_text(json.dumps({"asked": count, "sources": found}, indent=1))
    return found


# --------------------------------------------------------------------------- the archive
def archive(work: Path, layout: str, images: int, srcs: list[dict]) -> Path:
    """WORK/<layout>-<images>: image i a hard link to source i % S; made once, reused when complete."""
    root = work / f"{layout}-{images}"
    marker = root / ".complete"
    if marker.is_file() and json.loads(marker.read_text()).get("sources") == len(srcs):
        return root
    started = time.time()
    print(f"linking {images} images into {root} ...", file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    folder = work / "sources"
    paths = [str(folder / s["name"]) for s in srcs]
    made = set()
    for i in range(images):
        relative = relative_path(layout, i)
        if "/" in relative and relative.split("/", 1)[0] not in made:
            made.add(relative.split("/", 1)[0])
            (root / relative.split("/", 1)[0]).mkdir()
        os.link(paths[i % len(paths)], root / relative)
        if i and i % 100_000 == 0:
            print(f"  {i} linked, {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    if layout == "isic-archive":
        with open(root / "metadata.csv", "w", newline="") as file:
            file.write("isic_id,diagnosis_3\n")
            file.writelines(f"{image_id(layout, i)},{srcs[i % len(srcs)]['label'] or ''}\n" for i in range(images))
    marker.write_text(json.dumps({"images": images, "sources": len(srcs), "made_s": round(time.time() - started)}))
    print(f"linked in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return root


def archive_bytes(images: int, srcs: list[dict], first: int = 0) -> int:
    """The bytes of images first..images-1 (image i has source i % S's bytes)."""
    sizes = [s["size"] for s in srcs]
    full, rest = divmod(images - first, len(sizes))
    return full * sum(sizes) + sum(sizes[(first + k) % len(sizes)] for k in range(rest))


# --------------------------------------------------------------------------- the model
def checkpoint(work: Path, srcs: list[dict]) -> tuple[Path, dict]:
    """An untrained, seeded resnet18 at 64 px over the sources' labels, and its identity (model.json)."""
    path, identity = work / f"model-{MODEL_ARCH}-{MODEL_SIZE}.pt", work / "model.json"
    if path.is_file() and identity.is_file():
        return path, json.loads(identity.read_text())
    import torch

    from camjobs.models.networks import build_model, load_model, save_checkpoint

    classes = sorted({s["label"] for s in srcs if s["label"]}) or ["a", "b"]
    torch.manual_seed(0)
    save_checkpoint(path, build_model(MODEL_ARCH, len(classes)), arch=MODEL_ARCH, classes=classes, input_size=64)
    loaded = load_model(str(path))
    found = {"model_sha256": loaded.model_sha256, "classes": list(loaded.classes), "input_size": loaded.input_size}
    identity.write_text(json.dumps(found))
    return path, found


# --------------------------------------------------------------------------- the done rows
def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    return buffer.getvalue()


def _known_columns(srcs: list[dict], model: dict, settings: dict, run_id: str) -> dict:
    """Per source (lists of S values) or constant (one value): what a seeded row holds in each column."""
    from camjobs.schema import SCHEMA_VERSION

    classes = model["classes"]
    per_source = {
        "content_sha256": [s["sha256"] for s in srcs],
        "width": [s["width"] for s in srcs],
        "height": [s["height"] for s in srcs],
        "label": [s["label"] for s in srcs],
        "file_size": [s["size"] for s in srcs],
        "file_mtime_ns": [s["mtime_ns"] for s in srcs],
    }
    constant = {
        "pred_index": 0,
        "pred_label": classes[0],
        "pred_score": 1.0,
        "probs": [1.0] + [0.0] * (len(classes) - 1),
        "target_index": 0,
        "target_label": classes[0],
        "cam": [0.0],
        "cam_height": 1,
        "cam_width": 1,
        "heatmap_png": _tiny_png(),
        "boxes": [],
        "run_id": run_id,
        "schema_version": SCHEMA_VERSION,
        "target_mode": settings["target_mode"],
        **{k: v for k, v in settings.items() if k != "target_mode"},
    }
    return {"per_source": per_source, "constant": constant}


def _rows(root: Path, layout: str, first: int, stop: int, srcs: list[dict], known: dict, schema):
    """Rows first..stop-1 of CAMS_SCHEMA: ids and paths per image, the rest per source or constant, nulls
    in the columns this benchmark does not know (a warning names them)."""
    import pyarrow as pa

    count = stop - first
    which = pa.array([i % len(srcs) for i in range(first, stop)], pa.int64())
    columns = {
        "image_id": [image_id(layout, i) for i in range(first, stop)],
        "source_path": [str(root / relative_path(layout, i)) for i in range(first, stop)],
    }
    arrays = []
    for field in schema:
        if field.name in columns:
            arrays.append(pa.array(columns[field.name], field.type))
        elif field.name in known["per_source"]:
            arrays.append(pa.array(known["per_source"][field.name], field.type).take(which))
        elif field.name in known["constant"]:
            value = pa.scalar(known["constant"][field.name], field.type)
            arrays.append(pa.repeat(value, count) if count else pa.array([], field.type))
        else:
            arrays.append(pa.nulls(count, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def seed(output: Path, root: Path, layout: str, done: int, srcs: list[dict], model: dict, settings: dict) -> dict:
    """Rows for images 0..done-1 written as one published run through camjobs.output (staging, then
    publish_run with its summary), ROWS_PER_FILE rows a file; returns that summary."""
    import pyarrow.parquet as pq

    from camjobs.output import publish_run, staging_dir
    from camjobs.schema import CAMS_SCHEMA

    started = time.time()
    for s in srcs:  # every link shares its source's inode: its size and modification time
        s["mtime_ns"] = os.stat(root.parent / "sources" / s["name"]).st_mtime_ns
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started - 86400)) + "-seeded"
    known = _known_columns(srcs, model, settings, run_id)
    unknown = [f.name for f in CAMS_SCHEMA if f.name not in known["per_source"] | known["constant"]]
    unknown = [name for name in unknown if name not in ("image_id", "source_path")]
    print(f"seeded rows leave null: {', '.join(unknown)}", file=sys.stderr, flush=True)
    staged = Path(staging_dir(str(output), run_id)) / "cams"
    staged.mkdir(parents=True)
    for part, first in enumerate(range(0, done, ROWS_PER_FILE)):
        table = _rows(root, layout, first, min(done, first + ROWS_PER_FILE), srcs, known, CAMS_SCHEMA)
        pq.write_table(table, staged / f"part-{part:05d}.parquet")
    summary = {
        "run_id": run_id,
        "status": "completed",
        "seeded_by": "benchmarks/nightly.py",
        "settings": settings,
        "write_mode": "append",
        "supersedes": [],
        "counts": {"inputs": done, "processed": done, "skipped": 0, "errors": 0},
    }
    publish_run(str(output), run_id, summary)
    print(f"seeded {done} rows in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
    return summary

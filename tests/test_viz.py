"""camjobs.labels.viz: panels and the HTML gallery over real ISIC 2017 images with their masks.

DIR/cams is computed here without Ray, with the same pieces the model actor uses (a seeded,
untrained ResNet-18 at 64 px: the maps mean nothing, but they are real maps with real boxes).
Refined rows (camjobs run --refine) add a mask drawn in the test as mask_rle and its box.
"""

from __future__ import annotations

import hashlib
import html
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from camjobs.cam import build_extractor
from camjobs.geometry import box_iou, mask_box, read_mask, rle_encode
from camjobs.images import load_image
from camjobs.labels.viz import (
    GAP,
    VizError,
    VizItem,
    order_items,
    png_name,
    render_gallery,
    render_panel,
    tile_shape,
)
from camjobs.layouts import list_images
from camjobs.models.networks import load_model
from camjobs.pipeline.localize import encode_png, localize
from camjobs.schema import CAMS_SCHEMA, SCHEMA_VERSION

RUN_ID = "20240301T000000Z-cccccc"
ODD_ID = '<b>"Ünï & co"</b> x\'1'


def build_cams(
    data: Path, output: Path, *, limit: int | None = None, extra_ids: dict[str, str] | None = None
) -> list[dict]:
    """OUTPUT/cams/<run>/part-0.parquet for the images of `data`, as the job would write them."""
    listing = list_images(str(data), "isic2017")
    records = [r for r in listing.records if r.error_type is None][:limit]
    loaded = load_model(None, arch="resnet18", classes=listing.classes, input_size=64)
    extractor = build_extractor("cam", loaded.model)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    sources = [(r.image_id, r.source_path, r.label) for r in records]
    for image_id, source in (extra_ids or {}).items():  # another id for an existing file (no mask)
        sources.append((image_id, source, None))
    rows = []
    for start in range(0, len(sources), 32):
        chunk = sources[start : start + 32]
        decoded = [load_image(source, input_size=loaded.input_size) for _, source, _ in chunk]
        images = torch.from_numpy(np.stack([d.pixels for d in decoded])).permute(0, 3, 1, 2).float() / 255.0
        result = extractor((images - mean) / std)
        probabilities = torch.softmax(result.logits, dim=1)
        for i, ((image_id, source, label), image) in enumerate(zip(chunk, decoded)):
            located = localize(result.maps[i], image.height, image.width, 0.2)
            pred = int(probabilities[i].argmax())
            rows.append(
                {
                    "image_id": image_id,
                    "source_path": source,
                    "content_sha256": image.content_sha256,
                    "width": image.width,
                    "height": image.height,
                    "label": label,
                    "pred_index": pred,
                    "pred_label": loaded.classes[pred],
                    "pred_score": float(probabilities[i, pred]),
                    "target_index": int(result.target[i]),
                    "target_label": loaded.classes[int(result.target[i])],
                    "method": "cam",
                    "cam": result.maps[i].flatten().tolist(),
                    "cam_height": result.maps.shape[1],
                    "cam_width": result.maps.shape[2],
                    "heatmap_png": encode_png(located.heatmap),
                    "threshold": 0.2,
                    "boxes": [box.as_dict() for box in located.boxes],
                    "model_sha256": loaded.model_sha256,
                    "target_mode": "predicted",
                    "input_size": loaded.input_size,
                    "run_id": RUN_ID,
                    "schema_version": SCHEMA_VERSION,
                }
            )
    folder = output / "cams" / RUN_ID
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CAMS_SCHEMA), folder / "part-0.parquet")
    return rows


def expected_ious(rows: list[dict], data: Path) -> dict[str, float]:
    """IoU of boxes[0] with the mask box, computed here independently of camjobs.labels.viz."""
    masks = {r.image_id: r.mask_path for r in list_images(str(data), "isic2017").records if r.mask_path}
    ious = {}
    for row in rows:
        if row["image_id"] not in masks:
            continue
        truth = mask_box(read_mask(masks[row["image_id"]]))
        boxes = row["boxes"]
        ious[row["image_id"]] = (
            box_iou((boxes[0]["x_min"], boxes[0]["y_min"], boxes[0]["x_max"], boxes[0]["y_max"]), truth)
            if boxes
            else 0.0
        )
    return ious


class _Gallery(HTMLParser):
    """The rows of index.html: (image_id cell's data-v, img src), in document order."""

    def __init__(self):
        super().__init__()
        self.ids, self.srcs, self.hrefs, self.external, self._cell = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and attrs.get("class") == "id":
            self.ids.append(attrs["data-v"])
        if tag == "img":
            self.srcs.append(attrs["src"])
        if tag == "a":
            self.hrefs.append(attrs["href"])
        for name in ("src", "href"):
            if tag in ("script", "link", "img") and re.match(r"\w+:|//", attrs.get(name) or ""):
                self.external.append(attrs[name])


def parse_gallery(index: Path) -> _Gallery:
    parser = _Gallery()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def check_panel(path: Path, width: int, height: int) -> np.ndarray:
    panel = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
    assert panel is not None, path
    tw, th = tile_shape(width, height)
    assert max(tw, th) <= 512
    assert panel.shape[1] == 3 * tw + 2 * GAP  # three tiles wide
    assert panel.shape[0] > th  # a caption strip below the tiles
    # the gaps between tiles are white, the tiles are not
    assert (panel[:th, tw : tw + GAP] == 255).all() and (panel[:th, 2 * tw + GAP : 2 * tw + 2 * GAP] == 255).all()
    for column in range(3):
        tile = panel[:th, column * (tw + GAP) : column * (tw + GAP) + tw]
        assert tile.std() > 5, f"tile {column} of {path.name} is flat"
    return panel


@pytest.fixture(scope="module")
def mini_cams(tmp_path_factory, isic2017_mini):
    output = tmp_path_factory.mktemp("viz") / "out"
    first = next(iter(sorted((isic2017_mini / "ISIC-2017_Training_Data").glob("*.jpg"))))
    rows = build_cams(isic2017_mini, output, extra_ids={ODD_ID: str(first)})
    return output, rows


@pytest.mark.parametrize("sort", ["worst", "best"])
def test_gallery_on_isic2017_mini(mini_cams, isic2017_mini, tmp_path, sort):
    output, rows = mini_cams
    result = render_gallery(str(output), tmp_path / "gallery", sort=sort, data=str(isic2017_mini))
    assert result.sort_key == "iou" and result.note is None and not result.failed
    assert len(result.items) == len(rows) == 7
    pngs = sorted(p.name for p in (tmp_path / "gallery").glob("*.png"))
    assert pngs == sorted(png_name(row["image_id"]) for row in rows)  # one PNG per image
    by_id = {row["image_id"]: row for row in rows}
    for item in result.items:
        check_panel(tmp_path / "gallery" / item.png, by_id[item.image_id]["width"], by_id[item.image_id]["height"])

    # IoU: the same numbers as an independent computation; the odd id has no mask and goes last
    ious = expected_ious(rows, isic2017_mini)
    assert len(ious) == 6
    assert {i.image_id: i.iou for i in result.items if i.iou is not None} == pytest.approx(ious)
    shown = [item.image_id for item in result.items]
    assert shown[-1] == ODD_ID
    order = [ious[i] for i in shown[:-1]]
    assert order == sorted(order, reverse=(sort == "best"))

    index = tmp_path / "gallery" / "index.html"
    text = index.read_text(encoding="utf-8")
    gallery = parse_gallery(index)
    assert gallery.ids == shown  # the table is in the same order
    assert sorted(set(gallery.srcs)) == pngs and sorted(set(gallery.hrefs)) == pngs  # references every PNG
    assert not gallery.external  # nothing fetched from elsewhere
    assert html.escape(ODD_ID) in text and ODD_ID not in text and "<b>" not in text
    assert "<script>" in text and "aria-sort" in text


def test_gallery_without_masks_falls_back_to_pred_score(mini_cams, tmp_path):
    output, rows = mini_cams
    result = render_gallery(str(output), tmp_path / "g", sort="worst", limit=4)
    assert result.sort_key == "pred_score" and "pred_score ascending" in result.note
    assert len(result.items) == 4 and len(list((tmp_path / "g").glob("*.png"))) == 4
    lowest = sorted(rows, key=lambda r: (r["pred_score"], r["image_id"]))[:4]
    assert [i.image_id for i in result.items] == [r["image_id"] for r in lowest]
    assert all(item.iou is None for item in result.items)
    text = (tmp_path / "g" / "index.html").read_text(encoding="utf-8")
    assert "pred_score ascending" in text


def test_random_order_is_seeded(mini_cams, isic2017_mini, tmp_path):
    output, _ = mini_cams
    first = render_gallery(str(output), tmp_path / "a", sort="random", limit=3, data=str(isic2017_mini))
    again = render_gallery(str(output), tmp_path / "b", sort="random", limit=3, data=str(isic2017_mini))
    assert [i.image_id for i in first.items] == [i.image_id for i in again.items]
    assert first.sort_key == "random" and len(first.items) == 3


def test_bad_options(mini_cams, tmp_path):
    output, _ = mini_cams
    with pytest.raises(VizError, match="--sort"):
        render_gallery(str(output), tmp_path / "x", sort="median")
    with pytest.raises(VizError, match="--limit"):
        render_gallery(str(output), tmp_path / "x", limit=0)
    with pytest.raises(VizError, match="--sort"):
        order_items([], "up")


def test_large_image_tiles_are_downscaled():
    rgb = np.random.default_rng(0).integers(0, 255, (1500, 6000, 3), dtype=np.uint8)
    heatmap = np.tile(np.linspace(0, 255, 6000, dtype=np.uint8), (1500, 1))
    box = {"x_min": 3000.0, "y_min": 300.0, "x_max": 6000.0, "y_max": 1500.0, "score": 0.7}
    mask = np.zeros((1500, 6000), bool)
    mask[400:1200, 3500:5000] = True
    panel = render_panel(rgb, heatmap, [box], ["id", "pred", "legend"], mask)
    assert tile_shape(6000, 1500) == (512, 128)
    assert panel.shape[1] == 3 * 512 + 2 * GAP and panel.shape[0] > 128


def test_html_escapes_everything(tmp_path):
    from camjobs.labels.viz import gallery_html

    item = VizItem(
        image_id='a<script>alert("x")</script>&\'',
        source_path="",
        width=1,
        height=1,
        label="<l>",
        pred_label="p&q",
        pred_score=0.5,
        target_label='"t"',
        boxes=[],
        run_id="r",
        iou=None,
        png="x.png",
    )
    text = gallery_html([item], title="t<", summary="s&", note="n>")
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;x&quot;)" in text
    assert "&lt;l&gt;" in text and "p&amp;q" in text and "t&lt;" in text and "s&amp;" in text and "n&gt;" in text
    assert png_name(item.image_id).endswith(hashlib.sha1(item.image_id.encode()).hexdigest()[:8] + ".png")
    assert re.fullmatch(r"[A-Za-z0-9._-]+", png_name(item.image_id))


def test_gallery_on_shared_isic2017_sample(isic2017_sample, tmp_path):
    output = tmp_path / "out"
    rows = build_cams(isic2017_sample, output, limit=48)  # 48 of the 150 images: the test stays fast
    result = render_gallery(str(output), tmp_path / "gallery", limit=12, sort="worst", data=str(isic2017_sample))
    assert len(result.items) == 12 and not result.failed and result.sort_key == "iou"
    assert len(list((tmp_path / "gallery").glob("*.png"))) == 12
    ious = expected_ious(rows, isic2017_sample)
    assert len(ious) == len(rows) == 48
    worst = sorted(ious.values())[:12]
    assert [item.iou for item in result.items] == pytest.approx(worst)
    gallery = parse_gallery(tmp_path / "gallery" / "index.html")
    assert gallery.ids == [item.image_id for item in result.items]
    assert sorted(set(gallery.srcs)) == sorted(item.png for item in result.items)
    by_id = {row["image_id"]: row for row in rows}
    for item in result.items[:3]:
        check_panel(tmp_path / "gallery" / item.png, by_id[item.image_id]["width"], by_id[item.image_id]["height"])


# --------------------------------------------------------------------------- refined masks
def _is_magenta(image: np.ndarray) -> np.ndarray:
    """Pixels drawn in the refined-outline colour (RGB or BGR alike: red and blue are both 255)."""
    return (image[..., 0] == 255) & (image[..., 1] == 0) & (image[..., 2] == 255)


def _drawn_mask(width: int, height: int) -> np.ndarray:
    """The 'refined' mask of the tests: an ellipse off the image's centre."""
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (width // 2 + width // 10, height // 2), (width // 4, height // 5), 15, 0, 360, 1, -1)
    return mask.astype(bool)


def _pixel_box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_panel_draws_the_refined_outline_along_the_mask_border():
    height, width = 600, 900
    rgb = np.full((height, width, 3), 128, np.uint8)
    heatmap = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    refined = _drawn_mask(width, height)
    box = {"x_min": 0.0, "y_min": 0.0, "x_max": 300.0, "y_max": 200.0, "score": 0.5}
    panel = render_panel(rgb, heatmap, [box], ["id", "pred", "legend"], None, refined=refined)
    tw, th = tile_shape(width, height)
    blend = panel[:th, 2 * (tw + GAP) : 2 * (tw + GAP) + tw]
    magenta = _is_magenta(blend)
    small = cv2.resize(refined.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
    border = cv2.morphologyEx(small, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    near_border = cv2.dilate(border.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert magenta.sum() > 0.5 * border.sum()  # the outline runs all along the border
    assert (magenta & ~near_border).sum() == 0  # and nowhere else
    assert not _is_magenta(panel[:th, : 2 * (tw + GAP)]).any()  # only on the blend tile
    plain = render_panel(rgb, heatmap, [box], ["id", "pred", "legend"], None)
    assert not _is_magenta(plain).any()


def _write_rows(output: Path, rows: list[dict], schema: pa.Schema) -> Path:
    folder = output / "cams" / RUN_ID
    folder.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{k: v for k, v in row.items() if k in schema.names} for row in rows], schema=schema),
        folder / "part-0.parquet",
    )
    return output


@pytest.fixture(scope="module")
def refined_cams(mini_cams, tmp_path_factory):
    """The mini rows as a --refine run writes them: a drawn mask and its box on every image but two,
    one refined row whose refinement found nothing, one row without refinement."""
    _, rows = mini_cams
    nothing, plain = rows[0]["image_id"], rows[1]["image_id"]
    refined_rows = []
    for row in rows:
        row = dict(row)
        if row["image_id"] == nothing:
            row.update(refine="otsu")
        elif row["image_id"] != plain:
            mask = _drawn_mask(row["width"], row["height"])
            x0, y0, x1, y1 = _pixel_box(mask)
            row.update(
                mask_rle=rle_encode(mask),
                refine="otsu",
                refined_boxes=[
                    {"x_min": float(x0), "y_min": float(y0), "x_max": float(x1), "y_max": float(y1), "score": 0.7}
                ],
            )
        refined_rows.append(row)
    output = _write_rows(tmp_path_factory.mktemp("refined") / "out", refined_rows, CAMS_SCHEMA)
    return output, refined_rows, nothing, plain


def test_gallery_shows_refined_masks_and_their_iou(refined_cams, isic2017_mini, tmp_path):
    output, rows, nothing, plain = refined_cams
    result = render_gallery(str(output), tmp_path / "g", sort="best", data=str(isic2017_mini))
    masks = {r.image_id: r.mask_path for r in list_images(str(isic2017_mini), "isic2017").records if r.mask_path}
    by_id = {row["image_id"]: row for row in rows}
    for item in result.items:
        row = by_id[item.image_id]
        panel = cv2.imdecode(np.fromfile(str(tmp_path / "g" / item.png), np.uint8), cv2.IMREAD_COLOR)
        assert _is_magenta(panel).any() == (row.get("mask_rle") is not None), item.image_id
        if item.image_id not in masks:
            assert item.refined_iou is None
        elif item.image_id == plain:
            assert item.refined_iou is None  # no --refine: n/a
        elif item.image_id == nothing:
            assert item.refined_iou == 0.0  # refined, nothing found: a miss
        else:
            truth = mask_box(read_mask(masks[item.image_id]))
            assert item.refined_iou == pytest.approx(
                box_iou(_pixel_box(_drawn_mask(row["width"], row["height"])), truth)
            )
    text = (tmp_path / "g" / "index.html").read_text(encoding="utf-8")
    assert '<th data-type="num">refined IoU</th>' in text and "Magenta: outline of the refined lesion mask" in text
    assert "of their refined boxes" in text
    cells = re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>")[1])
    assert len(cells) == len(result.items)
    for item, cell in zip(result.items, cells):  # the refined IoU is the column after the IoU
        numbers = re.findall(r'<td class="num"[^>]*>([^<]*)</td>', cell)
        assert numbers[-2] == (f"{item.refined_iou:.3f}" if item.refined_iou is not None else "n/a")


def test_version_1_output_renders_as_before(mini_cams, isic2017_mini, tmp_path):
    """A version-1 file (no mask_rle, refined_boxes, refine) draws the same files as version-2 rows
    without refinement, which draw what the gallery drew before masks existed: no refined column."""
    _, rows = mini_cams
    v1_schema = pa.schema(
        [f for f in CAMS_SCHEMA if f.name not in ("mask_rle", "refined_boxes", "refine", "probs")],
        metadata={"camjobs.schema_version": "1"},
    )
    v1 = _write_rows(tmp_path / "v1", [{**row, "schema_version": 1} for row in rows], v1_schema)
    v2 = _write_rows(tmp_path / "v2", rows, CAMS_SCHEMA)
    for output, folder in ((v1, "g1"), (v2, "g2")):
        result = render_gallery(str(output), tmp_path / folder, data=str(isic2017_mini))
        assert all(not item.refined and item.refined_iou is None for item in result.items)
    files = sorted(p.name for p in (tmp_path / "g1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "g2").iterdir()) and "index.html" in files
    for name in files:  # index.html names the output folder
        first, second = (
            (tmp_path / g / name).read_bytes().replace(str(o).encode(), b"OUT") for g, o in (("g1", v1), ("g2", v2))
        )
        assert first == second, name
    text = (tmp_path / "g1" / "index.html").read_text(encoding="utf-8")
    assert "refined" not in text.lower() and "magenta" not in text.lower()

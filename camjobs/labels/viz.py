"""Look at the maps: one PNG panel per image and a static, sortable HTML gallery.

``camjobs viz --output DIR --to DIR [--limit N] [--sort worst|best|random] [--data DATASET]``

Each panel is three tiles side by side, as in the CAM papers' figures (Zhou et al. 2015, Fig. 1;
Choe et al. 2020, wsolevaluation): the original image | its heatmap (``heatmap_png`` through
OpenCV's JET colour map) | the two blended half and half, with the weak boxes drawn (``boxes[0]``,
the paper's box, thick green; the other boxes thin green with their scores), where the row has a
refined lesion mask (``mask_rle``, ``camjobs run --refine``) its outline in magenta, and, where the
ground-truth mask is known, its outline and its box in red. A caption strip below names the
image, the prediction and its score, the explained class and the IoU of ``boxes[0]`` with the
mask's box (``camjobs.labels.evaluate``: the same number as the demo's mean IoU) and, for a refined
row, that of ``refined_boxes[0]`` (0 where the refinement found nothing). Tiles are scaled so
their long side is at most ``tile_size`` (512) pixels; the original is decoded from
``source_path`` with EXIF orientation applied, as the job did.

Rows are the newest per image_id (as in ``camjobs export``). Ground truth comes from ``--data``
(any layout with masks: HAM10000, ISIC 2017, ISIC 2018), masks binarized ``> 127``.
``--sort worst`` shows the lowest IoU first, ``best`` the highest; images without a mask come
after those with one, by pred_score. Without any mask, worst / best order by ``pred_score``
ascending / descending instead (the gallery says so). ``random`` is a fixed-seed shuffle.

``DIR/index.html`` lists the panels in that order with their numbers (and a "refined IoU" column
where any shown row is refined: output without refinement renders as it did before masks
existed); clicking a column header sorts by it (inline JavaScript, no file or script is fetched
from anywhere else). The PNG of an image is ``<image_id made file-name safe>-<8 hex digits of
its sha1>.png``.
"""

from __future__ import annotations

import hashlib
import html
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from camjobs.config import GallerySort
from camjobs.errors import UsageError
from camjobs.geometry import box_iou, box_xyxy, mask_box, read_mask, resize_mask_nearest, rle_mask
from camjobs.images import ImageInputError, decode_image, read_bytes
from camjobs.labels.truth import dataset_masks
from camjobs.output import NoResults, open_cams, read_newest_cams
from camjobs.schema import ImageRow

log = logging.getLogger(__name__)

SORTS = GallerySort.values()
DEFAULT_LIMIT = 50
TILE_SIZE = 512
GAP = 4  # white pixels between tiles
RANDOM_SEED = 0
VIZ_COLUMNS = (
    "image_id",
    "source_path",
    "width",
    "height",
    "label",
    "pred_label",
    "pred_score",
    "target_label",
    "boxes",
    "run_id",
    "method",
    "mask_rle",
    "refined_boxes",
    "refine",
)

GREEN, LIGHT_GREEN, RED, BLACK, WHITE = (0, 230, 0), (150, 255, 150), (255, 40, 40), (0, 0, 0), (255, 255, 255)
MAGENTA = (255, 0, 255)  # the refined mask: a colour JET never takes, unlike green, red and cyan
_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
)


class VizError(UsageError, ValueError):
    """Bad options, or nothing to show."""


@dataclass(kw_only=True)
class VizItem(ImageRow):
    boxes: list[dict]
    method: str | None = None
    mask_rle: dict | None = None  # the refined lesion mask (camjobs run --refine)
    refined_boxes: list[dict] | None = None
    refine: str | None = None
    mask_path: str | None = None
    iou: float | None = None  # boxes[0] against the mask's box; 0 when there is no box
    refined_iou: float | None = None  # refined_boxes[0] likewise, for a refined row
    png: str | None = None  # file name in the gallery folder, once written

    @property
    def refined(self) -> bool:
        """A row of a --refine run (its mask may be null: nothing to refine), as camjobs.labels.evaluate counts them."""
        return self.refine is not None or self.mask_rle is not None or self.refined_boxes is not None


@dataclass
class VizResult:
    to: str
    index_html: str
    items: list[VizItem]  # in gallery order, panel written
    sort: str
    sort_key: str  # "iou", "pred_score" or "random"
    note: str | None  # why the order is not what was asked for, if it is not
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image_id, why) not drawn

    def message(self) -> str:
        failed = f", {len(self.failed)} could not be drawn" if self.failed else ""
        return f"{len(self.items)} panels ({self.sort}: by {self.sort_key}){failed} -> {self.index_html}"


# --------------------------------------------------------------------------- ground truth
def mask_for(item: VizItem) -> np.ndarray | None:
    """The item's mask at the image's size (nearest-neighbour resized if it was stored at another)."""
    if not item.mask_path:
        return None
    mask = read_mask(item.mask_path)
    if mask.shape != (item.height, item.width):
        log.warning(
            "mask %s is %dx%d, image %s is %dx%d: resized",
            item.mask_path,
            mask.shape[1],
            mask.shape[0],
            item.image_id,
            item.width,
            item.height,
        )
        mask = resize_mask_nearest(mask, item.width, item.height)
    return mask


def first_box_iou(boxes: Sequence[dict], mask: np.ndarray) -> float | None:
    """IoU of boxes[0] with the mask's box; 0.0 without a box; None for an empty mask."""
    truth = mask_box(mask)
    if truth is None:
        return None
    if not boxes:
        return 0.0
    return float(box_iou(box_xyxy(boxes[0]), truth))


def fill_iou(items: Sequence[VizItem]) -> None:
    """The IoU of each item with a mask (where not known yet); an unreadable mask counts as none."""
    for item in items:
        if item.mask_path and item.iou is None:
            try:
                mask = mask_for(item)
                item.iou = first_box_iou(item.boxes, mask) if mask is not None else None
                if mask is not None and item.refined:
                    item.refined_iou = first_box_iou(item.refined_boxes or [], mask)
            except (OSError, ValueError) as exc:
                log.warning("mask of %s unreadable: %s", item.image_id, exc)
                item.mask_path = None


# --------------------------------------------------------------------------- order
def order_items(items: list[VizItem], sort: str, seed: int = RANDOM_SEED) -> tuple[list[VizItem], str, str | None]:
    """Items in gallery order, the key used, and a note when it is not the one asked for."""
    if sort not in SORTS:
        raise VizError(f"--sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if sort == "random":
        shuffled = sorted(items, key=lambda item: (item.image_id, item.run_id))
        random.Random(seed).shuffle(shuffled)
        return shuffled, "random", None
    sign = 1.0 if sort == "worst" else -1.0

    def score(item: VizItem) -> float:
        return sign * (item.pred_score if item.pred_score is not None else 0.0)

    if any(item.iou is not None for item in items):
        ordered = sorted(
            items,
            key=lambda item: (
                item.iou is None,
                sign * item.iou if item.iou is not None else 0.0,
                score(item),
                item.image_id,
            ),
        )
        return ordered, "iou", None
    note = (
        f"no ground-truth masks (pass --data with a layout that has masks): --sort {sort} "
        f"orders by pred_score {'ascending' if sort == 'worst' else 'descending'} instead of IoU"
    )
    return sorted(items, key=lambda item: (score(item), item.image_id)), "pred_score", note


# --------------------------------------------------------------------------- drawing
def _font(size: int) -> ImageFont.ImageFont:
    for path in _FONT_FILES:
        if os.path.exists(path):
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def tile_shape(width: int, height: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """(tile width, tile height): the image scaled so its long side is at most tile_size, never enlarged."""
    scale = min(1.0, tile_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _rectangle(image: np.ndarray, box, scale_x: float, scale_y: float, colour, thickness: int) -> None:
    x0, y0 = int(round(box[0] * scale_x)), int(round(box[1] * scale_y))
    x1, y1 = int(round(box[2] * scale_x)) - 1, int(round(box[3] * scale_y)) - 1  # max exclusive
    x1, y1 = max(x1, x0), max(y1, y0)
    cv2.rectangle(image, (x0, y0), (x1, y1), BLACK, thickness + 2, cv2.LINE_AA)  # visible on any colour
    cv2.rectangle(image, (x0, y0), (x1, y1), colour, thickness, cv2.LINE_AA)


def _outline(image: np.ndarray, mask: np.ndarray, colour, line: int) -> None:
    """A mask's outer outline, scaled to the tile, in `colour` over a black edge (visible on any colour)."""
    small = cv2.resize(mask.astype(np.uint8) * 255, image.shape[1::-1], interpolation=cv2.INTER_AREA) > 127
    contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, BLACK, line + 2, cv2.LINE_AA)
    cv2.drawContours(image, contours, -1, colour, line, cv2.LINE_AA)


def render_panel(
    rgb: np.ndarray,
    heatmap: np.ndarray | None,
    boxes: Sequence[dict],
    caption: Sequence[str],
    mask: np.ndarray | None = None,
    tile_size: int = TILE_SIZE,
    refined: np.ndarray | None = None,
) -> np.ndarray:
    """original | JET heatmap | blend + boxes (+ refined mask and ground-truth outlines), a caption
    strip below; RGB uint8."""
    height, width = rgb.shape[:2]
    tw, th = tile_shape(width, height, tile_size)
    sx, sy = tw / width, th / height
    shrink = cv2.INTER_AREA if tw < width else cv2.INTER_LINEAR
    original = cv2.resize(rgb, (tw, th), interpolation=shrink)
    if heatmap is None:
        heat = np.zeros((th, tw), np.uint8)
    else:
        heat = cv2.resize(
            heatmap, (tw, th), interpolation=cv2.INTER_AREA if heatmap.shape[1] > tw else cv2.INTER_LINEAR
        )
    jet = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blend = cv2.addWeighted(original, 0.5, jet, 0.5, 0.0)
    line = max(2, round(max(tw, th) / 170))
    if mask is not None:
        _outline(blend, mask, RED, line)
        truth = mask_box(mask)
        if truth is not None:
            _rectangle(blend, truth, sx, sy, RED, max(1, line - 1))
    if refined is not None:
        _outline(blend, refined, MAGENTA, line)
    for rank, box in reversed(list(enumerate(boxes))):  # boxes[0] drawn last, on top
        first = rank == 0
        _rectangle(
            blend, box_xyxy(box), sx, sy, GREEN if first else LIGHT_GREEN, line + 1 if first else max(1, line - 1)
        )

    panel_width = 3 * tw + 2 * GAP
    font_size = int(min(20, max(11, panel_width / 80)))
    font = _font(font_size)
    line_height = int(font_size * 1.35)
    caption_height = line_height * len(caption) + 10
    canvas = Image.new("RGB", (panel_width, th + caption_height), WHITE)
    for column, tile in enumerate((original, jet, blend)):
        canvas.paste(Image.fromarray(tile), (column * (tw + GAP), 0))
    draw = ImageDraw.Draw(canvas)
    for number, text in enumerate(caption):
        draw.text((6, th + 5 + number * line_height), _fit(draw, text, font, panel_width - 12), fill=BLACK, font=font)
    # box scores, after the caption so they sit on the blend tile
    small_font = _font(max(10, font_size - 4))
    for box in boxes[:5]:
        x, y = 2 * (tw + GAP) + box["x_min"] * sx + 3, box["y_min"] * sy + 2
        draw.text((x, y), f"{box['score']:.2f}", fill=WHITE, font=small_font, stroke_width=2, stroke_fill=BLACK)
    return np.asarray(canvas)


def caption_lines(item: VizItem) -> list[str]:
    score = f"{item.pred_score:.3f}" if item.pred_score is not None else "?"
    second = f"pred {item.pred_label} {score}"
    if item.target_label and item.target_label != item.pred_label:
        second += f" | map explains {item.target_label}"
    if item.label:
        second += f" | label {item.label}"
    second += f" | IoU {item.iou:.3f}" if item.iou is not None else " | IoU n/a (no mask)"
    if item.refined_iou is not None:
        second += f" | refined IoU {item.refined_iou:.3f}"
    third = (
        f"{len(item.boxes)} box(es), green: boxes[0] thick"
        + (", magenta: refined mask outline" if item.mask_rle else "")
        + (", red: mask outline and box" if item.mask_path else "")
    )
    return [item.image_id, second, third]


def png_name(image_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[:60] or "image"
    return f"{safe}-{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:8]}.png"


# --------------------------------------------------------------------------- HTML
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f3f3f3; position: sticky; top: 0; }
th.sortable { cursor: pointer; user-select: none; }
th.sortable:hover { background: #e4e4e4; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.id { font-family: ui-monospace, monospace; max-width: 22em; overflow-wrap: break-word; }
img.thumb { height: 110px; display: block; }
.note { background: #fff4d6; padding: 6px 10px; border-left: 4px solid #e0a800; }
"""

_SCRIPT = """
(function () {
  var table = document.getElementById("gallery");
  var body = table.tBodies[0];
  var headers = table.tHead.rows[0].cells;
  function value(row, column, numeric) {
    var text = row.cells[column].getAttribute("data-v");
    if (text === null || text === "") { return null; }
    return numeric ? parseFloat(text) : text;
  }
  Array.prototype.forEach.call(headers, function (th, column) {
    var type = th.getAttribute("data-type");
    if (!type) { return; }
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var numeric = type === "num";
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = value(a, column, numeric), y = value(b, column, numeric);
        if (x === null || y === null) { return (x === null) - (y === null); }  // blanks last
        var order = numeric ? x - y : (x < y ? -1 : x > y ? 1 : 0);
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
})();
"""


def _cell(text: str, value=None, cls: str | None = None) -> str:
    attrs = f' class="{cls}"' if cls else ""
    if value is not None:
        attrs += f' data-v="{html.escape(str(value), quote=True)}"'
    return f"<td{attrs}>{html.escape(text)}</td>"


def _iou_cell(iou: float | None) -> str:
    return _cell(f"{iou:.3f}" if iou is not None else "n/a", f"{iou:.6f}" if iou is not None else "", "num")


def gallery_html(items: Sequence[VizItem], *, title: str, summary: str, note: str | None, failed=()) -> str:
    refined = any(item.refined for item in items)  # else the page is the one of before masks existed
    rows = []
    for number, item in enumerate(items, start=1):
        src = html.escape(item.png or "", quote=True)
        alt = html.escape(f"CAM panel of {item.image_id}", quote=True)
        score = item.pred_score
        rows.append(
            "<tr>"
            + _cell(str(number), number, "num")
            + f'<td><a href="{src}"><img class="thumb" src="{src}" alt="{alt}" loading="lazy"></a></td>'
            + _cell(item.image_id, item.image_id, "id")
            + _cell(item.label or "", item.label or "")
            + _cell(item.pred_label or "", item.pred_label or "")
            + _cell(f"{score:.3f}" if score is not None else "", f"{score:.6f}" if score is not None else "", "num")
            + _cell(item.target_label or "", item.target_label or "")
            + _iou_cell(item.iou)
            + (_iou_cell(item.refined_iou) if refined else "")
            + _cell(str(len(item.boxes)), len(item.boxes), "num")
            + "</tr>"
        )
    failed_html = ""
    if failed:
        entries = "".join(f"<li><code>{html.escape(i)}</code>: {html.escape(why)}</li>" for i, why in failed)
        failed_html = (
            f"<details><summary>{len(failed)} image(s) could not be drawn</summary><ul>{entries}</ul></details>"
        )
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    header = (
        '<tr><th data-type="num">#</th><th>panel: image | heatmap | blend + boxes</th>'
        '<th data-type="str">image_id</th><th data-type="str">label</th><th data-type="str">prediction</th>'
        '<th data-type="num">score</th><th data-type="str">map explains</th><th data-type="num">IoU</th>'
        + ('<th data-type="num">refined IoU</th>' if refined else "")
        + '<th data-type="num">boxes</th></tr>'
    )
    legend = (
        "Click a column header to sort. IoU: <code>boxes[0]</code> against the box around the ground-truth mask. "
        "Green: weak boxes (thick: <code>boxes[0]</code>); red: ground-truth mask outline and its box."
    )
    if refined:
        legend += (
            " Magenta: outline of the refined lesion mask (<code>mask_rle</code>, <code>camjobs run --refine</code>);"
            " refined IoU: <code>refined_boxes[0]</code> against the same box (0 where the refinement found"
            " nothing, n/a without ground truth)."
        )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<p>{html.escape(summary)}</p>\n{note_html}\n{failed_html}\n"
        f"<p>{legend}</p>\n"
        f'<table id="gallery">\n<thead>{header}</thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody>\n</table>\n"
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------- the command
def _heatmaps(output: str, items: Sequence[VizItem]) -> dict[tuple[str, str], bytes]:
    """heatmap_png of the chosen rows only: the heavy column is read for those, not for all."""
    if not items:
        return {}
    ids = pa.array(sorted({item.image_id for item in items}), pa.string())
    table = open_cams(output).to_table(
        columns=["image_id", "run_id", "heatmap_png"], filter=pc.field("image_id").isin(ids)
    )
    return {
        (i, r): h
        for i, r, h in zip(table["image_id"].to_pylist(), table["run_id"].to_pylist(), table["heatmap_png"].to_pylist())
    }


def _decode_heatmap(png: bytes | None, item: VizItem) -> np.ndarray | None:
    if not png:
        return None
    heatmap = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if heatmap is not None and heatmap.shape != (item.height, item.width):
        heatmap = cv2.resize(heatmap, (item.width, item.height), interpolation=cv2.INTER_LINEAR)
    return heatmap


def read_items(output: str, data: str | None = None, layout: str = "auto") -> list[VizItem]:
    """The newest row per image of OUTPUT/cams, with its ground-truth mask's path where --data has one."""
    try:
        table = read_newest_cams(output, VIZ_COLUMNS)
    except NoResults as exc:
        raise VizError(str(exc)) from exc
    items = [VizItem(**{name: row[name] for name in VIZ_COLUMNS}) for row in table.to_pylist()]
    if not items:
        raise VizError(f"{output.rstrip('/')}/cams holds no rows")
    masks = dataset_masks(data, layout)[0] if data else {}
    if data and not masks:
        log.warning("%s lists no ground-truth masks: no IoU", data)
    for item in items:
        item.boxes = list(item.boxes or [])
        item.mask_path = masks.get(item.image_id)
    return items


def draw_item(item: VizItem, heatmap_png: bytes | None, tile_size: int = TILE_SIZE) -> np.ndarray:
    """The item's panel, its image decoded from source_path (ImageInputError where it cannot be)."""
    rgb = decode_image(read_bytes(item.source_path), source=item.source_path)
    if rgb.shape[:2] != (item.height, item.width):
        log.warning(
            "%s decodes to %dx%d, the row says %dx%d (file changed since the run?): resized",
            item.image_id,
            rgb.shape[1],
            rgb.shape[0],
            item.width,
            item.height,
        )
        rgb = cv2.resize(rgb, (item.width, item.height), interpolation=cv2.INTER_AREA)
    mask = None
    if item.mask_path:
        try:
            mask = mask_for(item)
        except (OSError, ValueError):
            mask = None
    refined = rle_mask(item.mask_rle, item.width, item.height) if item.mask_rle else None
    return render_panel(
        rgb, _decode_heatmap(heatmap_png, item), item.boxes, caption_lines(item), mask, tile_size, refined
    )


def _summary(output: str, drawn: Sequence[VizItem], total: int, sort: str, key: str) -> str:
    with_iou = [item.iou for item in drawn if item.iou is not None]
    summary = f"{len(drawn)} of {total} images from {output}, ordered {sort} by {key}"
    if with_iou:
        summary += f"; mean IoU of the shown images {sum(with_iou) / len(with_iou):.3f} ({len(with_iou)} with a mask)"
    refined_iou = [item.refined_iou for item in drawn if item.refined_iou is not None]
    if refined_iou:
        summary += f"; of their refined boxes {sum(refined_iou) / len(refined_iou):.3f} ({len(refined_iou)} refined)"
    return summary


def render_gallery(
    output: str,
    to: str | os.PathLike,
    *,
    limit: int = DEFAULT_LIMIT,
    sort: str = "worst",
    data: str | None = None,
    layout: str = "auto",
    tile_size: int = TILE_SIZE,
    seed: int = RANDOM_SEED,
    progress: Callable[[str], None] | None = None,
) -> VizResult:
    """Write up to `limit` panels and index.html into the local folder `to`."""
    if limit < 1:
        raise VizError(f"--limit must be >= 1, got {limit}")
    if sort not in SORTS:
        raise VizError(f"--sort must be one of {', '.join(SORTS)}, got {sort!r}")
    items = read_items(output, data, layout)
    if sort != "random":  # the order needs the IoU of every image with a mask
        fill_iou(items)
    ordered, key, note = order_items(items, sort, seed)
    chosen = ordered[:limit]
    fill_iou(chosen)
    if note:
        log.warning("%s", note)

    folder = Path(to)
    folder.mkdir(parents=True, exist_ok=True)
    heatmaps = _heatmaps(output, chosen)
    drawn, failed = [], []
    for number, item in enumerate(chosen, start=1):
        try:
            panel = draw_item(item, heatmaps.get((item.image_id, item.run_id)), tile_size)
        except ImageInputError as exc:
            failed.append((item.image_id, str(exc)))
            log.warning("%s not drawn: %s", item.image_id, exc)
            continue
        item.png = png_name(item.image_id)
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(panel, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError(f"PNG encoding of the panel of {item.image_id!r} failed")
        (folder / item.png).write_bytes(encoded.tobytes())
        drawn.append(item)
        if progress:
            progress(f"{number}/{len(chosen)} {item.image_id}")

    index = folder / "index.html"
    summary = _summary(output, drawn, len(items), sort, key)
    index.write_text(
        gallery_html(drawn, title="camjobs: class activation maps", summary=summary, note=note, failed=failed),
        encoding="utf-8",
    )
    return VizResult(str(folder), str(index), drawn, sort, key, note, failed)

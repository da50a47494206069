"""One synthetic dermoscopy image: skin, a lesion whose look depends on its class, and confounders.

``render_image`` draws it with numpy/cv2, deterministic for its seeds. The class shows only in
the lesion (shape, border, size, colours, texture); skin tone, blotches, hairs, dermoscope
vignetting, calibration stickers and rulers are drawn independently of the class. The mask is
exactly the filled lesion contour (no lesion colour is drawn outside it). ``camjobs.synth``
writes whole datasets of these images.

This module must not import ray or torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from camjobs.geometry import mask_box
from camjobs.synth_styles import COLOURS, STYLES, Style

HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


# --------------------------------------------------------------------------- helpers
def seed_words(seed: int | Sequence[int]) -> list[int]:
    """Seed(s) as non-negative ints for np.random.SeedSequence (negative ints are folded)."""
    seq = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
    return [int(s) % (1 << 64) for s in seq]


def _u(rng: np.random.Generator, lohi: tuple[float, float]) -> float:
    return float(rng.uniform(lohi[0], lohi[1]))


def _smooth(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field of shape (h, w), roughly zero mean / unit std, ~``cells`` bumps across."""
    gh = max(2, int(round(cells * h / max(h, w))) + 2)
    gw = max(2, int(round(cells * w / max(h, w))) + 2)
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: float) -> np.ndarray:
    c = np.asarray(rgb, np.float32) * float(rng.uniform(1 - amount, 1 + amount))
    c += rng.normal(0.0, 255 * amount * 0.3, 3).astype(np.float32)
    return np.clip(c, 0, 255)


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) float32 pixel coordinate grids (cached; treat as read-only)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


# --------------------------------------------------------------------------- background
def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Skin: tone varies per image, low-frequency blotches (erythema), fine noise and skin lines."""
    light = rng.uniform(0.0, 1.0)
    tone = np.array(
        [
            250 - 62 * light + rng.normal(0, 6),
            204 - 88 * light + rng.normal(0, 7),
            190 - 88 * light + rng.normal(0, 8),
        ],
        np.float32,
    )
    tone = np.clip(tone, 60, 255)
    # everything below is smooth or grain-sized, so it is built at half resolution and
    # upsampled once: low-frequency brightness and redness blotches, fine grain and a
    # faint crossing skin-line texture
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    bright = _smooth(rng, h2, w2, int(rng.integers(2, 5))) * float(rng.uniform(0.02, 0.07))
    bright += _smooth(rng, h2, w2, int(rng.integers(6, 12))) * float(rng.uniform(0.01, 0.03))
    red = np.maximum(_smooth(rng, h2, w2, int(rng.integers(3, 7))) + 0.3, 0.0) * float(rng.uniform(0.0, 0.07))
    grain = rng.standard_normal((h2, w2), dtype=np.float32) * float(rng.uniform(0.012, 0.03))
    lines = _smooth(rng, h2, w2, 40)
    base = 1.0 + bright + grain - np.exp(-((lines * 2.5) ** 2)) * float(rng.uniform(0.0, 0.04))
    small = np.empty((h2, w2, 3), np.float32)
    small[..., 0] = base * (tone[0] * (1.0 + 0.3 * red))
    small[..., 1] = base * (tone[1] * (1.0 - 0.6 * red))
    small[..., 2] = base * (tone[2] * (1.0 - 0.5 * red))
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return img, tone


# --------------------------------------------------------------------------- lesion
@dataclass
class _Lesion:
    colour: np.ndarray  # (S, S, 3) float32 RGB, lesion-local canvas
    contour: np.ndarray  # (K, 2) float32 points in canvas coordinates
    extent: float  # max distance of the contour from the canvas centre (px)
    fade: float
    edge_floor: float
    opacity: float


def _border(rng: np.random.Generator, st: Style) -> tuple[np.ndarray, np.ndarray]:
    """(theta, r): the polar contour r(theta) at 360 angles with a class-dependent spectrum."""
    K = 360
    theta = np.linspace(0.0, 2 * np.pi, K, endpoint=False, dtype=np.float32)
    r = np.ones(K, np.float32)
    asym, irr = _u(rng, st.asym), _u(rng, st.irregular)
    for k in range(2, 33):
        if k <= 3:
            amp = asym
        elif k <= 7:
            amp = 0.25 * asym + 0.5 * irr
        else:
            amp = irr * (7.0 / k) ** 1.5
        if amp > 0:
            r += amp * float(rng.normal()) * np.cos(k * theta + float(rng.uniform(0, 2 * np.pi)))
    return theta, np.maximum(r, 0.35)


def _colour_regions(st: Style, rng: np.random.Generator, rho: np.ndarray) -> np.ndarray:
    """(S, S, 3) colours: a softmax over smooth random fields, one per palette colour."""
    S = rho.shape[0]
    n_col = int(rng.integers(st.n_colours[0], st.n_colours[1] + 1))
    extra = list(st.palette[st.n_base :])
    rng.shuffle(extra)
    names = list(st.palette[: st.n_base]) + extra[: max(0, n_col - st.n_base)]
    cols = np.stack([_jitter(COLOURS[nm], rng, 0.08) for nm in names])
    cells = int(rng.integers(st.cells[0], st.cells[1] + 1))
    logits = np.stack(
        [
            _smooth(rng, S, S, cells) * st.sharp
            + float(rng.normal(0, 0.5))
            + float(rng.normal(0, 1.0)) * (1.0 - rho) * (1 if i else 0)
            for i in range(len(names))
        ]
    )
    logits[: st.n_base] += 1.0  # the base colours dominate
    logits -= logits.max(axis=0, keepdims=True)
    wts = np.exp(logits)
    wts /= wts.sum(axis=0, keepdims=True)
    colour = np.empty((S, S, 3), np.float32)
    for ch in range(3):
        acc = wts[0] * cols[0, ch]
        for j in range(1, len(names)):
            acc += wts[j] * cols[j, ch]
        colour[..., ch] = acc
    return colour


def _pigment_network(
    dx: str, st: Style, rng: np.random.Generator, colour: np.ndarray, rho: np.ndarray, scale: float
) -> None:
    """Darken colour in place by a pigment network (ridged mid-frequency noise), fading towards the border."""
    net_s = _u(rng, st.network)
    if net_s <= 0:
        return
    S = rho.shape[0]
    yy, xx = _grid(S, S)
    # reticular mesh: two warped families of lines -> a honeycomb-like network
    period = scale * float(rng.uniform(0.022, 0.032))
    a0 = float(rng.uniform(0, np.pi))
    u = (xx * math.cos(a0) + yy * math.sin(a0)) * (np.pi / period)
    v = (-xx * math.sin(a0) + yy * math.cos(a0)) * (np.pi / period)
    u += _smooth(rng, S, S, max(3, int(S / period / 2.5))) * 2.5
    v += _smooth(rng, S, S, max(3, int(S / period / 2.5))) * 2.5
    m = np.minimum(np.abs(np.sin(u)), np.abs(np.sin(v)))
    net = np.exp(-((m * 3.0) ** 2))
    if dx == "mel":  # atypical: broadened, irregular network
        net *= 0.5 + 0.5 * (_smooth(rng, S, S, 4) > 0)
    else:
        net *= np.clip(1.3 - rho, 0, 1)
    colour *= (1.0 - net_s * net)[..., None]


def _fine_texture(dx: str, st: Style, rng: np.random.Generator, colour: np.ndarray, scale: float) -> None:
    """Modulate colour in place by a fine texture (waxy / cerebriform for bkl)."""
    if st.texture > 0:
        S = colour.shape[0]
        t = _smooth(rng, S, S, max(8, int(S / (scale * 0.02))))
        if dx == "bkl":
            t = 1.0 - 2.0 * np.exp(-((t * 2.0) ** 2))  # gyri and sulci
        colour *= (1.0 + st.texture * t)[..., None]


def _make_lesion(dx: str, rng: np.random.Generator, scale: float) -> _Lesion:
    """Draw one lesion (shape + colour texture) in its own square canvas."""
    st = STYLES[dx]
    R = _u(rng, st.radius) * scale
    aspect = _u(rng, st.aspect)
    theta, r = _border(rng, st)
    px = R * r * np.cos(theta)
    py = R * aspect * r * np.sin(theta)
    extent = float(np.max(np.hypot(px, py)))
    S = int(2 * math.ceil(extent * 1.08) + 8)
    c = S / 2.0
    contour = np.stack([px + c, py + c], axis=1).astype(np.float32)

    yy, xx = _grid(S, S)
    dx_, dy_ = xx - c, yy - c
    ang = np.arctan2(dy_ / aspect, dx_)
    # normalised radius: 0 at the centre, 1 on the border
    rb = np.interp(ang.ravel(), theta, r, period=2 * np.pi).reshape(S, S).astype(np.float32)
    rho = np.sqrt(dx_**2 + (dy_ / aspect) ** 2) / (R * rb)

    colour = _colour_regions(st, rng, rho)
    _pigment_network(dx, st, rng, colour, rho, scale)
    _fine_texture(dx, st, rng, colour, scale)
    _class_features(dx, rng, colour, rho, R, aspect, scale, c)
    np.clip(colour, 0, 255, out=colour)
    return _Lesion(
        colour=colour,
        contour=contour,
        extent=extent,
        fade=_u(rng, st.fade) * scale / 450.0,
        edge_floor=_u(rng, st.edge_floor),
        opacity=_u(rng, st.opacity),
    )


def _points_inside(rng, n, R, aspect, c, rmax=0.85, rmin=0.0):
    a = rng.uniform(0, 2 * np.pi, n)
    rr = R * np.sqrt(rng.uniform(rmin**2, rmax**2, n))
    return np.stack([c + rr * np.cos(a), c + aspect * rr * np.sin(a)], axis=1)


def _class_features(dx, rng, colour, rho, R, aspect, scale, c) -> None:
    """Dots, globules, veils, vessels, lacunae... drawn in place on the lesion canvas."""
    s = scale / 450.0
    if dx == "nv":
        # a few regular brown globules, sometimes a slightly darker centre
        for x, y in _points_inside(rng, int(rng.integers(0, 8)), R, aspect, c, 0.7):
            rad = max(1, int(round(rng.uniform(1.5, 3.0) * s)))
            cv2.circle(colour, (int(x), int(y)), rad, tuple(float(v) for v in COLOURS["dark_brown"]), -1, cv2.LINE_AA)
        if rng.random() < 0.5:
            colour *= (1.0 - 0.15 * np.clip(1.0 - rho, 0, 1))[..., None]
    elif dx == "mel":
        # irregular black dots/globules, more towards the periphery
        for x, y in _points_inside(rng, int(rng.integers(6, 30)), R, aspect, c, 0.95, 0.3):
            rad = max(1, int(round(rng.uniform(1.0, 4.5) * s)))
            cv2.circle(colour, (int(x), int(y)), rad, tuple(float(v) for v in COLOURS["black"]), -1, cv2.LINE_AA)
        # blue-white veil / regression area
        if rng.random() < 0.5:
            veil = np.clip(_smooth(rng, *rho.shape, 3) - 0.5, 0, None)
            veil = np.clip(veil * 1.2, 0, 0.6) * (rho < 1.0)
            vc = _jitter(COLOURS["blue_grey"] if rng.random() < 0.7 else COLOURS["white"], rng, 0.06)
            colour += veil[..., None] * (vc - colour)
    elif dx == "bkl":
        # milia-like cysts (white dots) and comedo-like openings (dark dots)
        for x, y in _points_inside(rng, int(rng.integers(4, 25)), R, aspect, c, 0.85):
            rad = max(1, int(round(rng.uniform(1.5, 3.5) * s)))
            cv2.circle(colour, (int(x), int(y)), rad, (238.0, 230.0, 205.0), -1, cv2.LINE_AA)
        for x, y in _points_inside(rng, int(rng.integers(2, 12)), R, aspect, c, 0.85):
            rad = max(1, int(round(rng.uniform(1.5, 3.5) * s)))
            cv2.circle(colour, (int(x), int(y)), rad, tuple(float(v) for v in COLOURS["dark_brown"]), -1, cv2.LINE_AA)
    elif dx == "akiec":
        # white scale patches on a pink-red background
        sc = np.clip(_smooth(rng, *rho.shape, 10) - 0.8, 0, None) * 1.5
        sc = np.clip(sc, 0, 0.8)
        colour += sc[..., None] * (np.array(COLOURS["white"], np.float32) - colour)
    elif dx == "bcc":
        # blue-grey ovoid nests
        for x, y in _points_inside(rng, int(rng.integers(1, 6)), R, aspect, c, 0.7):
            ax = (max(2, int(rng.uniform(4, 12) * s)), max(2, int(rng.uniform(3, 8) * s)))
            cv2.ellipse(
                colour,
                (int(x), int(y)),
                ax,
                float(rng.uniform(0, 180)),
                0,
                360,
                tuple(float(v) for v in _jitter(COLOURS["blue_grey"], rng, 0.05)),
                -1,
                cv2.LINE_AA,
            )
        # arborizing vessels: branching red lines
        for _ in range(int(rng.integers(2, 6))):
            p = _points_inside(rng, 1, R, aspect, c, 0.6)[0]
            a = rng.uniform(0, 2 * np.pi)
            for _seg in range(int(rng.integers(4, 10))):
                ln = rng.uniform(6, 18) * s
                q = p + ln * np.array([np.cos(a), np.sin(a)])
                cv2.line(
                    colour,
                    (int(p[0]), int(p[1])),
                    (int(q[0]), int(q[1])),
                    tuple(float(v) for v in COLOURS["red"]),
                    max(1, int(round(1.5 * s))),
                    cv2.LINE_AA,
                )
                p, a = q, a + rng.normal(0, 0.6)
    elif dx == "df":
        # central white scar-like patch
        w = np.clip(1.0 - rho / rng.uniform(0.35, 0.55), 0, 1) ** 0.7
        colour += (0.85 * w)[..., None] * (_jitter(COLOURS["white"], rng, 0.04) - colour)
    elif dx == "vasc":
        # red/purple lacunae separated by lighter septa
        for x, y in _points_inside(rng, int(rng.integers(6, 18)), R, aspect, c, 0.8):
            rad = max(2, int(round(rng.uniform(3, 9) * s)))
            col = _jitter(COLOURS["dark_red"] if rng.random() < 0.5 else COLOURS["purple"], rng, 0.08)
            cv2.circle(colour, (int(x), int(y)), rad, tuple(float(v) for v in col), -1, cv2.LINE_AA)


# --------------------------------------------------------------------------- confounders
def _draw_hairs(rng: np.random.Generator, img: np.ndarray, scale: float) -> None:
    h, w = img.shape[:2]
    u = rng.random()
    n = int(rng.integers(0, 3)) if u < 0.4 else int(rng.integers(3, 11)) if u < 0.8 else int(rng.integers(11, 40))
    if n == 0:
        return
    layer = np.zeros((h, w), np.uint8)
    t = np.linspace(0.0, 1.0, 24)[:, None]
    for _ in range(n):
        p0 = np.array([rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h])
        a = rng.uniform(0, 2 * np.pi)
        ln = rng.uniform(0.15, 0.9) * max(w, h)
        p2 = p0 + ln * np.array([np.cos(a), np.sin(a)])
        bend = rng.normal(0, 0.18) * ln
        p1 = (p0 + p2) / 2 + bend * np.array([-np.sin(a), np.cos(a)])
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        thick = max(1, int(round((1 if rng.random() < 0.6 else 2) * scale / 450.0)))
        cv2.polylines(
            layer, [np.round(pts * 16).astype(np.int32)], False, int(rng.integers(150, 256)), thick, cv2.LINE_AA, 4
        )
    col = np.array([rng.uniform(20, 70)] * 3, np.float32) * np.array([1.0, 0.85, 0.75], np.float32)
    x, y, bw, bh = cv2.boundingRect(layer)
    if bw == 0 or bh == 0:
        return
    alpha = layer[y : y + bh, x : x + bw].astype(np.float32) * (1.0 / 255.0)
    roi = img[y : y + bh, x : x + bw]
    roi += alpha[..., None] * (col - roi)


def _draw_sticker(rng: np.random.Generator, img: np.ndarray, anchor: tuple[float, float], scale: float) -> None:
    palette = [(60, 170, 80), (50, 90, 200), (230, 200, 40), (200, 40, 40), (240, 240, 240), (150, 150, 150)]
    s = scale / 450.0
    x, y = anchor
    n = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
    size = rng.uniform(9, 20) * s
    disc = rng.random() < 0.5
    step = 2.3 * size
    direction = rng.integers(0, 2)
    for i in range(n):
        cx = x + (i * step if direction == 0 else 0)
        cy = y + (i * step if direction == 1 else 0)
        col = tuple(float(v) for v in palette[int(rng.integers(len(palette)))])
        if disc:
            cv2.circle(img, (int(cx), int(cy)), int(size), col, -1, cv2.LINE_AA)
            cv2.circle(img, (int(cx), int(cy)), int(size), (60.0, 60.0, 60.0), 1, cv2.LINE_AA)
        else:
            p0 = (int(cx - size), int(cy - size))
            p1 = (int(cx + size), int(cy + size))
            cv2.rectangle(img, p0, p1, col, -1)
            cv2.rectangle(img, p0, p1, (60.0, 60.0, 60.0), 1)


def _draw_ruler(rng: np.random.Generator, img: np.ndarray, edge: int, scale: float) -> None:
    h, w = img.shape[:2]
    s = scale / 450.0
    thick = int(rng.uniform(16, 28) * s)
    inset = int(rng.uniform(3, 30) * s)
    spacing = rng.uniform(7, 12) * s
    alpha = rng.uniform(0.6, 0.9)
    body = np.array([rng.uniform(215, 245), rng.uniform(215, 240), rng.uniform(190, 230)], np.float32)
    tick_col = (35.0, 35.0, 40.0)
    horizontal = edge in (0, 2)  # 0 top, 1 right, 2 bottom, 3 left
    length = w if horizontal else h
    start = int(rng.uniform(0, 0.4) * length)
    end = int(rng.uniform(0.6, 1.0) * length)
    if horizontal:
        y0 = inset if edge == 0 else h - inset - thick
        sl = (slice(y0, y0 + thick), slice(start, end))
    else:
        x0 = inset if edge == 3 else w - inset - thick
        sl = (slice(start, end), slice(x0, x0 + thick))
    img[sl] += alpha * (body - img[sl])
    # ticks from the outer side of the ruler, every 5th longer
    for i, pos in enumerate(np.arange(start + spacing, end, spacing)):
        tl = thick * (0.7 if i % 5 == 4 else 0.35)
        p = int(round(pos))
        if horizontal:
            ys = y0 if edge == 0 else y0 + thick - 1
            ye = ys + (tl if edge == 0 else -tl)
            cv2.line(img, (p, ys), (p, int(ye)), tick_col, 1, cv2.LINE_AA)
        else:
            xs = x0 if edge == 3 else x0 + thick - 1
            xe = xs + (tl if edge == 3 else -tl)
            cv2.line(img, (xs, p), (int(xe), p), tick_col, 1, cv2.LINE_AA)


def _vignette(rng: np.random.Generator, img: np.ndarray) -> None:
    """Dark circular rim of the dermoscope lens (strength varies, sometimes absent)."""
    h, w = img.shape[:2]
    strength = float(rng.uniform(0.0, 0.2)) if rng.random() < 0.3 else float(rng.uniform(0.5, 1.0))
    half_diag = 0.5 * math.hypot(w, h)
    r0 = float(rng.uniform(0.78, 1.05)) * half_diag
    width = float(rng.uniform(0.04, 0.2)) * half_diag
    cx = w / 2 + rng.normal(0, 0.03) * w
    cy = h / 2 + rng.normal(0, 0.03) * h
    if strength < 0.02:
        return
    # smooth, so computed at quarter resolution and upsampled
    f = 4
    hq, wq = (h + f - 1) // f, (w + f - 1) // f
    yy, xx = _grid(hq, wq)
    r = np.sqrt((xx * f + (f - 1) / 2 - cx) ** 2 + (yy * f + (f - 1) / 2 - cy) ** 2)
    t = np.clip((r - (r0 - width)) / (2 * width), 0.0, 1.0)
    t = 1.0 - strength * (t * t * (3 - 2 * t))
    t = cv2.resize(t, (w, h), interpolation=cv2.INTER_LINEAR)
    img *= t[..., None]


# --------------------------------------------------------------------------- one image
def _place(rng: np.random.Generator, les: _Lesion, w: int, h: int) -> tuple[np.ndarray, float, float]:
    """(M, cx, cy): the canvas -> image affine (rotation, zoom, placement) and the lesion centre in the image."""
    zoom = float(rng.uniform(0.88, 1.12))
    angle = float(rng.uniform(0, 360))
    ext = les.extent * zoom
    lo_x, hi_x = max(0.8 * ext, 0.1 * w), min(w - 0.8 * ext, 0.9 * w)
    lo_y, hi_y = max(0.8 * ext, 0.1 * h), min(h - 0.8 * ext, 0.9 * h)
    cx = float(rng.uniform(lo_x, hi_x)) if hi_x > lo_x else w / 2
    cy = float(rng.uniform(lo_y, hi_y)) if hi_y > lo_y else h / 2
    S = les.colour.shape[0]
    M = cv2.getRotationMatrix2D((S / 2.0, S / 2.0), angle, zoom)
    M[0, 2] += cx - S / 2.0
    M[1, 2] += cy - S / 2.0
    return M, cx, cy


def _lesion_mask(les: _Lesion, M: np.ndarray, cx: float, cy: float, h: int, w: int) -> tuple[np.ndarray, tuple]:
    """(mask, box): the filled contour in the image (0/255) and its box, never empty."""
    pts = les.contour @ M[:, :2].T + M[:, 2]
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_8, 4)
    box = mask_box(mask)
    if box is None:  # cannot happen with the placement of _place; keep the contract anyway
        cv2.circle(mask, (int(cx), int(cy)), 3, 255, -1)
        box = mask_box(mask)
    return mask, box


def _paint_lesion(img: np.ndarray, tone: np.ndarray, les: _Lesion, M: np.ndarray, mask: np.ndarray, box: tuple) -> None:
    """Blend the warped lesion colours into img in place, inside the mask, faded towards its border."""
    h, w = mask.shape
    # work only in the lesion's bounding box (plus a margin)
    x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(0, x0 - 2), max(0, y0 - 2), min(w, x1 + 2), min(h, y1 + 2)
    Mroi = M.copy()
    Mroi[0, 2] -= x0
    Mroi[1, 2] -= y0
    col = cv2.warpAffine(les.colour, Mroi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    mroi = mask[y0:y1, x0:x1]
    dist = cv2.distanceTransform(mroi, cv2.DIST_L2, 3)
    a = np.clip(dist / max(les.fade, 1e-3), 0.0, 1.0)
    alpha = les.opacity * (les.edge_floor + (1.0 - les.edge_floor) * a) * (mroi > 0)
    bg = img[y0:y1, x0:x1]
    # carry the skin's blotches and grain into the lesion (pigment sits in the skin)
    skin_mod = np.sqrt(np.clip(bg / tone, 0.3, 2.0))
    img[y0:y1, x0:x1] = bg + alpha[..., None] * (col * skin_mod - bg)


def _draw_confounders(
    rng: np.random.Generator, img: np.ndarray, cx: float, cy: float, scale: float, has_sticker: bool, has_ruler: bool
) -> None:
    """Class-independent confounders, in place: sticker and ruler away from the lesion, hairs, vignetting."""
    h, w = img.shape[:2]
    if has_sticker:
        corners = [(0.1 * w, 0.12 * h), (0.9 * w, 0.12 * h), (0.1 * w, 0.88 * h), (0.9 * w, 0.88 * h)]
        far = max(corners, key=lambda p: (p[0] - cx) ** 2 + (p[1] - cy) ** 2)
        ax = far[0] + rng.normal(0, 0.03 * w) - (0.08 * w if far[0] > w / 2 else 0)
        ay = far[1] + rng.normal(0, 0.03 * h) - (0.08 * h if far[1] > h / 2 else 0)
        _draw_sticker(rng, img, (ax, ay), scale)
    if has_ruler:
        dists = [cy, w - cx, h - cy, cx]  # distance of the lesion centre to top/right/bottom/left
        _draw_ruler(rng, img, int(np.argmax(dists)), scale)
    _draw_hairs(rng, img, scale)
    _vignette(rng, img)


def render_image(
    dx: str,
    *,
    seed: int | Sequence[int],
    lesion_seed: int | Sequence[int] | None = None,
    width: int = 600,
    height: int = 450,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic dermoscopy image of class ``dx``.

    ``lesion_seed`` fixes the lesion (shape, colours, texture); ``seed`` fixes the view
    (placement, rotation, zoom) and everything else (skin, hairs, vignetting, sticker,
    ruler).  Images sharing a ``lesion_seed`` show the same lesion.

    Returns ``(rgb, mask)``: ``rgb`` uint8 (height, width, 3) in RGB order and ``mask``
    uint8 (height, width) with values 0/255 (the filled lesion contour).
    """
    if dx not in STYLES:
        raise ValueError(f"unknown dx {dx!r}; expected one of {HAM10000_CLASSES}")
    rng = np.random.default_rng([*seed_words(seed), 1])
    lrng = np.random.default_rng([*seed_words(seed if lesion_seed is None else lesion_seed), 2])
    h, w = int(height), int(width)
    scale = float(min(h, w))

    # draw the class-independent confounder decisions first, so they do not depend on dx
    has_sticker = rng.random() < 0.11
    has_ruler = rng.random() < 0.11

    img, tone = _background(rng, h, w)
    # the lesion: drawn in its own canvas, then rotated, zoomed and placed in the image
    les = _make_lesion(dx, lrng, scale)
    M, cx, cy = _place(rng, les, w, h)
    mask, box = _lesion_mask(les, M, cx, cy, h, w)
    _paint_lesion(img, tone, les, M, mask, box)
    _draw_confounders(rng, img, cx, cy, scale, has_sticker, has_ruler)
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return rgb, mask

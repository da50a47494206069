"""How each HAM10000 diagnosis looks in a synthetic image: its lesion's size, shape, border,
colours and texture, as ranges that camjobs.synth_image draws from.

The classes differ only in these; everything else in an image (skin, hairs, rims, rulers) is
drawn independently of the class.
"""

from __future__ import annotations

from dataclasses import dataclass

# Colours are RGB.
COLOURS = {
    "tan": (200, 158, 112),
    "light_brown": (172, 118, 78),
    "brown": (135, 85, 52),
    "dark_brown": (88, 52, 32),
    "black": (40, 28, 24),
    "blue_grey": (98, 104, 126),
    "red": (178, 66, 64),
    "pink": (214, 132, 126),
    "white": (226, 212, 204),
    "purple": (112, 46, 78),
    "dark_red": (120, 30, 38),
    "yellow_tan": (208, 176, 120),
}


@dataclass(frozen=True)
class Style:
    radius: tuple[float, float]  # fraction of min(width, height)
    aspect: tuple[float, float]  # minor/major axis ratio
    asym: tuple[float, float]  # amplitude of low-frequency (k=2..3) contour deformation
    irregular: tuple[float, float]  # amplitude of high-frequency border noise
    palette: tuple[str, ...]  # candidate colours; the first n_base are always used
    n_base: int
    n_colours: tuple[int, int]  # total colours in the lesion
    sharp: float  # softmax sharpness of the colour regions (higher = crisper patches)
    cells: tuple[int, int]  # colour-field grid resolution (more = smaller patches)
    network: tuple[float, float]  # pigment network darkening
    texture: float  # fine texture amplitude
    fade: tuple[float, float]  # edge fade width in px (at 450 px image height)
    edge_floor: tuple[float, float]  # opacity at the border relative to the inside
    opacity: tuple[float, float]


STYLES: dict[str, Style] = {
    # common mole: small-medium, round, symmetric, uniform brown, soft edge, regular network
    "nv": Style(
        radius=(0.13, 0.26),
        aspect=(0.78, 1.0),
        asym=(0.0, 0.04),
        irregular=(0.0, 0.012),
        palette=("brown", "light_brown", "dark_brown"),
        n_base=1,
        n_colours=(1, 2),
        sharp=1.2,
        cells=(2, 3),
        network=(0.10, 0.28),
        texture=0.04,
        fade=(6.0, 14.0),
        edge_floor=(0.2, 0.45),
        opacity=(0.85, 0.97),
    ),
    # melanoma: larger, asymmetric, irregular border, variegated dark brown/black/blue-grey/red
    "mel": Style(
        radius=(0.19, 0.36),
        aspect=(0.55, 0.92),
        asym=(0.07, 0.15),
        irregular=(0.03, 0.07),
        palette=("dark_brown", "black", "blue_grey", "brown", "red", "white", "blue_grey"),
        n_base=2,
        n_colours=(3, 5),
        sharp=2.2,
        cells=(3, 6),
        network=(0.2, 0.45),
        texture=0.07,
        fade=(1.0, 4.0),
        edge_floor=(0.55, 0.85),
        opacity=(0.92, 1.0),
    ),
    # benign keratosis: medium, waxy light brown/tan, cerebriform texture, milia, sharp edge
    "bkl": Style(
        radius=(0.15, 0.31),
        aspect=(0.6, 0.95),
        asym=(0.04, 0.1),
        irregular=(0.02, 0.05),
        palette=("light_brown", "tan", "yellow_tan", "brown"),
        n_base=1,
        n_colours=(2, 3),
        sharp=1.5,
        cells=(2, 4),
        network=(0.0, 0.0),
        texture=0.10,
        fade=(1.0, 3.0),
        edge_floor=(0.85, 0.95),
        opacity=(0.85, 0.95),
    ),
    # actinic keratosis / Bowen: pink-red, scaly white, ill-defined
    "akiec": Style(
        radius=(0.1, 0.22),
        aspect=(0.6, 0.95),
        asym=(0.05, 0.12),
        irregular=(0.03, 0.07),
        palette=("pink", "red", "light_brown", "white"),
        n_base=1,
        n_colours=(2, 4),
        sharp=1.5,
        cells=(3, 5),
        network=(0.0, 0.0),
        texture=0.1,
        fade=(10.0, 20.0),
        edge_floor=(0.1, 0.3),
        opacity=(0.6, 0.8),
    ),
    # basal cell carcinoma: pink translucent, blue-grey ovoid nests, arborizing vessels
    "bcc": Style(
        radius=(0.1, 0.2),
        aspect=(0.65, 0.95),
        asym=(0.04, 0.1),
        irregular=(0.02, 0.06),
        palette=("pink", "white", "blue_grey"),
        n_base=1,
        n_colours=(2, 3),
        sharp=1.5,
        cells=(2, 4),
        network=(0.0, 0.0),
        texture=0.05,
        fade=(5.0, 10.0),
        edge_floor=(0.3, 0.5),
        opacity=(0.6, 0.8),
    ),
    # dermatofibroma: small, round, brown ring with white centre
    "df": Style(
        radius=(0.06, 0.12),
        aspect=(0.75, 1.0),
        asym=(0.0, 0.05),
        irregular=(0.0, 0.02),
        palette=("light_brown", "brown"),
        n_base=1,
        n_colours=(1, 2),
        sharp=1.0,
        cells=(2, 3),
        network=(0.1, 0.25),
        texture=0.04,
        fade=(6.0, 12.0),
        edge_floor=(0.2, 0.4),
        opacity=(0.75, 0.9),
    ),
    # vascular lesion: small-medium, round, well demarcated, red/purple lacunae
    "vasc": Style(
        radius=(0.06, 0.14),
        aspect=(0.7, 1.0),
        asym=(0.02, 0.06),
        irregular=(0.0, 0.03),
        palette=("red", "purple", "dark_red"),
        n_base=1,
        n_colours=(2, 3),
        sharp=2.0,
        cells=(2, 4),
        network=(0.0, 0.0),
        texture=0.04,
        fade=(1.0, 3.0),
        edge_floor=(0.8, 0.95),
        opacity=(0.85, 1.0),
    ),
}

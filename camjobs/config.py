"""The typed configuration of one `camjobs run`, shared by the CLI, YAML configs and the job.

It owns the run's defaults and the closed sets of option values (the choice types) of every
command: the stage modules import them from here. Plain Python only (no OpenCV, torch or Ray),
so that `camjobs status` and `--help` start fast.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from camjobs.errors import UsageError

DEFAULT_THRESHOLD = 0.2  # box threshold, a fraction of the map's maximum (Zhou et al. 2015: 0.2)
DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb guard, checked on the header before decoding
# Seconds a run's output lock stays valid unrenewed; the run renews it every third of that (camjobs.output).
DEFAULT_LOCK_LEASE = 600.0


class Choice(str, Enum):
    """A closed set of option values. Typer lists the members in --help and rejects other values
    (exit 2). A member equals its plain string and str() gives it, so configs and summaries keep strings."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Layout(Choice):
    """Dataset layouts (camjobs.layouts lists each), or auto-detection."""

    AUTO = "auto"
    HAM10000 = "ham10000"
    ISIC2017 = "isic2017"
    ISIC2018 = "isic2018"
    ISIC2019 = "isic2019"
    ISIC2020 = "isic2020"
    ISIC_ARCHIVE = "isic-archive"
    FOLDER = "folder"


class Method(Choice):
    """CAM methods (camjobs.cam)."""

    CAM = "cam"
    GRADCAM = "gradcam"
    GRADCAM_PP = "gradcam++"


class Target(Choice):
    """Which class a map explains: the model's prediction, or the image's label."""

    PREDICTED = "predicted"
    LABEL = "label"


class Precision(Choice):
    """The forward pass's precision; auto is bf16 on GPU, fp32 on CPU."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class DecodeOn(Choice):
    """Where JPEGs are decoded: CPU tasks, or the model actors' GPU (nvJPEG)."""

    CPU = "cpu"
    GPU = "gpu"


class WriteMode(Choice):
    """What `camjobs run` does with rows an output already holds for its model and settings (the
    RunConfig flags incremental, overwrite, append; none of them: error)."""

    ERROR = "error"  # refuse: a re-run would silently hold every image twice
    INCREMENTAL = "incremental"  # only images without a row yet (same image_id, same bytes)
    OVERWRITE = "overwrite"  # replace them: readers see the old rows or the new, never neither
    APPEND = "append"  # keep both; camjobs verify accepts the repeat


class Pooling(Choice):
    """The global pooling before a classifier's final Linear layer (camjobs.models.networks)."""

    GAP = "gap"  # average, as the architectures are trained
    GMP = "gmp"  # maximum


class SynthLayout(Choice):
    """The layouts `camjobs synth` generates."""

    HAM10000 = "ham10000"


class ExportFormat(Choice):
    COCO = "coco"
    LABELSTUDIO = "labelstudio"
    YOLO = "yolo"
    ISIC_CSV = "isic-csv"  # every class's probability, not boxes (camjobs.labels.isic_csv)


class CategoryMode(Choice):
    """Export categories: one lesion category, or the model's classes."""

    LESION = "lesion"
    CLASSES = "classes"


class BoxSource(Choice):
    """Which boxes an export writes: refined where a row has them (auto), the CAM's, or the refined ones."""

    AUTO = "auto"
    CAM = "cam"
    REFINED = "refined"


class ImageMode(Choice):
    """How a YOLO export holds its images: symlinks to the run's source files, or copies."""

    LINK = "link"
    COPY = "copy"


# YOLO export: the fraction of images held out for Ultralytics' val split (its autosplit's default)
DEFAULT_VAL_FRACTION = 0.1


class GallerySort(Choice):
    """The gallery's order (camjobs viz)."""

    WORST = "worst"
    BEST = "best"
    RANDOM = "random"


LAYOUTS = tuple(name for name in Layout.values() if name != Layout.AUTO)  # what a dataset can be laid out as
METHODS = Method.values()
TARGETS = Target.values()
PRECISIONS = Precision.values()
DECODE_ON = DecodeOn.values()


class ConfigError(UsageError, ValueError):
    """A job option that is missing, unknown or of the wrong type; the message names it."""


@dataclass
class RunConfig:
    data: str
    output: str
    layout: str = "auto"
    label_column: str | None = None  # isic-archive: the metadata.csv column that holds the labels
    checkpoint: str | None = None
    model: str | None = None
    classes: list[str] | None = None
    weights: str | None = None
    input_size: int | None = None
    method: str = "cam"
    threshold: float = DEFAULT_THRESHOLD
    target: str = "predicted"
    actors: int | None = None
    gpus_per_actor: float | None = None
    batch_size: int | None = None
    precision: str = "auto"
    decode_on: str = "cpu"
    heatmap_max_side: int | None = None
    max_error_fraction: float = 0.05
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_symlinks: bool = False
    incremental: bool = False
    rehash: bool = False  # --incremental: hash every image that has a done row, whatever its fingerprint
    overwrite: bool = False
    append: bool = False
    refine: bool = False
    address: str | None = None
    lock_lease: float = DEFAULT_LOCK_LEASE

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data: a dataset directory or URI is required")
        if not self.output:
            raise ConfigError("output: an output directory or URI is required")
        for name, choice in _CHOICES.items():
            _choice(name, getattr(self, name), choice.values())
        if not self.checkpoint and not self.model:
            raise ConfigError(
                "checkpoint: give --checkpoint PATH, or --model ARCH with --classes a,b,c (or --weights imagenet)"
            )
        if self.checkpoint is None and self.model and not self.classes and self.weights is None:
            raise ConfigError("classes: --model without a checkpoint needs --classes a,b,c (or --weights imagenet)")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold: must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ConfigError(f"max_error_fraction: must be in [0, 1], got {self.max_error_fraction}")
        for name in ("actors", "batch_size", "input_size", "max_pixels", "heatmap_max_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        modes = [f"--{name}" for name in ("incremental", "overwrite", "append") if getattr(self, name)]
        if len(modes) > 1:
            raise ConfigError(f"{' and '.join(modes)}: give one write mode of --incremental, --overwrite, --append")
        if not self.lock_lease > 0:
            raise ConfigError(f"lock_lease: must be > 0 seconds, got {self.lock_lease}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor: must be >= 0, got {self.gpus_per_actor}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a plain mapping (a YAML file, CLI flags), rejecting unknown keys and wrong types."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        checked: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{key}: unknown option (known: {', '.join(sorted(known))})")
            checked[name] = _coerce(name, value, hints[name])
        missing = [n for n in ("data", "output") if n not in checked]
        if missing:
            raise ConfigError(f"{missing[0]}: required option is missing")
        return cls(**checked)

    @property
    def write_mode(self) -> WriteMode:
        return next(
            (WriteMode(name) for name in ("incremental", "overwrite", "append") if getattr(self, name)), WriteMode.ERROR
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self) -> RunConfig:
        """A copy whose local paths (data, output, checkpoint, a weights file) are absolute, as a run summary
        records them: where the run read and wrote, whatever the directory it started in. Spelled as the
        listing spells the images' source_path (symlinks kept), so that the exports find each image's path
        below the dataset root. URIs stay as they are."""
        paths = {name: getattr(self, name) for name in ("data", "output", "checkpoint", "weights")}
        if paths["weights"] is not None and paths["weights"].lower() == "imagenet":
            del paths["weights"]
        return dataclasses.replace(
            self, **{name: _resolve_local(value) for name, value in paths.items() if value is not None}
        )

    def redacted(self) -> dict[str, Any]:
        """to_dict() safe to log or write into a run summary: no credentials in URIs."""
        return {name: redact_uri(value) if isinstance(value, str) else value for name, value in self.to_dict().items()}


_SECRET_QUERY_KEYS = {
    "access_key",
    "secret_key",
    "session_token",
    "token",
    "password",
    "credential",
    "sig",
    "signature",
}


def _resolve_local(path: str) -> str:
    """A local path made absolute (camjobs.layouts does the same to a dataset root); a URI unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def redact_uri(value: str) -> str:
    """Hide a URI's user:password and secret query parameters (pyarrow.fs accepts both)."""
    if "://" not in value:
        return value
    parts = urllib.parse.urlsplit(value)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urllib.parse.urlencode(
        [
            (k, "***" if k.lower() in _SECRET_QUERY_KEYS else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# The RunConfig fields whose values are a Choice's (the CLI types the options with them).
_CHOICES: dict[str, type[Choice]] = {
    "layout": Layout,
    "method": Method,
    "target": Target,
    "precision": Precision,
    "decode_on": DecodeOn,
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a value against a field's type hint; ints are accepted where floats are expected."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if isinstance(value, Enum):  # a CLI choice: the field keeps its plain string
        value = value.value
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be empty")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: `actors: true` is a mistake, not 1.
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value

"""The typed configuration of one `camjobs run`, shared by the CLI, YAML configs and the job."""

from __future__ import annotations

import dataclasses
import types
import typing
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping

from camjobs.decode import DEFAULT_MAX_PIXELS
from camjobs.localize import DEFAULT_THRESHOLD

METHODS = ("cam", "gradcam", "gradcam++")
TARGETS = ("predicted", "label")
PRECISIONS = ("auto", "fp32", "bf16")
DECODE_ON = ("cpu", "gpu")
LAYOUT_CHOICES = ("auto", "ham10000", "isic2017", "isic2018", "isic2019", "isic2020", "folder")


class ConfigError(ValueError):
    """A job option that is missing, unknown or of the wrong type; the message names it."""


@dataclass
class RunConfig:
    data: str
    output: str
    layout: str = "auto"
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
    refine: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data: a dataset directory or URI is required")
        if not self.output:
            raise ConfigError("output: an output directory or URI is required")
        _choice("layout", self.layout, LAYOUT_CHOICES)
        _choice("method", self.method, METHODS)
        _choice("target", self.target, TARGETS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("decode_on", self.decode_on, DECODE_ON)
        if not self.checkpoint and not self.model:
            raise ConfigError("checkpoint: give --checkpoint PATH, or --model ARCH with --classes a,b,c (or --weights imagenet)")
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
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor: must be >= 0, got {self.gpus_per_actor}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def redacted(self) -> dict[str, Any]:
        """to_dict() safe to log or write into a run summary: no credentials in URIs."""
        return {name: redact_uri(value) if isinstance(value, str) else value for name, value in self.to_dict().items()}


_SECRET_QUERY_KEYS = {"access_key", "secret_key", "session_token", "token", "password", "credential", "sig", "signature"}


def redact_uri(value: str) -> str:
    """Hide a URI's user:password and secret query parameters (pyarrow.fs accepts both)."""
    if "://" not in value:
        return value
    parts = urllib.parse.urlsplit(value)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = urllib.parse.urlencode(
        [(k, "***" if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check a value against a field's type hint; ints are accepted where floats are expected."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
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

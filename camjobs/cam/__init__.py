"""Class Activation Mapping engine, grouped by family like torchcam's `torchcam/methods/`.

core.py        CAMResult, head discovery, the CAMExtractor base class
activation.py  CAM (needs a global average- or max-pooling -> Linear head)
gradient.py    GradCAM, GradCAMpp (any model with a 4-D feature layer)
"""

from __future__ import annotations

from torch import nn

from camjobs.cam.activation import CAM
from camjobs.cam.core import CAMExtractor, CAMResult, HeadInfo, locate_head
from camjobs.cam.gradient import GradCAM, GradCAMpp
from camjobs.config import METHODS  # the CLI lists them without importing torch

_EXTRACTORS = {"cam": CAM, "gradcam": GradCAM, "gradcam++": GradCAMpp}

__all__ = [
    "CAM", "CAMExtractor", "CAMResult", "GradCAM", "GradCAMpp", "HeadInfo", "METHODS",
    "build_extractor", "locate_head",
]  # fmt: skip


def build_extractor(
    method: str, model: nn.Module, *, target_layer: str | None = None, probe_size: int = 224
) -> CAMExtractor:
    """An extractor for `model` (put in eval mode). ValueError for an unknown method, or for a
    model the method cannot explain. `target_layer` overrides the automatic choice (dotted name);
    `probe_size` is the side of the dummy image used to discover the head."""
    extractor = _EXTRACTORS.get(method.strip().lower())
    if extractor is None:
        raise ValueError(f"unknown CAM method {method!r}; expected one of {', '.join(METHODS)}")
    return extractor(model, target_layer=target_layer, probe_size=probe_size)

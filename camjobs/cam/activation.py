"""Activation-based CAM (Zhou et al. 2015): M_c = sum_k w_k^c A^k, for GAP (or GMP) -> Linear heads."""

from __future__ import annotations

import torch
from torch import nn

from camjobs.cam.core import CAMExtractor, CAMResult


class CAM(CAMExtractor):
    """Raw class activation maps: no ReLU on the map, no bias, no normalization.

    For a GAP head the class score is y^c = mean_ij M_c(i, j) + b_c; a GMP head pools each A^k by
    its maximum instead, and M_c is the same weighted sum (Zhou et al. 2015). The maps reuse the
    features of the single forward pass that gives the logits.
    """

    def _check_head(self) -> None:
        if self.gap_error is not None:
            raise ValueError(self.gap_error)

    def _capture(self, module: nn.Module, inputs, output) -> None:
        if self._capturing:
            # clone: later in-place ops (DenseNet's F.relu(..., inplace=True)) must not alter it
            self._features = output.detach().clone()

    def __call__(self, images: torch.Tensor, target: torch.Tensor | None = None) -> CAMResult:
        with torch.no_grad():
            logits, features = self._forward(images)
            target = self._resolve_target(logits, target)
            weights = self.model.get_submodule(self.classifier_name).weight[target].float()  # (B, C)
            # fp32 maps even when the forward pass ran under bf16/fp16 autocast
            with torch.autocast(features.device.type, enabled=False):
                maps = torch.einsum("bc,bchw->bhw", weights, self._map_features(features))
        return CAMResult(logits=logits.detach(), target=target, maps=maps)

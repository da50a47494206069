"""Gradient-based CAMs: Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018).

They work on any model with a 4-D target layer. Gradients of the pre-softmax class scores are
taken with respect to the target's output only: the extractor sets requires_grad=False on all
model parameters (restored by remove_hooks()) and the target's forward hook swaps its output
for a fresh leaf tensor, so autograd records just the head after the target layer.
"""

from __future__ import annotations

import torch
from torch import nn

from camjobs.cam.core import CAMExtractor, CAMResult


class _GradientCAM(CAMExtractor):
    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self._saved_requires_grad = [(param, param.requires_grad) for param in model.parameters()]
        model.requires_grad_(False)

    def _capture(self, module: nn.Module, inputs, output):
        if not self._capturing:
            return None
        self._features = output.detach().requires_grad_(True)
        # hand the model a non-leaf copy: in-place ops downstream (DenseNet's F.relu_) are legal
        # on it, and the leaf keeps the layer's values for the map
        return self._features.clone()

    def _weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(B, C) channel weights from features A and gradients dy^c/dA, both (B, C, h, w)."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, target: torch.Tensor | None = None) -> CAMResult:
        with torch.inference_mode(False), torch.enable_grad():
            if images.is_inference():
                images = images.clone()  # inference tensors cannot enter an autograd graph
            logits, features = self._forward(images)
            target = self._resolve_target(logits, target)
            # one backward for the whole batch: in eval mode the samples do not interact
            scores = logits.gather(1, target[:, None]).sum()
            (grads,) = torch.autograd.grad(scores, features)
        # fp32 maps even when the forward pass ran under bf16/fp16 autocast
        with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
            features = self._map_features(features)
            weights = self._weights(features, grads.float())
            maps = torch.einsum("bc,bchw->bhw", weights, features).relu()
        return CAMResult(logits=logits.detach(), target=target, maps=maps)

    def remove_hooks(self) -> None:
        super().remove_hooks()
        for param, requires_grad in self._saved_requires_grad:
            param.requires_grad_(requires_grad)
        self._saved_requires_grad = []


class GradCAM(_GradientCAM):
    """alpha_k = mean_ij dy^c/dA^k_ij; map = ReLU(sum_k alpha_k A^k)."""

    def _weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.mean(dim=(2, 3))


class GradCAMpp(_GradientCAM):
    """Closed-form Grad-CAM++ (as torchcam): alpha = g^2 / (2 g^2 + sum_ij A g^3), 0 where undefined;
    w_k = sum_ij alpha * ReLU(g); map = ReLU(sum_k w_k A^k)."""

    def _weights(self, features: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        grads_2 = grads.pow(2)
        denominator = 2 * grads_2 + (features * grads_2 * grads).sum(dim=(2, 3), keepdim=True)
        defined = denominator != 0
        alpha = torch.where(defined, grads_2 / torch.where(defined, denominator, 1.0), 0.0)
        return (alpha * grads.relu()).sum(dim=(2, 3))

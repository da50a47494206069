"""The small core of the CAM engine: the result type, head discovery and the extractor base.

Head discovery runs one dummy forward pass with hooks on every module and finds
  * the target layer: the last module to finish whose output is a (B, C, H, W) feature map
    with H*W > 1 and that is not a pooling layer;
  * the classifier: the last nn.Linear to run;
and then checks numerically whether the head is global pooling -> (Dropout) -> Linear, i.e.
whether the Linear's input is the spatial mean (GAP) or the spatial maximum (GMP, Zhou et al.
2015's comparison) of the target's output (or of its ReLU: DenseNet applies F.relu functionally
after `features`). Only then is plain CAM, sum_k w_k A^k, defined.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.modules import pooling

_POOLING = (
    pooling._AvgPoolNd,
    pooling._AdaptiveAvgPoolNd,
    pooling._MaxPoolNd,
    pooling._AdaptiveMaxPoolNd,
    pooling._LPPoolNd,
)
_RTOL = 1e-4
# The global poolings a CAM head may apply before its Linear: the map is sum_k w_k A^k for both.
_GLOBAL_POOLS = {"avg": lambda a: a.mean(dim=(2, 3)), "max": lambda a: a.amax(dim=(2, 3))}


@dataclasses.dataclass
class CAMResult:
    logits: torch.Tensor  # (B, num_classes), detached
    target: torch.Tensor  # (B,) long: the class each map explains
    maps: torch.Tensor  # (B, h, w) float32 at feature resolution, detached, on the model's device


@dataclasses.dataclass(frozen=True)
class HeadInfo:
    target_name: str
    classifier_name: str | None
    relu_features: bool  # the model applies a ReLU to the target's output before pooling
    gap_error: str | None  # why the head is not global pooling -> Linear; None when it is
    pooling: str | None = None  # "avg" or "max": how the head pools (None without such a head)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    scale = expected.abs().max().clamp_min(1e-12)
    return bool((actual - expected).abs().max() <= _RTOL * scale)


def locate_head(model: nn.Module, target_layer: str | None = None, probe_size: int = 224) -> HeadInfo:
    """Find the target layer and the classifier of `model` (in eval mode) with one dummy forward."""
    model_name = type(model).__name__
    if target_layer is not None:
        try:
            model.get_submodule(target_layer)
        except AttributeError:
            raise ValueError(f"{model_name} has no submodule named {target_layer!r}") from None

    leaf_calls: list[str] = []  # "name (Type)" of leaf modules in completion order, for messages
    seen: dict = {"target": None, "features": None, "after_target": 0, "linear": None, "linear_input": None}

    def on_output(name: str, module: nn.Module, output) -> None:
        if not list(module.children()):
            leaf_calls.append(f"{name} ({type(module).__name__})")
        is_map = isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1
        if target_layer is not None:
            wanted = name == target_layer
            if wanted and not (isinstance(output, torch.Tensor) and output.dim() == 4):
                raise ValueError(f"target layer {target_layer!r} of {model_name} does not output a 4-D feature map")
        else:
            wanted = is_map and not isinstance(module, _POOLING)
        if wanted:
            # clone: later in-place ops (DenseNet's F.relu(..., inplace=True)) must not alter it
            seen.update(target=name, features=output.detach().clone(), after_target=len(leaf_calls))
        if isinstance(module, nn.Linear):
            seen["linear"] = (name, module, seen["linear_input"], output.detach().clone())

    def on_input(module: nn.Module, inputs) -> None:
        seen["linear_input"] = inputs[0].detach().clone()

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: on_output(name, m, o)))
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(on_input))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    probe = torch.randn(1, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            output = model(probe.to(device, dtype))
    finally:
        for handle in handles:
            handle.remove()

    if seen["target"] is None:
        if target_layer is not None:
            raise ValueError(f"target layer {target_layer!r} of {model_name} did not run in the forward pass")
        raise ValueError(
            f"{model_name} has no layer with a 4-D (batch, channels, height, width) output larger than 1x1 "
            f"at {probe_size}px input; CAM methods need a convolutional feature map"
        )
    relu, pool, problem = _gap_linear_problem(seen["target"], seen["features"], seen["linear"], output)
    gap_error = None
    if problem is not None:
        tail = " -> ".join(leaf_calls[seen["after_target"] :][:8]) or "nothing"
        gap_error = (
            f"CAM needs a global-average-pooling (or global-max-pooling) -> linear head, but {model_name}'s head is "
            f"not: {problem} "
            f"(after {seen['target']!r} it runs: {tail}). Use method 'gradcam' or 'gradcam++' instead; "
            f"they work on any model with a 4-D feature layer"
        )
    classifier_name = seen["linear"][0] if seen["linear"] else None
    return HeadInfo(seen["target"], classifier_name, relu, gap_error, pool if problem is None else None)


def _gap_linear_problem(
    target_name: str, features: torch.Tensor, linear_call, output
) -> tuple[bool, str | None, str | None]:
    """Check that the model's output is Linear(P_ij A) or Linear(P_ij ReLU(A)), P the spatial mean or max.

    linear_call: (name, module, input, output) of the last Linear call, or None.
    Returns (whether A needs the ReLU, "avg" or "max", what is wrong or None)."""
    if linear_call is None:
        return False, None, "no nn.Linear runs in its forward pass"
    name, linear, linear_input, linear_output = linear_call
    channels = features.shape[1]
    if linear.in_features != channels:
        return (
            False,
            None,
            (
                f"the final Linear {name!r} takes {linear.in_features} features but the target layer "
                f"{target_name!r} has {channels} channels"
            ),
        )
    if linear_input.shape != (features.shape[0], channels):
        return False, None, f"the final Linear {name!r} gets input of shape {tuple(linear_input.shape)}"
    relu, pool = _pooling_of(linear_input, features)
    if pool is None:
        return (
            False,
            None,
            f"the input of the final Linear {name!r} is not the spatial mean or maximum of {target_name!r}'s output",
        )
    if not (isinstance(output, torch.Tensor) and output.shape == linear_output.shape and _close(output, linear_output)):
        return relu, pool, f"the model's output is not the output of its final Linear {name!r}"
    return relu, pool, None


def _pooling_of(linear_input: torch.Tensor, features: torch.Tensor) -> tuple[bool, str | None]:
    """(ReLU or not, "avg" or "max") where the Linear's input is that global pooling of A, else (False, None)."""
    for relu in (False, True):
        maps = (features.relu() if relu else features).float()
        for pool, reduce in _GLOBAL_POOLS.items():
            if _close(linear_input.float(), reduce(maps)):
                return relu, pool
    return False, None


class CAMExtractor:
    """Base class: finds the head once, hooks the target layer, explains batches.

    Puts the model in eval mode. Subclasses implement `_capture` (the target's forward hook,
    active only inside `__call__`) and `__call__`. Use as a context manager, or call
    `remove_hooks()`, to detach from the model.
    """

    target_name: str
    classifier_name: str | None

    def __init__(self, model: nn.Module, *, target_layer: str | None = None, probe_size: int = 224):
        self.model = model.eval()
        head = locate_head(model, target_layer, probe_size)
        self.target_name, self.classifier_name = head.target_name, head.classifier_name
        self.relu_features = head.relu_features
        self.gap_error = head.gap_error
        self.pooling = head.pooling  # "avg" (GAP) or "max" (GMP) before the classifier; None otherwise
        self._check_head()
        self._capturing = False
        self._features: torch.Tensor | None = None
        target = model.get_submodule(self.target_name)
        self._hooks = [target.register_forward_hook(self._capture)]

    def _check_head(self) -> None:
        """Raise ValueError if this method cannot explain the located head."""

    def _capture(self, module: nn.Module, inputs, output):
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, target: torch.Tensor | None = None) -> CAMResult:
        raise NotImplementedError

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model once; return (logits, the target layer's captured output)."""
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        self._capturing, self._features = True, None
        try:
            logits = self.model(images)
        finally:
            self._capturing = False
        features, self._features = self._features, None
        return logits, features

    @staticmethod
    def _resolve_target(logits: torch.Tensor, target) -> torch.Tensor:
        """Class index per image: the given one, or the predicted one where None / negative."""
        predicted = logits.argmax(dim=1)
        if target is None:
            return predicted
        target = torch.as_tensor(target, device=logits.device).long()
        if target.dim() == 0:
            target = target.expand(len(logits))
        if target.shape != predicted.shape:
            raise ValueError(f"target must have shape ({len(logits)},), got {tuple(target.shape)}")
        if bool((target >= logits.shape[1]).any()):
            raise ValueError(f"target class index out of range for {logits.shape[1]} classes")
        return torch.where(target < 0, predicted, target)

    def _map_features(self, features: torch.Tensor) -> torch.Tensor:
        """The feature maps A^k the head pools: with the model's functional ReLU where it has one."""
        features = features.detach().float()
        return features.relu() if self.relu_features else features

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_layer={self.target_name!r}, classifier={self.classifier_name!r})"

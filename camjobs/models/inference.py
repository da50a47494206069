"""The model as the job runs it: eval mode, BatchNorms folded into their convolutions, channels_last.

Only for inference: the folded model computes the same function as the trained one, with one
kernel less per Conv2d + BatchNorm2d pair, but it is not the model to save or fine-tune.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.fx import Node, Tracer

log = logging.getLogger(__name__)


def prepare_for_inference(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """The model as the job runs it: eval mode, BatchNorms folded into their convolutions,
    on `device`, channels_last. Changes `model` in place and returns it. Only for inference:
    the folded model is not the trained one (save and fine-tune the model as loaded)."""
    model = model.eval()
    fold_batchnorm(model)
    return model.to(device).to(memory_format=torch.channels_last)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d into that convolution,
    in place: the conv gets the BatchNorm's scale and shift, the BatchNorm becomes an Identity.
    Returns how many were folded.

    The same function, one kernel less per pair (figures: benchmarks/results-cpu.md). The pairs are found on
    torch.fx's trace; a pair is folded only where the conv's output goes to the BatchNorm alone
    and each module is called once. A subclass of Conv2d (efficientnet_lite0's TensorFlow-style
    "same" padding) is folded where the folded copy gives the pair's output on a probe. The
    modules stay where they were, so hooks on them (the CAM extractors') still fire. A model
    that cannot be traced is left as it is.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        graph = _ConvLeafTracer().trace(model)
    except Exception as error:  # data-dependent control flow and the like
        log.debug("BatchNorm folding skipped: the model cannot be traced (%s)", error)
        return 0
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            continue
        norm, source = model.get_submodule(node.target), node.args[0]
        if type(norm) is not nn.BatchNorm2d or norm.training or not norm.track_running_stats:
            continue
        if (
            not isinstance(source, Node)
            or source.op != "call_module"
            or calls[source.target] != 1
            or len(source.users) != 1
        ):
            continue
        conv = model.get_submodule(source.target)
        if not isinstance(conv, nn.Conv2d) or conv.training:
            continue
        fused = fuse_conv_bn_eval(conv, norm)
        if type(conv) is not nn.Conv2d and not _folds_exactly(conv, norm, fused):
            continue
        _set_submodule(model, source.target, fused)
        _set_submodule(model, node.target, nn.Identity())
        folded += 1
    return folded


class _ConvLeafTracer(Tracer):
    """torch.fx's tracer, keeping every Conv2d (subclasses too) as one call, as it does torch.nn's own."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualified_name)


def _folds_exactly(conv: nn.Conv2d, norm: nn.BatchNorm2d, fused: nn.Conv2d) -> bool:
    """Whether the folded copy of a Conv2d subclass computes norm(conv(x)): its forward may do
    more with the weights than convolve (weight standardization), and then folding is wrong."""
    side = 2 * max((k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.dilation)) + 3
    probe = torch.randn(2, conv.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    probe = probe.to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        expected, actual = norm(conv(probe)), fused(probe)
    return actual.shape == expected.shape and bool(
        torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

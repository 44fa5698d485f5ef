import pytest
import torch
from segmentation_models_pytorch import losses as smp_losses

from lesionseg.errors import LesionsegError
from lesionseg.train.config import parse_loss
from lesionseg.train.losses import LOSSES, WeightedSum


def test_parse_loss():
    assert parse_loss("bce+0.1*dice") == {"bce": 1.0, "dice": 0.1}
    assert parse_loss("focal") == {"focal": 1.0}
    with pytest.raises(LesionsegError, match="unknown loss"):
        parse_loss("bce+hinge")
    with pytest.raises(LesionsegError, match="bad loss term"):
        parse_loss("x*dice")


def test_paper_model1_loss_is_bce_plus_a_tenth_of_dice():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=generator)
    target = (torch.rand(3, 1, 16, 16, generator=generator) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - 2 * (p * target).sum() / (p.sum() + target.sum())
    assert WeightedSum({"bce": 1.0, "dice": 0.1})(logits, target).item() == pytest.approx(
        (bce + 0.1 * dice).item(), rel=1e-5
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_runs_on_logits_and_falls_as_prediction_improves(name):
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    loss = WeightedSum({name: 1.0})
    good, bad = (target * 2 - 1) * 5, (1 - target * 2) * 5
    assert loss(good, target) < loss(bad, target)


def test_dice_is_smp_dice():
    assert isinstance(WeightedSum({"dice": 1.0}).terms["dice"], smp_losses.DiceLoss)


def test_the_command_line_offers_exactly_the_losses_that_exist():
    from lesionseg.train.config import LOSS_NAMES

    assert set(LOSSES) == set(LOSS_NAMES)

import pytest
import torch

from leco.objectives import enhance_target, erase_target, guided, leco_loss, leco_target


def test_erase_and_enhance_algebra_on_hand_made_tensors():
    neutral = torch.tensor([1.0, 2.0])
    positive = torch.tensor([3.0, -1.0])
    unconditional = torch.tensor([0.5, 0.5])
    # positive - unconditional = [2.5, -1.5]
    assert torch.equal(erase_target(neutral, positive, unconditional, 2.0), torch.tensor([-4.0, 5.0]))
    assert torch.equal(enhance_target(neutral, positive, unconditional, 2.0), torch.tensor([6.0, -1.0]))
    assert torch.equal(leco_target("erase", neutral, positive, unconditional, 1.0), torch.tensor([-1.5, 3.5]))
    assert torch.equal(leco_target("enhance", neutral, positive, unconditional, 0.0), neutral)


def test_targets_are_float32_whatever_the_prediction_dtype():
    half = torch.ones(3, dtype=torch.bfloat16)
    assert leco_target("erase", half, half, half, 3.0).dtype == torch.float32


def test_loss_is_mse_in_float32():
    student = torch.tensor([1.0, 3.0], dtype=torch.float16)
    target = torch.tensor([0.0, 1.0])
    loss = leco_loss(student, target)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx((1 + 4) / 2)


def test_guidance_formula():
    assert torch.equal(guided(torch.tensor([1.0]), torch.tensor([3.0]), 3.0), torch.tensor([7.0]))
    with pytest.raises(KeyError):
        leco_target("delete", torch.zeros(1), torch.zeros(1), torch.zeros(1), 1.0)

import pytest
import torch

from leco.objectives import OBJECTIVES, as_negative_prompt, guided, loss, rescaled_like_neutral

P = {
    "neutral": torch.tensor([1.0, 2.0]),
    "positive": torch.tensor([3.0, -1.0]),
    "unconditional": torch.tensor([0.5, 0.5]),
    "target": torch.tensor([2.0, 0.0]),
    "empty": torch.tensor([0.25, 0.75]),
}


def test_each_action_on_hand_made_tensors():
    # positive - unconditional = [2.5, -1.5]
    assert torch.equal(OBJECTIVES["erase"].target(P, 2.0), torch.tensor([-4.0, 5.0]))
    assert torch.equal(OBJECTIVES["enhance"].target(P, 2.0), torch.tensor([6.0, -1.0]))
    assert torch.equal(OBJECTIVES["enhance"].target(P, 0.0), P["neutral"])
    assert torch.equal(OBJECTIVES["distill"].target(P, 3.0), torch.tensor([8.0, -4.0]))  # u + 3 (p - u)
    assert torch.equal(OBJECTIVES["preserve"].target(P, 5.0), P["target"])
    assert torch.equal(OBJECTIVES["imitate"].target(P, 5.0), P["positive"])  # the teacher's, in a transplant


@pytest.mark.parametrize("action", ["erase", "enhance"])
def test_a_rescaled_target_has_the_neutral_predictions_mean_and_spread_and_points_the_same_way(action):
    generator = torch.Generator().manual_seed(0)
    p = {
        role: torch.randn(1, 4, 8, 8, generator=generator)
        for role in ("neutral", "positive", "unconditional")
    }
    unscaled = OBJECTIVES[action].target(p, 3.0)
    rescaled = rescaled_like_neutral(OBJECTIVES[action]).target(p, 3.0)
    torch.testing.assert_close(rescaled.mean(), p["neutral"].mean())
    torch.testing.assert_close(rescaled.std(), p["neutral"].std())
    assert not torch.allclose(rescaled, unscaled)  # guidance 3 widens the spread: this one is narrower
    # an affine map of the unscaled target with a positive factor: the same pattern, another scale
    centred = lambda t: (t - t.mean()).flatten()  # noqa: E731
    assert torch.nn.functional.cosine_similarity(centred(rescaled), centred(unscaled), dim=0) > 0.9999


def test_rescale_target_changes_erase_and_enhance_only():
    from leco.config import PromptSettings
    from leco.prompts import objective_of

    for action in ("preserve", "distill", "imitate"):  # said to be ignored there, and it is
        entry = PromptSettings(target="a cat", action=action, guidance_scale=3.0, rescale_target=True)
        assert objective_of(entry) is OBJECTIVES[action]
    assert objective_of(PromptSettings(target="a cat", rescale_target=True)) is not OBJECTIVES["erase"]


def test_each_objective_reads_only_the_roles_it_declares():
    for name, objective in OBJECTIVES.items():
        given = {role: P[role] for role in objective.roles}
        assert objective.target(given, 2.0).shape == (2,), name
    assert OBJECTIVES["distill"].rollout_guidance == 1.0  # latents made the way the LoRA is used
    assert OBJECTIVES["erase"].rollout_guidance is None


@pytest.mark.parametrize("scale", [2.0, 3.0, 7.5])
def test_a_negative_prompt_prediction_reproduces_the_conditional_target_under_cfg(scale):
    wanted = OBJECTIVES["erase"].target(P, 1.0)
    negative = as_negative_prompt(wanted, P, scale)
    # sampling the target prompt with this negative gives what the edited model gives with ""
    torch.testing.assert_close(guided(negative, P["target"], scale), guided(P["empty"], wanted, scale))
    # preserving a prompt means the negative prompt changes nothing: it equals the empty prompt's
    torch.testing.assert_close(as_negative_prompt(P["target"], P, scale), P["empty"])


def test_loss_is_mse_in_float32():
    student = torch.tensor([1.0, 3.0], dtype=torch.float16)
    target = torch.tensor([0.0, 1.0])
    value = loss(student, target)
    assert value.dtype == torch.float32 and value.item() == pytest.approx((1 + 4) / 2)


def test_guidance_formula():
    assert torch.equal(guided(torch.tensor([1.0]), torch.tensor([3.0]), 3.0), torch.tensor([7.0]))


def test_min_snr_weights_follow_the_published_formula():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from leco.objectives import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 10, 300, 999])
    snr = compute_snr(scheduler, timesteps)
    epsilon = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, v_prediction=False)
    v = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0, v_prediction=True)
    torch.testing.assert_close(epsilon, torch.stack([snr, 5 * torch.ones_like(snr)]).min(0)[0] / snr)
    torch.testing.assert_close(v, torch.stack([snr, 5 * torch.ones_like(snr)]).min(0)[0] / (snr + 1))
    assert epsilon[-1] == 1.0 and epsilon[0] < 0.01  # noisy steps keep weight 1, clean ones shrink
    weighted = loss(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 0.0]))
    assert weighted.item() == pytest.approx(0.5)

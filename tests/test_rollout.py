import pytest
import torch
from diffusers import DDIMScheduler

from leco.rollout import Rollout, SamplePlan

CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


class FakeModel:
    """A deterministic stand-in for the guided UNet that counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, latents, timestep):
        self.calls.append((latents.shape[0], int(timestep)))
        return torch.tanh(latents * 0.7 + float(timestep) / 1000.0)


def direct_ddim(noise, steps, count, prediction_type="epsilon"):
    """The latent after `count` plain DDIM steps, computed with diffusers alone."""
    scheduler = DDIMScheduler.from_config(
        {**CONFIG, "prediction_type": prediction_type}, timestep_spacing="trailing"
    )
    scheduler.set_timesteps(steps)
    model, latents = FakeModel(), noise.clone()
    for t in scheduler.timesteps[:count]:
        latents = scheduler.step(model(latents, t), t, latents).prev_sample
    return latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_latents_carry_their_true_timestep(prediction_type):
    rollout = Rollout({**CONFIG, "prediction_type": prediction_type}, "ddim", steps=10, timestep_offset=False)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for step in (1, 4, 10):
        # without offset a sample of step k is the latent after k-1 steps, at the grid timestep of step k
        plan = SamplePlan(step, rollout.grid[step - 1])
        (latent,) = rollout.run(FakeModel(), noise, [plan], torch.Generator())
        torch.testing.assert_close(latent, direct_ddim(noise, 10, step - 1, prediction_type))
    for step in (1, 5, 9):
        # the DDIM jump to the next grid timestep is exactly the scheduler's next step
        plan = SamplePlan(step, rollout.grid[step])
        (latent,) = rollout.run(FakeModel(), noise, [plan], torch.Generator())
        torch.testing.assert_close(
            latent, direct_ddim(noise, 10, step, prediction_type), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("sampler", ["ddim", "lms"])
@pytest.mark.parametrize("steps", [7, 30, 50])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_latent_is_noised_exactly_as_its_label_says_at_any_step_count(sampler, steps, prediction_type):
    """With a model that knows the one clean sample, every latent must be that sample noised to the
    timestep it is labelled with, also where the step count does not divide 1000 (where diffusers'
    DDIM step would leave the grid)."""
    rollout = Rollout({**CONFIG, "prediction_type": prediction_type}, sampler, steps=steps)
    alphas = rollout.alphas_cumprod.double()
    clean = 2 * torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)).double()
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6)).double()

    def knows_the_sample(latents, timestep):
        a = alphas[int(round(float(timestep)))]
        epsilon = (latents.double() - a.sqrt() * clean) / (1 - a).sqrt()
        velocity = a.sqrt() * epsilon - (1 - a).sqrt() * clean
        return (epsilon if prediction_type == "epsilon" else velocity).float()

    generator = torch.Generator().manual_seed(steps)
    plans = rollout.plan(steps, generator)
    start = (alphas[999].sqrt() * clean + (1 - alphas[999]).sqrt() * noise).float()
    basis = torch.stack([clean.flatten(), noise.flatten()], 1)
    for plan, latent in zip(plans, rollout.run(knows_the_sample, start, plans, generator), strict=True):
        signal, _ = torch.linalg.lstsq(basis, latent.double().flatten()[:, None]).solution.flatten()
        noised_to = int(torch.argmin((alphas.sqrt() - signal).abs()))
        assert abs(noised_to - plan.timestep) <= 1, plan  # (LMS integrates to about a tenth of a step)


def test_grid_and_offsets_cover_every_training_timestep():
    rollout = Rollout(CONFIG, "ddim", steps=50)
    assert rollout.grid[0] == 999 and len(rollout.grid) == 50
    generator = torch.Generator().manual_seed(0)
    seen = {plan.timestep for _ in range(4000) for plan in rollout.plan(4, generator)}
    assert seen == set(range(1, 1000))
    grid_only = Rollout(CONFIG, "ddim", steps=50, timestep_offset=False)
    assert {p.timestep for _ in range(500) for p in grid_only.plan(4, generator)} == set(grid_only.grid)


@pytest.mark.parametrize("count", [1, 3, 8])
def test_one_rollout_hands_out_distinct_latents_and_counts_its_calls(count):
    rollout = Rollout(CONFIG, "ddim", steps=20)
    generator = torch.Generator().manual_seed(count)
    plans = rollout.plan(count, generator)
    assert len({p.step for p in plans}) == len({p.timestep for p in plans}) == count
    model = FakeModel()
    latents = rollout.run(model, torch.randn(1, 4, 8, 8, generator=generator), plans, generator)
    assert len(latents) == count
    assert all(not torch.equal(a, b) for i, a in enumerate(latents) for b in latents[i + 1 :])
    assert len(model.calls) == rollout.unet_calls(plans) <= max(p.step for p in plans)
    assert [t for _, t in model.calls] == rollout.grid[: len(model.calls)]  # one trajectory, in order


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "lms", "euler_a"])
def test_every_sampler_hands_out_variance_preserving_latents(sampler):
    rollout = Rollout(CONFIG, sampler, steps=10)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    first, later = rollout.run(
        FakeModel(),
        noise,
        [SamplePlan(1, 999), SamplePlan(6, rollout.grid[5])],
        torch.Generator().manual_seed(0),
    )
    # At t=999 the model input is the unit-variance noise (up to sqrt(1 - alpha_bar_999) = 0.9977 for the
    # sigma-space samplers), whatever the sampler's own scaling of its latents.
    torch.testing.assert_close(first, noise, rtol=3e-3, atol=1e-4)
    assert torch.isfinite(later).all() and later.shape == noise.shape


def test_parallel_trajectories_give_each_copy_its_own_latents_in_one_call_per_step():
    rollout = Rollout(CONFIG, "ddim", steps=12)
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(3 * 2, 4, 8, 8, generator=generator)  # 3 copies of a batch of 2
    plans = [plan for copy in range(3) for plan in rollout.plan(4, generator, copy)]
    model = FakeModel()
    latents = rollout.run(model, noise, plans, generator)
    assert {batch for batch, _ in model.calls} == {6} and len(model.calls) == rollout.unet_calls(plans)
    for plan, latent in zip(plans, latents, strict=True):
        alone = SamplePlan(plan.step, plan.timestep)  # the same sample from its copy's noise alone
        (expected,) = rollout.run(FakeModel(), noise[2 * plan.copy : 2 * plan.copy + 2], [alone], generator)
        assert latent.shape == (2, 4, 8, 8)
        torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_rollouts_never_clip_latents_unless_the_model_says_so(sampler):
    # an Euler config (SDXL folders) says nothing of clip_sample; diffusers' DDIM/DDPM default is to clip
    euler = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}  # fmt: skip
    assert Rollout(euler, sampler, steps=4).scheduler.config.clip_sample is False
    assert Rollout({**euler, "clip_sample": True}, sampler, steps=4).scheduler.config.clip_sample is True


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler_a", "lms"])
def test_a_zero_terminal_snr_model_rolls_out_on_its_own_schedule_or_is_refused(sampler):
    """The rollout's sampler must keep rescale_betas_zero_snr: the loss reads the rescaled alphas."""
    from leco.config import TrainConfig
    from leco.errors import LecoError

    config = {
        "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
    }  # fmt: skip
    train = TrainConfig(noise_scheduler=sampler)
    epsilon = {**config, "prediction_type": "epsilon"}  # pure noise at t = 999 predicts nothing (nan)
    with pytest.raises(LecoError, match=r"^pretrained_model: .*zero terminal SNR .* predicts epsilon"):
        Rollout.for_training(epsilon, train)
    if sampler == "lms":
        with pytest.raises(LecoError, match=r"^train.noise_scheduler: lms cannot sample this zero-terminal"):
            Rollout.for_training(config, train)
        return
    rollout = Rollout.for_training(config, train)
    assert float(rollout.alphas_cumprod[-1]) == 0.0
    # (Euler keeps 2**-24 there, so that its last sigma stays finite: diffusers' choice)
    assert float(rollout.scheduler.alphas_cumprod[-1]) <= 2**-24


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "lms", "euler_a"])
def test_latents_stay_float32_when_the_model_predicts_in_half_precision(sampler):
    rollout = Rollout(CONFIG, sampler, steps=10, timestep_offset=False)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def bfloat16_model(latents, timestep):  # what a UNet under bf16 autocast returns
        return FakeModel()(latents, timestep).to(torch.bfloat16)

    plans = [SamplePlan(step, rollout.grid[step - 1]) for step in (3, 6, 9)]
    latents = rollout.run(bfloat16_model, noise, plans, torch.Generator().manual_seed(0))
    assert [latent.dtype for latent in latents] == [torch.float32] * 3

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

import leco.trainer
from leco import train
from leco.conditioning import predict
from leco.config import LecoConfig, PromptSettings, load_prompts
from leco.errors import LecoError
from leco.network import read_lora_file
from leco.optim import non_finite_loss
from leco.steps import Step, wanted
from leco.trainer import Trainer

PROMPTS = [
    {"target": "a red fox", "guidance_scale": 2.0, "batch_size": 2},
    {"target": "a blue car", "positive": "a blue car", "neutral": "a car", "action": "enhance"},
]


def make_config(folder: Path, out: Path, **train_options) -> LecoConfig:
    train = {"precision": "fp32", "iterations": 6, "seed": 3, "max_denoising_steps": 8, "lr": 3e-3}
    train.update(train_options)
    return LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": str(folder)},
            "network": {"type": "c3lier", "rank": 2, "alpha": 1},
            "prompts": PROMPTS,
            "train": train,
            "save": {"path": str(out), "name": "fox", "per_steps": 4},
        }
    )


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_lora_file(path)[0]


class UNetCalls:
    """Counts the UNet's forward calls and records (batch, LoRA strength) of each."""

    def __init__(self, trainer):
        self.trainer, self.calls = trainer, []
        self.handle = trainer.unet.register_forward_pre_hook(self.record)

    def record(self, module, args):
        self.calls.append((args[0].shape[0], getattr(self.trainer.trainable, "multiplier", None)))

    def __len__(self):
        return len(self.calls)


def frozen_rows(trainer, samples):
    """The (sample, role -> text) requests the loss makes for the entry's own rows."""
    prompt = trainer.prompts[samples[0].prompt]
    roles = prompt.objective.roles + trainer.trainable.extra_roles
    return [(i, {r: prompt.texts(s.target)[r] for r in roles}) for i, s in enumerate(samples)]


def test_batched_teacher_equals_three_separate_calls(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sdxl"], tmp_path)
    config.prompts[0].neutral = "a photo"  # three distinct teacher prompts
    trainer = Trainer(config, progress=False)
    with torch.no_grad():
        for p in trainer.trainable.parameters():
            p.normal_(0, 0.3)  # a LoRA that changes things: the teacher must still see the original model
    samples = trainer.samples.next()
    calls = UNetCalls(trainer)
    wanted = frozen_rows(trainer, samples)
    (batched,) = trainer.teachers.predict(samples, wanted)
    assert len(calls) == 1 and len(batched) == 3
    trainer.trainable.remove()  # the original UNet, no LoRA at all
    sample, edited = samples[0], trainer.edited
    for role, text in wanted[0][1].items():
        cond = edited.condition(edited.embeddings[text], len(sample.latents), sample.size, sample.crop)
        with torch.no_grad():
            alone = predict(trainer.unet, sample.latents, sample.timesteps, cond)
        torch.testing.assert_close(batched[role], alone, rtol=1e-4, atol=1e-5)


def test_teacher_batch_drops_duplicate_prompts(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=1), progress=False)
    for prompt, distinct in zip(trainer.prompts, (2, 3), strict=True):
        # defaults: neutral == unconditional == "" -> two rows per sample, not three
        texts = prompt.texts(0)
        assert len({texts[r] for r in prompt.objective.roles}) == distinct
    samples = [s for s in (trainer.samples.next() for _ in range(12)) if s[0].prompt == 0][0]
    calls = UNetCalls(trainer)
    trainer.teachers.predict(samples, frozen_rows(trainer, samples))
    assert calls.calls[0][0] == 2 * trainer.prompts[0].batch_size


def test_each_prompt_trains_at_its_own_multiplier(tmp_path, tiny_folders):
    # A two-sided slider: the second entry's poles are swapped and it trains the LoRA at -1.
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=1)
    config.prompts[1].multiplier = -1.0
    trainer = Trainer(config, progress=False)
    calls = UNetCalls(trainer)
    sides = set()
    for _ in range(12):
        calls.calls.clear()
        samples = trainer.samples.next()
        rolled_out = list(calls.calls)
        trainer.loss(Step(samples, []))
        multiplier = config.prompts[samples[0].prompt].multiplier
        sides.add(multiplier)
        assert all(m == multiplier for _, m in rolled_out)  # the rollout: the edited model at that side
        teacher, student = calls.calls[len(rolled_out) :]
        assert teacher[1] == 0.0 and student[1] == multiplier
    assert sides == {1.0, -1.0} and trainer.trainable.multiplier == 1.0
    with pytest.raises(ValueError, match="must not be 0"):
        config.prompts[0].multiplier = 0


def test_entries_are_dealt_in_shuffled_rounds_and_the_deck_survives_a_resume(tmp_path, tiny_folders):
    # Each of several concepts gets its share of rollouts: 3 entries, every round deals each once.
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=2)
    config.prompts = [PromptSettings(target=t) for t in ("a red fox", "a blue car", "a green tree")]
    trainer = Trainer(config, progress=False)
    first = trainer.samples.roll_out()[0].prompt
    dealt = [first] + [trainer.samples.next_entry() for _ in range(4)]
    state = trainer.step_queue.state()
    later = [trainer.samples.next_entry() for _ in range(7)]
    rounds = dealt + later
    assert [sorted(rounds[i : i + 3]) for i in (0, 3, 6, 9)] == [[0, 1, 2]] * 4
    assert len({tuple(rounds[i : i + 3]) for i in (0, 3, 6, 9)}) > 1  # shuffled, not a fixed order
    resumed = Trainer(config, progress=False)
    resumed.step_queue.load_state(state, resumed.device)
    assert [resumed.samples.next_entry() for _ in range(7)] == later
    config.train.entry_order = "random"
    independent = Trainer(config, progress=False).samples
    drawn = [independent.next_entry() for _ in range(30)]
    assert set(drawn) == {0, 1, 2} and any(sorted(drawn[i : i + 3]) != [0, 1, 2] for i in range(0, 30, 3))


@pytest.mark.parametrize(("guidance", "factor"), [(1.0, 1), (3.0, 2)])
def test_rollout_doubles_the_batch_only_when_guiding(tmp_path, tiny_folders, guidance, factor):
    config = make_config(
        tiny_folders["sd1"], tmp_path, rollout_guidance_scale=guidance, samples_per_rollout=2
    )
    config.prompts = config.prompts[:1]
    trainer = Trainer(config, progress=False)
    calls = UNetCalls(trainer)
    samples = trainer.samples.roll_out()
    batch = trainer.prompts[0].batch_size
    assert calls.calls and {b for b, _ in calls.calls} == {batch * factor}
    assert len(samples) == 2 and samples[0].timesteps[0] != samples[1].timesteps[0]


@pytest.mark.parametrize("rollout_model", ["edited", "frozen"])
def test_rollouts_are_sampled_by_the_model_the_config_names(tmp_path, tiny_folders, rollout_model):
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=2, rollout_model=rollout_model)
    config.prompts = [PromptSettings(target="a red fox", multiplier=-1)]
    trainer = Trainer(config, progress=False)
    for parameter in trainer.trainable.parameters():  # a LoRA far from zero: it changes every sample
        torch.nn.init.normal_(parameter, std=0.5)
    state = trainer.generator.get_state()
    applied = torch.cat([sample.latents for sample in trainer.samples.roll_out()])
    trainer.generator.set_state(state)
    for parameter in trainer.trainable.parameters():
        torch.nn.init.normal_(parameter, std=0.5)  # other weights: nothing of them may show when frozen
    again = torch.cat([sample.latents for sample in trainer.samples.roll_out()])
    assert torch.equal(applied, again) == (rollout_model == "frozen")


def test_distillation_rolls_out_at_guidance_one_and_targets_the_guided_prediction(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=1)
    config.prompts = [PromptSettings(target=["a red fox", "a blue car"], action="distill", guidance_scale=4)]
    trainer = Trainer(config, progress=False)
    calls = UNetCalls(trainer)
    samples = trainer.samples.next()
    assert calls.calls and {b for b, _ in calls.calls} == {1}  # LoRA on, no CFG batch: how it is used
    (frozen,) = trainer.teachers.predict(samples, frozen_rows(trainer, samples))
    target = trainer.prompts[0].objective.target(frozen, 4.0)
    torch.testing.assert_close(
        target, frozen["unconditional"] + 4 * (frozen["positive"] - frozen["unconditional"])
    )
    assert trainer.prompts[0].texts(samples[0].target)["unconditional"] == ""
    with pytest.raises(ValueError, match="guidance_scale: distill needs the CFG scale"):
        PromptSettings(target="a red fox", action="distill", guidance_scale=1)


@pytest.mark.parametrize("reuse", [1, 4])
def test_unet_calls_per_step_follow_the_rollout_reuse(tmp_path, tiny_folders, reuse):
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=reuse, max_denoising_steps=20)
    trainer = Trainer(config, progress=False)
    counter = UNetCalls(trainer)
    calls = []
    for _ in range(4 * reuse):
        waiting = len(trainer.step_queue.ready)
        before = len(counter)
        trainer.train_step()
        calls.append(len(counter) - before)
        if waiting == 0:
            assert len(trainer.step_queue.ready) == reuse - 1  # one rollout feeds `reuse` steps
    # a new rollout: its calls + 1 teacher call for all its steps + 1 student call; every other step
    # of the rollout: the student call alone (its frozen predictions came with the rollout)
    assert sum(c == 1 for c in calls) == len(calls) - 4
    assert sum(c > 2 for c in calls) == 4


def test_steps_of_a_rollout_sharing_one_forward_make_no_unet_call_of_their_own(tmp_path, tiny_folders):
    config = make_config(
        tiny_folders["sd1"], tmp_path, samples_per_rollout=4, max_denoising_steps=20, steps_per_forward=4
    )
    trainer = Trainer(config, progress=False)
    counter = UNetCalls(trainer)
    calls = []
    for _ in range(8):
        before = len(counter)
        trainer.train_step()
        calls.append(len(counter) - before)
    # a rollout's first step: its calls + 1 teacher call + 1 student call for all four steps
    assert [c > 2 for c in calls] == [True, False, False, False] * 2 and calls.count(0) == 6


def test_frozen_predictions_asked_per_rollout_equal_those_asked_per_step(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=4)
    config.anchors.prompts, config.anchors.per_step = ["a green tree", "a house"], 1
    trainer = Trainer(config, progress=False)
    with torch.no_grad():
        for p in trainer.trainable.parameters():
            p.normal_(0, 0.3)  # the teacher must not see the LoRA, whenever it is asked
    calls = UNetCalls(trainer)
    steps = [trainer.step_queue.next() for _ in range(4)]
    rollout_calls = len(calls)
    assert not trainer.samples.samples and len(trainer.step_queue.ready) == 0
    for step in steps:
        assert step.anchors and len(step.frozen) == 2 * len(step.samples)  # target row + anchor row
        alone = trainer.teachers.predict(step.samples, wanted(trainer.step_queue.rows(step), ()))
        for batched, separate in zip(step.frozen, alone, strict=True):
            assert batched.keys() == separate.keys()
            for role in batched:
                torch.testing.assert_close(batched[role], separate[role], rtol=1e-4, atol=1e-5)
    assert len(calls) == rollout_calls + 4  # the check above: one call per step


def test_samples_of_one_rollout_share_one_teacher_and_one_student_call(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=4, samples_per_step=4)
    config.prompts = config.prompts[:1]
    trainer = Trainer(config, progress=False)
    samples = trainer.samples.next()
    assert len(samples) == 4 and not trainer.samples.samples
    calls = UNetCalls(trainer)
    batched = trainer.loss(Step(samples, []))
    assert len(calls) == 2 and {b for b, _ in calls.calls} == {4 * 2 * 2, 4 * 2}  # teacher: 2 texts
    one_by_one = sum(trainer.loss(Step([s], [])) for s in samples) / 4
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-7)


def test_entry_weight_scales_its_loss(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path), progress=False)
    with torch.no_grad():
        for p in trainer.trainable.parameters():
            p.normal_(0, 0.1)
    samples = trainer.samples.next()
    plain = trainer.loss(Step(samples, []))
    trainer.prompts[samples[0].prompt].settings.weight = 2.5
    torch.testing.assert_close(trainer.loss(Step(samples, [])), 2.5 * plain)


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl"])
def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path, tiny_folders, name):
    trainer = Trainer(make_config(tiny_folders[name], tmp_path, lr=1e-2), progress=False)
    samples = trainer.samples.next()
    trainer.step_queue.next = lambda: Step(samples, [])  # the same batch at every step
    with torch.no_grad():
        before = trainer.loss(Step(samples, [])).item()
    for _ in range(8):
        trainer.train_step()
    with torch.no_grad():
        after = trainer.loss(Step(samples, [])).item()
    assert after < 0.7 * before, (before, after)


def test_multiplier_zero_reproduces_the_original_unet(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path), progress=False)
    for _ in range(3):
        trainer.train_step()
    (sample,) = trainer.samples.next()
    text = trainer.prompts[sample.prompt].texts(sample.target)["target"]
    edited = trainer.edited
    cond = edited.condition(edited.embeddings[text], len(sample.latents), sample.size, sample.crop)
    with torch.no_grad(), trainer.trainable.strength(0.0):
        off = predict(trainer.unet, sample.latents, sample.timesteps, cond)
    original = DiffusionPipeline.from_pretrained(tiny_folders["sd1"]).unet
    with torch.no_grad():
        assert torch.equal(off, predict(original, sample.latents, sample.timesteps, cond))


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl"])
def test_trained_file_loads_in_diffusers_and_acts_like_our_network(tmp_path, tiny_folders, name):
    # Whether the edit is specific to the target prompt needs a model that knows what prompts mean:
    # that is measured on the bundled ink-digits model (tests/test_example_erasure.py), not on random weights.
    config = make_config(tiny_folders[name], tmp_path, iterations=10, lr=1e-2)
    trainer = Trainer(config, progress=False)
    result = trainer.run()
    assert result.path.name == "fox_last.safetensors" and result.steps == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fox_4steps.safetensors",
        "fox_8steps.safetensors",
        "fox_last.safetensors",
        "fox_state",
    ]
    pipe = DiffusionPipeline.from_pretrained(tiny_folders[name])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([900, 300])
    embeds = pipe_embeddings(pipe, "a red fox", 2)
    with torch.no_grad():
        before = pipe.unet(latents, timesteps, **embeds).sample
        pipe.load_lora_weights(str(result.path))
        theirs = pipe.unet(latents, timesteps, **embeds).sample
        ours = trainer.unet(latents, timesteps, **embeds).sample
    assert (theirs - before).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def pipe_embeddings(pipe, prompt: str, batch: int) -> dict:
    if hasattr(pipe, "text_encoder_2"):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, num_images_per_prompt=batch, do_classifier_free_guidance=False
        )
        time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * batch, dtype=torch.float32)
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }
    embeds, _ = pipe.encode_prompt(prompt, "cpu", batch, False)
    return {"encoder_hidden_states": embeds}


def test_saved_metadata_records_config_prompts_and_version(tmp_path, tiny_folders):
    import json

    from leco import __version__

    result = train(make_config(tiny_folders["sd1"], tmp_path, iterations=2), progress=False)
    _, metadata = read_lora_file(result.path)
    assert metadata["leco.version"] == __version__
    saved = LecoConfig.model_validate(json.loads(metadata["leco.config"]))
    assert saved.train.iterations == 2 and saved.prompts[1].neutral == "a car"
    assert json.loads(metadata["leco.prompts"])[0]["target"] == "a red fox"
    assert metadata["leco.step"] == metadata["ss_steps"] == "2" and metadata["leco.seed"] == "3"
    assert metadata["ss_sd_model_name"] == "sd1"
    # What kohya's train_leco writes about its prompts, for tools that show its files.
    assert metadata["ss_leco_prompt_count"] == "2" and "ss_leco_prompts_file" not in metadata  # inline
    first, second = json.loads(metadata["ss_leco_preview"])
    assert first == {
        "target": "a red fox",
        "positive": "a red fox",
        "unconditional": "",
        "neutral": "",
        "action": "erase",
        "multiplier": 1.0,
        "weight": 1.0,
    }
    assert (second["action"], second["neutral"]) == ("enhance", "a car")


def test_the_file_records_the_precision_the_steps_ran_in(tmp_path, tiny_folders):
    asked = {
        precision: make_config(tiny_folders["sd1"], tmp_path / precision, iterations=1, precision=precision)
        for precision in ("fp16", "bf16")
    }
    recorded = {
        p: read_lora_file(train(c, progress=False).path)[1]["ss_mixed_precision"] for p, c in asked.items()
    }
    assert recorded == {"fp16": "no", "bf16": "bf16"}  # the CPU trains fp16 in fp32; kohya says "no" for it


@pytest.mark.parametrize(("action", "sign"), [("erase", -1.0), ("enhance", 1.0)])
def test_the_loss_is_the_distance_to_the_entrys_objective_at_its_guidance(
    tmp_path, tiny_folders, action, sign
):
    """What the trainer minimises, written out: the trained prediction's squared distance to
    neutral -/+ g * (positive - unconditional), at the entry's own guidance scale."""
    from leco.steps import one_call

    config = make_config(tiny_folders["sd1"], tmp_path)
    entry = {"target": "a red fox", "neutral": "a fox", "action": action, "guidance_scale": 2.5}
    config.prompts = [PromptSettings.model_validate(entry)]
    trainer = Trainer(config, progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.trainable.parameters():  # a LoRA that moves the prediction
            parameter.normal_(0, 0.05)
    (step,) = trainer.step_queue.next_steps(1)
    rows, frozen = trainer.step_queue.rows(step), trainer.step_queue.frozen(step)
    with torch.no_grad(), trainer.strength([step]):
        loss = trainer.loss(step)
        student = list(trainer.edited.student(*one_call([step], [rows])))
    distances = [
        ((trained - (p["neutral"] + sign * 2.5 * (p["positive"] - p["unconditional"]))) ** 2).mean()
        for p, trained in zip(frozen, student, strict=True)
    ]
    assert len(rows) == len(step.samples) and not torch.equal(frozen[0]["positive"], frozen[0]["neutral"])
    assert loss.item() == pytest.approx((sum(distances) / len(step.samples)).item(), rel=1e-5)


@pytest.mark.parametrize(("family", "v_prediction"), [("sd1", False), ("sd2-v", True)])
def test_min_snr_weighting_weighs_each_samples_loss_by_its_timestep(
    tmp_path, tiny_folders, family, v_prediction
):
    """min(SNR, gamma) / SNR for noise prediction, / (SNR + 1) for v, each sample's squared error
    weighted by its own timestep's."""
    from leco.steps import one_call

    config = make_config(tiny_folders[family], tmp_path, min_snr_gamma=0.05, samples_per_rollout=4)
    config.prompts = config.prompts[:1]
    trainer = Trainer(config, progress=False)
    (step,) = trainer.step_queue.next_steps(1)
    rows, frozen = trainer.step_queue.rows(step), trainer.step_queue.frozen(step)
    with torch.no_grad(), trainer.strength([step]):
        loss = trainer.loss(step)
        student = list(trainer.edited.student(*one_call([step], [rows])))
    alphas = trainer.teachers.frozen.alphas_cumprod
    total, weights = 0.0, []
    for row, p, trained in zip(rows, frozen, student, strict=True):
        target = row.objective.target(p, row.guidance_scale)
        alpha = alphas[step.samples[row.sample].timesteps.long()]
        snr = alpha / (1 - alpha)
        weight = snr.clamp(max=0.05) / (snr + 1 if v_prediction else snr)
        weights.append(weight)
        total = total + (weight * (trained - target).pow(2).flatten(1).mean(dim=1)).mean()
    assert torch.cat(weights).min() < 1  # some samples are weighed down: the weighting is at work
    assert loss.item() == pytest.approx((total / len(step.samples)).item(), rel=1e-5)


def test_the_file_records_its_training_settings_as_kohya_does(tmp_path, tiny_folders):
    settings = {"optimizer_args": {"weight_decay": 0.01}, "lr_scheduler": "cosine", "lr_warmup_steps": 1}
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=2, lr=2e-3, seed=7, **settings)
    metadata = read_lora_file(train(config, progress=False).path)[1]
    expected = {
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)",
        "ss_learning_rate": "0.002",
        "ss_lr_scheduler": "cosine",
        "ss_lr_warmup_steps": "1",
        "ss_max_train_steps": "2",
        "ss_seed": "7",
    }
    assert {key: metadata.get(key) for key in expected} == expected


def test_a_bundled_model_is_recorded_by_the_name_the_user_gave(tmp_path):
    result = train(make_config("ink-digits", tmp_path, iterations=1), progress=False)
    assert read_lora_file(result.path)[1]["ss_sd_model_name"] == "ink-digits"  # not its folder's name


def test_resumed_run_ends_with_the_same_lora_as_an_uninterrupted_one(tmp_path, tiny_folders):
    whole = train(make_config(tiny_folders["sd1"], tmp_path / "whole", iterations=8), progress=False)
    first = train(make_config(tiny_folders["sd1"], tmp_path / "split", iterations=5), progress=False)
    resumed = train(
        make_config(tiny_folders["sd1"], tmp_path / "split", iterations=8), resume=first.state, progress=False
    )
    assert resumed.steps == 8
    a, b = lora_tensors(whole.path), lora_tensors(resumed.path)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # a: not empty


class FakeSummaryWriter:
    """Records what a run asks of TensorBoard (tensorboard is an extra the suite does not install)."""

    made: list = []

    def __init__(self, folder, purge_step=None):
        self.purge_step, self.steps = purge_step, []
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, key, value, step):
        if key == "loss":
            self.steps.append(step)

    def close(self):
        pass


def test_a_resumed_run_drops_the_tensorboard_steps_logged_after_its_state(
    tmp_path, tiny_folders, monkeypatch
):
    import importlib.util
    import types

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: name == "tensorboard" or find_spec(name, *a)
    )
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter)
    )
    monkeypatch.setattr(FakeSummaryWriter, "made", [])
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=4)
    config.logging.use_tensorboard = True
    first = train(config, progress=False)
    config.train.iterations = 6
    train(config, resume=first.state, progress=False)
    fresh, resumed = FakeSummaryWriter.made
    assert fresh.purge_step is None and fresh.steps == [1, 2, 3, 4]
    assert resumed.purge_step == 5 and resumed.steps == [5, 6]  # TensorBoard drops steps >= 5 logged before


def test_a_resumed_run_goes_on_in_its_own_wandb_run(tmp_path, tiny_folders, monkeypatch):
    import importlib.util
    import types

    runs = []

    class FakeRun:
        def log(self, values, step):
            pass

        def finish(self):
            pass

    def init(**options):
        runs.append(options)
        return FakeRun()

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: name == "wandb" or find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=4)
    config.logging.use_wandb = True
    first = train(config, progress=False)
    config.train.iterations = 6
    train(config, resume=first.state, progress=False)
    other = train(config, overwrite=True, progress=False)  # a new run of that name: a new W&B run
    assert other.steps == 6 and runs[0]["resume"] == "allow" and runs[0]["id"]
    assert runs[1]["id"] == runs[0]["id"] != runs[2]["id"]


def test_wandb_failing_to_start_is_one_line_and_a_project_it_refuses_is_named_before_loading(
    tmp_path, tiny_folders, monkeypatch
):
    import importlib.util
    import types

    class UsageError(Exception):  # wandb's own error types: anything may come out of wandb.init
        pass

    def init(**options):
        raise UsageError("No API key configured. Use `wandb login` to log in.\nmore")

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: name == "wandb" or find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=2)
    config.logging.use_wandb = True
    with pytest.raises(
        LecoError, match=r"^logging.use_wandb: W&B did not start \(No API key configured\. Use"
    ):
        train(config, progress=False)
    config.logging.wandb_project = "team/ink"
    monkeypatch.setattr("leco.trainer.load_models", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(LecoError, match=r"^logging.wandb_project: 'team/ink' is no W&B project name"):
        train(config, progress=False)


def test_accelerates_mixed_precision_is_said_not_to_be_read(tmp_path, tiny_folders, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    result = train(make_config(tiny_folders["sd1"], tmp_path, iterations=1), progress=False)
    assert "accelerate's mixed precision bf16 is not read: this run trains in train.precision fp32" in (
        capsys.readouterr().err
    )
    assert result.trainable.parameters()[0].dtype == torch.float32


def test_resume_refuses_a_state_of_another_run(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path, iterations=2), progress=False)
    other = make_config(tiny_folders["sd1"], tmp_path, iterations=4)
    other.network.rank = 8
    with pytest.raises(LecoError, match="different `network` section"):
        train(other, resume=first.state, progress=False)


def test_resuming_another_runs_state_never_replaces_a_run_of_this_name(tmp_path, tiny_folders):
    def config(name: str, iterations: int) -> LecoConfig:
        named = make_config(tiny_folders["sd1"], tmp_path, iterations=iterations)
        named.save.name = name
        return named

    base = train(config("base", 2), progress=False)
    finished = train(config("runb", 3), progress=False)
    before = finished.path.read_bytes()
    with pytest.raises(LecoError, match=r"--resume: .*base_state is another run's state, .* 'runb'"):
        train(config("runb", 4), resume=base.state, progress=False)
    assert finished.path.read_bytes() == before
    fresh = train(config("runc", 4), resume=base.state, progress=False)  # a new name may continue it
    assert fresh.steps == 4 and fresh.path.name == "runc_last.safetensors"


def test_nan_loss_stops_with_a_message_naming_the_step(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=2), progress=False)
    trainer.train_step()
    trainer.train_step()  # the rollout's two steps, from one forward
    with torch.no_grad():
        for parameter in trainer.trainable.parameters():
            parameter.fill_(float("nan"))
    hint = (
        "use train.precision: bf16 or fp32 .*, or a lower"
        if trainer.dtype == torch.float16
        else "use a lower"
    )
    with pytest.raises(
        LecoError, match=rf"step 3: the loss became nan; {hint} train.lr \(or a lower network.alpha"
    ):
        trainer.train_step()
    # the precision is named only where it is the likely cause
    assert "train.precision" in str(non_finite_loss(3, float("inf"), torch.float16))
    assert "train.precision" not in str(non_finite_loss(3, float("inf"), torch.float32))


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "lion", "prodigy", "sgd"])
@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "cosine_with_restarts", "step"])
def test_optimizers_and_schedules_train(tmp_path, tiny_folders, optimizer, scheduler):
    config = make_config(
        tiny_folders["sd1"], tmp_path, iterations=2, optimizer=optimizer, lr_scheduler=scheduler
    )
    trainer = Trainer(config, progress=False)
    start = [p.detach().clone() for p in trainer.trainable.parameters()]
    trainer.train_step()
    trainer.train_step()
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.trainable.parameters(), strict=True))


def test_a_learning_rate_free_optimizer_at_a_small_lr_is_pointed_out(tmp_path, tiny_folders, capsys):
    Trainer(make_config(tiny_folders["sd1"], tmp_path, optimizer="prodigy", lr=1e-4), progress=False)
    assert "train.lr: 0.0001 with prodigy, which finds its own step size" in capsys.readouterr().err
    Trainer(make_config(tiny_folders["sd1"], tmp_path, optimizer="prodigy", lr=1.0), progress=False)
    assert "train.lr" not in capsys.readouterr().err


def test_missing_optional_optimizer_names_the_package(tmp_path, tiny_folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(LecoError, match="adamw8bit needs the bitsandbytes package"):
        Trainer(make_config(tiny_folders["sd1"], tmp_path, optimizer="adamw8bit"), progress=False)


@pytest.mark.parametrize(
    ("train_options", "message"),
    [
        (
            {"optimizer_args": {"weight_decay": "abc"}},
            "train.optimizer_args: weight_decay='abc' is not a number",
        ),
        (
            {"lr_scheduler": "step", "lr_scheduler_args": {"step_size": "abc"}},
            "train.lr_scheduler_args: step_size='abc' is not a number",
        ),
        (
            {"optimizer_args": {"weight_decay": -1.0}},
            r"train.optimizer_args: Invalid weight_decay .* \(for AdamW\)",
        ),
        (  # an IndexError in AdamW, read item by item
            {"optimizer_args": {"betas": [0.9]}},
            r"optimizer_args: betas=\[0.9\] has the wrong number of items \(for AdamW\); betas takes two",
        ),
        # read only when stepping: found by a step on a stand-in before the first rollout
        ({"optimizer_args": {"betas": [0.9, 0.99, 0.5]}}, r"train.optimizer_args: .*\(for AdamW\)"),
        (
            {"optimizer": "lion", "optimizer_args": {"betas": [0.9]}},
            r"betas=\[0.9\] has the wrong number .*Lion",
        ),  # two betas, one out of range: Lion's own reason, not a count
        (
            {"optimizer": "lion", "optimizer_args": {"betas": [0.9, 1.5]}},
            r"optimizer_args: (?!.*wrong number)",
        ),
        ({"optimizer": "prodigy", "optimizer_args": {"d_coef": "x"}}, r"train.optimizer_args: d_coef='x'"),
        (
            {"lr_scheduler": "step", "lr_scheduler_args": {"gama": 0.1}},
            "train.lr_scheduler_args: 'gama' is not read by the step schedule; it takes step_size, gamma",
        ),
        ({"lr_scheduler": "step", "lr_scheduler_args": {"step_size": 0}}, "step_size must be a whole number"),
        ({"lr_scheduler": "step", "lr_scheduler_args": {"gamma": -1}}, "gamma must be above 0"),
        (
            {"lr_scheduler": "polynomial", "lr": 1e-8},
            "train.lr: 1e-08 is not above the polynomial schedule's lr_end",
        ),
    ],
)
def test_optimizer_and_schedule_arguments_they_refuse_are_one_line(
    tmp_path, tiny_folders, train_options, message, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(leco.trainer, "load_models", refuse)  # said before minutes of loading
    with pytest.raises(LecoError, match=message):
        Trainer(make_config(tiny_folders["sd1"], tmp_path, **train_options), progress=False)


@pytest.mark.parametrize(
    ("name", "args"), [("cosine", {"num_cycles": 1}), ("polynomial", {"lr_end": 1e-4, "power": 2})]
)
def test_schedule_arguments_shape_the_curve(name, args):
    from leco.config import TrainConfig
    from leco.optim import build_lr_scheduler

    def curve(arguments):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        train = TrainConfig(lr=1e-3, iterations=10, lr_scheduler=name, lr_scheduler_args=arguments)
        schedule, lrs = build_lr_scheduler(train, optimizer), []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return lrs

    assert curve(args) != curve({})  # diffusers' get_scheduler would drop these


def test_arguments_of_a_schedule_that_reads_none_are_ignored_as_the_note_says():
    from leco.config import TrainConfig
    from leco.optim import build_lr_scheduler

    def curve(arguments: dict) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        train = TrainConfig(lr=1e-3, iterations=10, lr_scheduler="linear", lr_scheduler_args=arguments)
        schedule = build_lr_scheduler(train, optimizer)  # diffusers would refuse the keyword
        lrs = []
        for _ in range(10):
            lrs.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return lrs

    assert curve({"gama": 0.5}) == curve({})  # the linear schedule as if none were given
    config = LecoConfig.model_validate(
        {"pretrained_model": {"name_or_path": "x"}, "prompts": PROMPTS,
         "train": {"lr_scheduler": "linear", "lr_scheduler_args": {"gama": 0.5}}}
    )  # fmt: skip
    assert "train.lr_scheduler_args: the linear schedule takes none; ignored" in config.unused_settings()


def test_lora_weights_stay_fp32_under_bf16(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path, precision="bf16"), progress=False)
    assert next(trainer.unet.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in trainer.trainable.parameters()} == {torch.float32}
    loss = trainer.train_step()
    assert math.isfinite(loss)  # finite under bf16 autocast
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.updates.optimizer.state.values())


def write_yaml_config(folder: Path, tiny: Path, iterations: int) -> Path:
    config = make_config(tiny, folder / "out", iterations=iterations).model_dump(mode="json")
    config["save"]["per_steps"] = 2
    prompts = config.pop("prompts")
    (folder / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    config["prompts_file"] = "prompts.yaml"
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leco", *args], capture_output=True, text=True, timeout=600, **kwargs
    )


def test_cli_trains_and_reports(tmp_path, tiny_folders):
    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=3)
    result = run_cli("train", "--config_file", str(config), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "done: 3 steps" in result.stdout
    assert (tmp_path / "out" / "fox_last.safetensors").is_file() and (
        tmp_path / "out" / "fox_2steps.safetensors"
    ).is_file()


def test_cli_bad_config_is_one_line_without_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "pretrained_model: {name_or_path: x}\nprompts_file: p.yaml\ntrain: {guidance: 3}\n"
    )
    (tmp_path / "p.yaml").write_text("- target: a\n")
    result = run_cli("train", str(tmp_path / "c.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    config_file = tmp_path / "c.yaml"
    assert line.startswith(f"leco train: error: {config_file}: train.guidance: unknown key; did you mean")
    assert "'rollout_guidance_scale'" in line


def test_train_set_changes_a_setting_without_editing_the_config(tmp_path, tiny_folders, capsys):
    from leco.cli import main

    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=400)
    changes = ["--set", "train.iterations=2", "--set", "train.seed=7", "--set", "save.name=fox_seed7"]
    assert main(["train", str(config), *changes, "--no-progress"]) == 0, capsys.readouterr().err
    metadata = read_lora_file(tmp_path / "out" / "fox_seed7_last.safetensors")[1]
    assert (metadata["leco.step"], metadata["leco.seed"]) == ("2", "7")
    assert "iterations: 400" in config.read_text()  # the file is as it was
    for change, says in (
        ("train.seed=-5", "--set train.seed=-5: train.seed: "),
        ("train.sed=1", "did you mean 'seed'"),
        ("seed=1", "give SECTION.KEY=VALUE, e.g. train.seed=1"),
        ("trian.seed=1", "trian is not a section of a leco config; did you mean 'train'?"),
        ("prompts.0.target=a cat", "prompts are a list; change them in the prompts file"),
        (
            "prompts_file=my red.yaml",
            "the prompts file is an option of its own; give --prompts_file 'my red.yaml'",
        ),
        ("save.name=", "no value; give one"),
        ("save.name=fox #2", "' #' starts a YAML comment, which would cut the value; quote it"),
        ("train.samples_per_step=64", "--set train.iterations=2 train.samples_per_step=64: "),  # fine alone
    ):
        assert main(["train", str(config), "--set", "train.iterations=2", "--set", change]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if not line.startswith("leco: warning: ")]
        assert len(errors) == 1 and says in errors[0], err  # (the test config sets keys it never reads)
    assert main(["train", str(config), "--set", "save.name=fox_seed7"]) == 2  # that run's files are there
    assert f"error: {config} with --set save.name=fox_seed7: save.path: " in capsys.readouterr().err


def stop_a_cli_run(
    tmp_path: Path, tiny: Path, stop_signal: int, *options: str
) -> tuple[subprocess.Popen, str, str]:
    """`leco train` of 400 steps in a process, sent `stop_signal` once its 2-step file exists."""
    config = write_yaml_config(tmp_path, tiny, iterations=400)
    process = subprocess.Popen(
        [sys.executable, "-m", "leco", "train", str(config), "--no-progress", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # the same thread count as this process: a float sum may round differently with another
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    deadline = time.time() + 300
    while not (tmp_path / "out" / "fox_2steps.safetensors").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(stop_signal)
    out, err = process.communicate(timeout=120)
    return process, out, err


def test_ctrl_c_saves_a_loadable_file_and_resume_finishes_the_same_run(tmp_path, tiny_folders):
    process, out, err = stop_a_cli_run(tmp_path, tiny_folders["sd1"], signal.SIGINT)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "continue with: leco train" in out
    interrupted = tmp_path / "out" / "fox_interrupted.safetensors"
    tensors, metadata = read_lora_file(interrupted)
    stopped = int(metadata["leco.step"])
    assert 2 <= stopped < 400 and tensors

    # continue to a short end, and compare with one uninterrupted run of the same length
    end = stopped + 3
    resumed = train(
        make_config(tiny_folders["sd1"], tmp_path / "out", iterations=end),
        resume=tmp_path / "out" / "fox_state",
        progress=False,
    )
    whole = train(make_config(tiny_folders["sd1"], tmp_path / "whole", iterations=end), progress=False)
    a, b = lora_tensors(resumed.path), lora_tensors(whole.path)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # a: not empty


def test_a_stop_during_the_last_step_finishes_the_run(tmp_path, tiny_folders, monkeypatch):
    """The last step done is the run done: its file is _last, not an _interrupted one that a resume
    (refused at step == iterations) could never turn into _last."""
    from leco.checkpoints import StopRequest

    class StopAsked(StopRequest):
        def __enter__(self):
            super().__enter__()
            self.requested = True  # Ctrl-C while the step runs
            return self

    monkeypatch.setattr("leco.trainer.StopRequest", StopAsked)
    done = train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=1), progress=False)
    assert not done.interrupted and done.path.name == "fox_last.safetensors"
    stopped = train(make_config(tiny_folders["sd1"], tmp_path / "b", iterations=3), progress=False)
    assert stopped.interrupted and stopped.steps == 1 and stopped.path.name == "fox_interrupted.safetensors"


def test_python_api_is_leco_train(tmp_path, tiny_folders):
    import leco

    result = leco.train(make_config(tiny_folders["sd1"], tmp_path, iterations=1), progress=False)
    assert result.steps == 1 and result.path.is_file()


def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_folders):
    updates = []
    for checkpointing in (False, True):
        trainer = Trainer(
            make_config(tiny_folders["sd1"], tmp_path, gradient_checkpointing=checkpointing), progress=False
        )
        assert trainer.unet.is_gradient_checkpointing == checkpointing  # compared on and off, truly
        trainer.train_step()
        updates.append([p.detach().clone() for p in trainer.trainable.parameters()])
    for plain, checkpointed in zip(*updates, strict=True):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-5, atol=1e-7)


def test_missing_logging_packages_are_named(tmp_path, tiny_folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=1)
    config.logging.use_tensorboard = True
    with pytest.raises(LecoError, match="tensorboard is not installed; pip install tensorboard"):
        train(config, progress=False)
    monkeypatch.setitem(sys.modules, "wandb", None)
    config.logging.use_tensorboard, config.logging.use_wandb = False, True
    with pytest.raises(LecoError, match="wandb is not installed; pip install wandb"):
        train(config, progress=False)


def test_sd2_projections_can_be_saved_in_the_form_kohyas_scripts_load(tmp_path, tiny_folders):
    from leco.models import load_models
    from leco.network import LoRANetwork

    config = make_config(tiny_folders["sd2-v"], tmp_path, iterations=2)
    config.network.type = "lierla"
    config.save.sd2_proj_4d = True
    result = train(config, progress=False)
    tensors, metadata = read_lora_file(result.path)
    projections = [v for k, v in tensors.items() if k.split(".")[0].endswith(("_proj_in", "_proj_out"))]
    assert metadata["leco.sd2_proj"] == "4d" and projections
    assert all(v.ndim == 4 for v in projections if v.ndim)  # alphas stay 0-d
    models = load_models(str(tiny_folders["sd2-v"]))
    loaded = LoRANetwork.from_file(models.unet, models.family, result.path)  # leco reads either form
    ours = result.trainable.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], ours[k]) for k in ours)


def test_sd2_projections_asked_of_a_network_without_them_is_one_line(tmp_path, tiny_folders):
    from leco.config import ConfigError, LecoConfig

    config = make_config(tiny_folders["sd1"], tmp_path)
    config.save.sd2_proj_4d = True
    with pytest.raises(
        LecoError, match=r"^save.sd2_proj_4d: only for SD2, whose Linear proj_in/proj_out .* is sd1"
    ):
        Trainer(config, progress=False)
    assert not any(tmp_path.iterdir())
    document = make_config(tiny_folders["sd2-v"], tmp_path).model_dump()
    document["save"]["sd2_proj_4d"] = True
    document["network"]["training_method"] = "text-encoder"
    with pytest.raises(ConfigError, match="sd2_proj_4d: a text-encoder LoRA has no UNet proj_in/proj_out"):
        LecoConfig.model_validate(document).check_combination()


def test_a_clip_skip_past_the_text_encoders_layers_is_one_line(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path)
    config.pretrained_model.clip_skip = 99
    with pytest.raises(LecoError, match=r"clip_skip: 99 skips past the \d+ text-encoder layers"):
        Trainer(config, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("name", "network", "anchors", "checkpointing"),
    # c3lier: 3x3 convs too; anchors ride along; gradient checkpointing runs layers twice
    [("sd1", "c3lier", 0, False), ("sdxl", "lierla", 1, False), ("sd2-v", "lierla", 0, True)],
)
def test_steps_sharing_one_forward_get_their_own_gradients(
    tmp_path, tiny_folders, name, network, anchors, checkpointing
):
    config = make_config(
        tiny_folders[name],
        tmp_path,
        samples_per_rollout=4,
        steps_per_forward=4,
        gradient_checkpointing=checkpointing,
    )
    config.network.type = network
    if anchors:
        config.anchors.prompts, config.anchors.per_step = ["a green tree"], anchors
    config.prompts = config.prompts[:1]  # batch_size 2: two batch elements per step
    trainer = Trainer(config, progress=False)
    with torch.no_grad():
        for p in trainer.trainable.parameters():
            p.normal_(0, 0.3)
    steps = trainer.step_queue.next_steps(4)
    assert len(steps) == 4
    calls = UNetCalls(trainer)
    together = trainer.step_gradients(steps)
    assert len(calls) == 1  # one student call for the four steps
    for step, (loss, gradients) in zip(steps, together, strict=True):
        alone_loss, alone = trainer.step_gradients([step])[0]
        torch.testing.assert_close(loss, alone_loss, rtol=1e-5, atol=1e-7)
        assert any(g.abs().sum() > 0 for g in alone)
        for shared, own in zip(gradients, alone, strict=True):
            torch.testing.assert_close(shared, own, rtol=1e-4, atol=1e-6)


def test_steps_sharing_a_forward_follow_the_rollouts_and_resume_exactly_from_inside_a_block(
    tmp_path, tiny_folders
):
    def config(out, iterations):
        return make_config(
            tiny_folders["sd1"], out, iterations=iterations, samples_per_rollout=8, steps_per_forward=3
        )

    trainer = Trainer(config(tmp_path / "probe", 10), progress=False)
    sizes = []
    for _ in range(5):
        sizes.append(len(trainer.step_gradients(trainer.step_queue.next_steps(3))))
    assert sizes == [3, 3, 2, 3, 3]  # a rollout's 8 steps in blocks of at most 3, then the next one's
    whole = train(config(tmp_path / "whole", 10), progress=False)
    first = train(config(tmp_path / "split", 4), progress=False)  # ends inside the second block
    resumed = train(config(tmp_path / "split", 10), resume=first.state, progress=False)
    a, b = lora_tensors(whole.path), lora_tensors(resumed.path)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parallel_rollouts_sample_side_by_side_in_one_call_per_denoising_step(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=3, parallel_rollouts=2)
    config.prompts = config.prompts[:1]  # batch_size 2, guidance: each call holds 2 copies x 2 x 2
    trainer = Trainer(config, progress=False)
    calls = UNetCalls(trainer)
    steps = trainer.step_queue.next_steps(10)
    rollout_calls = [batch for batch, _ in calls.calls[:-1]]  # the last call: the teacher's
    assert len(steps) == 6 and all(len(step.samples[0].latents) == 2 for step in steps)
    assert rollout_calls and set(rollout_calls) == {8} and len(rollout_calls) <= 8
    assert len({int(step.samples[0].timesteps[0]) for step in steps}) >= 4  # two copies' own timesteps
    trainer.train_step()  # trains on them as on any step


def test_per_step_gradients_refuse_layers_they_cannot_split():
    from torch import nn

    from leco.errors import LecoError
    from leco.step_gradients import step_gradients, supported

    grouped = nn.Conv2d(4, 4, 3, groups=2, bias=False)
    assert supported([nn.Linear(3, 2, bias=False), nn.Conv2d(3, 2, 3, padding=1, bias=False)])
    assert not supported([grouped]) and not supported([nn.Conv2d(3, 2, 3, padding="same", bias=False)])
    with (
        pytest.raises(LecoError, match=r"^train.steps_per_forward: .* set 1$"),
        step_gradients([grouped.weight], [grouped], [0, 1]),
    ):
        pass
    with step_gradients([grouped.weight], None, [0, 0]):  # one group: a plain backward, nothing to split
        pass


def test_a_rank_above_every_layer_is_one_line_before_any_allocation(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path)
    config.network.rank = 100_000  # peft would try to allocate gigabytes
    with pytest.raises(LecoError, match=r"^network.rank: above the size of every layer .* use at most \d+$"):
        Trainer(config, progress=False)
    config.network.rank, config.network.conv_rank = 2, 100_000
    with pytest.raises(LecoError, match=r"^network.conv_rank: above the size"):
        Trainer(config, progress=False)


@pytest.mark.parametrize("steps_per_forward", [1, 3])
def test_gradient_checkpointing_recomputes_at_the_entrys_strength(tmp_path, tiny_folders, steps_per_forward):
    """A slider's -1 side: the backward, where checkpointed layers are run again, is at -1 too."""
    gradients = {}
    for checkpointing in (False, True):
        config = make_config(
            tiny_folders["sd1"],
            tmp_path / str(checkpointing),
            samples_per_rollout=3,
            steps_per_forward=steps_per_forward,
            gradient_checkpointing=checkpointing,
        )
        config.network.type = "lierla"
        config.prompts = config.prompts[:1]
        config.prompts[0].multiplier = -1.0
        trainer = Trainer(config, progress=False)
        assert trainer.unet.is_gradient_checkpointing == checkpointing
        with torch.no_grad():
            for p in trainer.trainable.parameters():
                p.normal_(0, 0.3)
        blocks = trainer.step_gradients(trainer.step_queue.next_steps(steps_per_forward))
        gradients[checkpointing] = [g for _, step in blocks for g in step]
    assert len(gradients[True]) == len(gradients[False]) > 0
    for plain, checkpointed in zip(gradients[False], gradients[True], strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def test_the_python_api_takes_a_file_a_dict_or_a_config_and_refuses_the_rest(
    tmp_path, tiny_folders, monkeypatch
):
    path = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=2)  # prompts_file: prompts.yaml
    document = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)  # a prompts_file outside a config file is read from the working directory
    assert train(document, progress=False).steps == 2
    assert train(LecoConfig(**document), progress=False, overwrite=True).steps == 2
    with pytest.raises(LecoError, match="overwrite: 'no'; give True or False"):
        train(path, overwrite="no")
    with pytest.raises(LecoError, match="progress: 'no'; give True or False"):
        train(path, progress="no")
    with pytest.raises(LecoError, match="resume= continues a run and overwrite= replaces it"):
        train(path, resume=tmp_path / "out_state", overwrite=True)
    with pytest.raises(LecoError, match="config: a int; give a config file's path, a dict"):
        train(3)
    # a dict is no file: its problems are named "config", not a path beside the working folder
    with pytest.raises(LecoError, match="^config: prompts_file: missing; name the prompts YAML"):
        train({key: value for key, value in document.items() if key != "prompts_file"})
    absent = r"^config: prompts_file: .absent.yaml. not found \(looked at absent.yaml\)"
    with pytest.raises(LecoError, match=absent):
        train({**document, "prompts_file": "absent.yaml"})
    (tmp_path / "targets.txt").write_text("a red fox\na fox, red\n")  # read as a config file's are
    inline = {**document, "prompts": [{"target_file": "targets.txt", "neutral": "a fox"}]}
    inline.pop("prompts_file")
    inline["train"] = {**inline["train"], "seed": -1}  # -1: a random seed, as A1111 and kohya_ss read it
    result = train(inline, progress=False, overwrite=True)
    assert result.steps == 2 and read_lora_file(result.path)[1]["leco.seed"] != "-1"


def test_resume_keeps_the_earlier_runs_final_weights_as_its_step_file(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path, iterations=6), progress=False)
    final = lora_tensors(first.path)
    train(make_config(tiny_folders["sd1"], tmp_path, iterations=9), resume=first.state, progress=False)
    kept = tmp_path / "fox_6steps.safetensors"  # was fox_last.safetensors, which the resumed run rewrote
    assert read_lora_file(kept)[1]["leco.step"] == "6"
    assert all(torch.equal(final[key], value) for key, value in lora_tensors(kept).items())
    assert read_lora_file(tmp_path / "fox_last.safetensors")[1]["leco.step"] == "9"


def test_a_size_off_the_latent_grid_names_where_it_was_set(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path, resolution=18)  # the tiny grid is 4 pixels
    with pytest.raises(LecoError, match=r"^train.resolution: 18 is not a multiple of 4 .*use e.g. 16"):
        Trainer(config, progress=False)
    config = make_config(tiny_folders["sd1"], tmp_path)
    config.prompts[1].resolution = 18
    with pytest.raises(LecoError, match=r"^prompts entry 2: resolution 18 is not a multiple of 4"):
        Trainer(config, progress=False)
    prompts_file = tmp_path / "my_prompts.yaml"  # entries read from a prompts file are named by it
    prompts_file.write_text("- target: a cat\n- target: a dog\n  resolution: 18\n")
    config.prompts = load_prompts(prompts_file)
    with pytest.raises(LecoError, match=r"^my_prompts.yaml: entry 2: resolution 18"):
        Trainer(config, progress=False)


def test_the_python_api_leaves_the_callers_config_and_torch_state_as_they_were(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=1)
    config.prompts, config.prompts_file = [], str(tmp_path / "prompts.yaml")
    (tmp_path / "prompts.yaml").write_text("- target: a red fox\n")
    written = config.model_dump()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    torch.set_default_dtype(torch.float64)  # a notebook's settings, which training must not trip over
    try:
        with torch.no_grad():
            assert train(config, progress=False).steps == 1
            assert not torch.is_grad_enabled()
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream goes on where it was
    assert config.model_dump() == written  # its prompts still come from its prompts_file next time

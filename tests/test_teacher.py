"""The teacher: prediction-type conversion, and a transplant from another model."""

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from leco import train
from leco.config import LecoConfig
from leco.errors import LecoError
from leco.network import read_lora_file
from leco.teacher import convert_prediction
from leco.testing import BETAS
from leco.trainer import Trainer


def test_v_and_epsilon_conversions_match_diffusers_formulas():
    scheduler = DDPMScheduler(**{k: BETAS[k] for k in ("beta_start", "beta_end", "beta_schedule")})
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    noise = torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([1, 250, 700, 999])
    x_t = scheduler.add_noise(x0, noise, timesteps)
    v = scheduler.get_velocity(x0, noise, timesteps)
    alphas = scheduler.alphas_cumprod
    torch.testing.assert_close(
        convert_prediction(v, x_t, timesteps, alphas, "v_prediction", "epsilon"), noise
    )
    torch.testing.assert_close(
        convert_prediction(noise, x_t, timesteps, alphas, "epsilon", "v_prediction"), v
    )
    assert convert_prediction(v, x_t, timesteps, alphas, "epsilon", "epsilon") is v


def test_a_converted_prediction_takes_the_same_sampling_step():
    # DDIM with a v model and with the converted epsilon reach the same previous latent.
    common = {**BETAS, "timestep_spacing": "trailing"}
    v_sampler = DDIMScheduler(**common, prediction_type="v_prediction")
    eps_sampler = DDIMScheduler(**common, prediction_type="epsilon")
    for sampler in (v_sampler, eps_sampler):
        sampler.set_timesteps(10)
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    v = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = v_sampler.timesteps[3]
    eps = convert_prediction(v, x_t, t.repeat(2), v_sampler.alphas_cumprod, "v_prediction", "epsilon")
    torch.testing.assert_close(
        v_sampler.step(v, t, x_t).prev_sample, eps_sampler.step(eps, t, x_t).prev_sample, rtol=1e-4, atol=1e-5
    )


def transplant_config(student, teacher, out, **train_options) -> LecoConfig:
    train_options = {
        "precision": "fp32",
        "iterations": 6,
        "seed": 5,
        "max_denoising_steps": 8,
        "lr": 3e-3,
        **train_options,
    }
    return LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": str(student)},
            "teacher": {"name_or_path": str(teacher)},
            "prompts": [
                {
                    "target": "a red fox",
                    "positive": "a red fox, vivid",
                    "neutral": "a fox",
                    "action": "enhance",
                }
            ],
            "network": {"rank": 2},
            "train": train_options,
            "save": {"path": str(out), "name": "fox", "per_steps": 3},
        }
    )


def test_concept_roles_come_from_the_teacher_in_the_students_prediction_type(tmp_path, tiny_folders):
    trainer = Trainer(transplant_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path), progress=False)
    samples = trainer.samples.next()
    prompt = trainer.prompts[0]
    texts = prompt.texts(0)
    wanted = [(0, {r: texts[r] for r in prompt.objective.roles})]
    (predictions,) = trainer.teachers.predict(samples, wanted)
    concept, frozen = trainer.teachers.concept, trainer.teachers.frozen
    assert concept is not frozen and concept.prediction_type == "v_prediction"
    sample = samples[0]
    for role, teacher in (("positive", concept), ("unconditional", concept), ("neutral", frozen)):
        cond = teacher.conditioning(_block(sample, texts[role]))
        with torch.no_grad(), trainer.trainable.strength(0.0):
            raw = teacher.unet(
                sample.latents, sample.timesteps, encoder_hidden_states=cond.hidden_states
            ).sample
        expected = convert_prediction(
            raw, sample.latents, sample.timesteps, frozen.alphas_cumprod, teacher.prediction_type, "epsilon"
        )
        torch.testing.assert_close(predictions[role], expected, rtol=1e-4, atol=1e-5)


def _block(sample, text):
    from leco.teacher import Block

    return Block(sample.latents, sample.timesteps, sample.size, sample.crop, [text])


@pytest.mark.parametrize(("student_name", "teacher_name"), [("sd1", "sd2-v"), ("sd2-v", "sd1")])
def test_a_student_with_a_teacher_of_the_other_family_trains_saves_and_resumes_exactly(
    tmp_path, tiny_folders, student_name, teacher_name
):
    student, teacher = tiny_folders[student_name], tiny_folders[teacher_name]
    whole = train(transplant_config(student, teacher, tmp_path / "whole"), progress=False)
    first = train(transplant_config(student, teacher, tmp_path / "split", iterations=3), progress=False)
    resumed = train(
        transplant_config(student, teacher, tmp_path / "split"), resume=first.state, progress=False
    )
    a, b = read_lora_file(whole.path)[0], read_lora_file(resumed.path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # it learned something


@pytest.mark.parametrize(
    ("part", "key", "value", "message"),
    [
        ("vae", "scaling_factor", 0.13025, "VAE scaling_factor .* not share a latent space"),
        ("scheduler", "beta_end", 0.02, "another noise schedule"),
        ("scheduler", "num_train_timesteps", 500, "training timesteps .* not share a noise schedule"),
    ],
)
def test_a_teacher_in_another_latent_space_fails_before_any_step(
    tmp_path, tiny_folders, part, key, value, message
):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_folders["sd2-v"], teacher)
    config_file = teacher / part / ("config.json" if part == "vae" else "scheduler_config.json")
    config = json.loads(config_file.read_text())
    config[key] = value
    config_file.write_text(json.dumps(config))
    with pytest.raises(LecoError, match=f"teacher.name_or_path: .*{message}") as caught:
        Trainer(transplant_config(tiny_folders["sd1"], teacher, tmp_path / "out"), progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "fox_last.safetensors").exists()


def test_a_bad_teacher_setting_is_named_under_teacher(tmp_path, tiny_folders):
    with pytest.raises(LecoError, match=r"^teacher\.name_or_path: .* is neither a file, a folder"):
        missing = transplant_config(tiny_folders["sd1"], tmp_path / "missing", tmp_path / "out")
        Trainer(missing, progress=False)
    config = transplant_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path / "out")
    config.teacher.v_pred = False  # the tiny SD2 folder is a v-prediction model
    with pytest.raises(LecoError, match=r"^teacher\.v_pred: is false but "):
        Trainer(config, progress=False)


def test_a_teacher_that_is_the_student_itself_is_warned_of(tmp_path, tiny_folders, capsys):
    Trainer(transplant_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path / "a"), progress=False)
    assert "teacher:" not in capsys.readouterr().err
    Trainer(transplant_config(tiny_folders["sd1"], tiny_folders["sd1"], tmp_path / "b"), progress=False)
    assert "is the model being trained, so nothing new is carried over" in capsys.readouterr().err


def test_an_offloaded_teacher_predicts_the_same_and_says_the_cpu_needs_no_offload(
    tmp_path, tiny_folders, capsys
):
    plain = Trainer(
        transplant_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path / "a"), progress=False
    )
    assert "teacher.offload" not in capsys.readouterr().err
    config = transplant_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path / "b")
    config.teacher.offload = True
    offloaded = Trainer(config, progress=False)
    assert "teacher.offload: this run is on the CPU" in capsys.readouterr().err
    samples = plain.samples.next()
    prompt = plain.prompts[0]
    texts = prompt.texts(0)
    wanted = [(0, {r: texts[r] for r in prompt.objective.roles})]
    (expected,) = plain.teachers.predict(samples, wanted)
    (predictions,) = offloaded.teachers.predict(samples, wanted)
    assert (
        offloaded.teachers.concept.offload
        and next(offloaded.teachers.concept.unet.parameters()).device.type == "cpu"
    )
    for role in prompt.objective.roles:
        torch.testing.assert_close(predictions[role], expected[role])


def teacher_rollouts_config(student, teacher, out, share, **train_options) -> LecoConfig:
    config = transplant_config(student, teacher, out, **train_options)
    config.teacher.rollout_share = share
    return config


def test_rollouts_by_the_teacher_sample_its_guided_prediction_in_the_students_type(tmp_path, tiny_folders):
    config = teacher_rollouts_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path, 1.0)
    trainer = Trainer(config, progress=False)
    teacher, prompt = trainer.teachers.concept, trainer.prompts[0]
    texts = prompt.texts(0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(600)
    model = teacher.guided(texts["target"], texts["unconditional"], 3.0, prompt.size, (0, 0))
    answers = teacher.predict([_block_at(latents, t, prompt, [texts["unconditional"], texts["target"]])])[0]
    expected = answers[texts["unconditional"]] + 3.0 * (
        answers[texts["target"]] - answers[texts["unconditional"]]
    )
    torch.testing.assert_close(model(latents, t), expected)
    # the queue's rollouts are the teacher's: other latents than the edited student's from one seed
    by_teacher = trainer.samples.next()[0].latents
    edited = Trainer(
        transplant_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path / "e"), progress=False
    )
    assert not torch.allclose(by_teacher, edited.samples.next()[0].latents)


def _block_at(latents, t, prompt, texts):
    from leco.teacher import Block

    return Block(latents, t.reshape(1), prompt.size, (0, 0), texts)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_rollouts_by_the_teacher_train_and_resume_exactly(tmp_path, tiny_folders, share, monkeypatch):
    from leco.teacher import Teacher
    from leco.trainable import EditedModel

    student, teacher = tiny_folders["sd2-v"], tiny_folders["sd1"]

    def config(folder, **options):  # one latent a rollout: six rollouts in six steps
        options = {"samples_per_rollout": 1, **options}
        return teacher_rollouts_config(student, teacher, tmp_path / folder, share, **options)

    samplers = []
    for name, owner in (("teacher", Teacher), ("edited", EditedModel)):

        def counted(self, *args, name=name, original=owner.guided, **kwargs):
            samplers.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, "guided", counted)
    whole = train(config("whole"), progress=False)
    by_teacher = samplers.count("teacher")
    assert by_teacher == 6 if share == 1.0 else 0 < by_teacher < 6  # both kinds, with a share
    first = train(config("split", iterations=3), progress=False)
    resumed = train(config("split"), resume=first.state, progress=False)
    a, b = read_lora_file(whole.path)[0], read_lora_file(resumed.path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_share_of_rollouts_is_sampled_by_each_model(tmp_path, tiny_folders, monkeypatch):
    config = teacher_rollouts_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path, 0.25)
    trainer = Trainer(config, progress=False)
    calls = []
    for name, owner in (("teacher", trainer.samples.teacher), ("edited", trainer.edited)):
        original = owner.guided
        monkeypatch.setattr(
            owner,
            "guided",
            lambda *a, name=name, original=original, **k: calls.append(name) or original(*a, **k),
        )
    for _ in range(40):
        trainer.samples.roll_out()
    assert 3 <= calls.count("teacher") <= 18 and calls.count("edited") == 40 - calls.count("teacher")


def test_a_lora_given_as_the_teacher_is_named_as_such(tmp_path, tiny_folders):
    first = train(
        transplant_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path / "a", iterations=1),
        progress=False,
    )
    config = transplant_config(tiny_folders["sd1"], first.path, tmp_path / "b")
    with pytest.raises(
        LecoError, match=r"^teacher.name_or_path: .*fox_last.safetensors: is a LoRA, not a model"
    ):
        Trainer(config, progress=False)


def test_a_state_saved_before_rollout_share_existed_resumes(tmp_path, tiny_folders):
    from leco.checkpoints import STATE_FILE, state_file_of

    student, teacher = tiny_folders["sd1"], tiny_folders["sd2-v"]
    first = train(transplant_config(student, teacher, tmp_path, iterations=3), progress=False)
    file = state_file_of(first.state)
    state = torch.load(file, weights_only=False)
    saved = json.loads(state["config"])
    del saved["teacher"]["rollout_share"]  # as an earlier leco wrote it
    state["config"] = json.dumps(saved)
    torch.save(state, file)
    assert file.name == STATE_FILE
    resumed = train(transplant_config(student, teacher, tmp_path), resume=first.state, progress=False)
    assert resumed.path.is_file()
    # who samples the rollouts may change for the rest of a run (the teacher first, then the student)
    longer = teacher_rollouts_config(student, teacher, tmp_path, 0.5, iterations=8)
    assert train(longer, resume=resumed.state, progress=False).path.is_file()
    other = transplant_config(student, student, tmp_path, iterations=8)  # another teacher: refused
    with pytest.raises(LecoError, match=r"was trained with a different `teacher` section"):
        train(other, resume=resumed.state, progress=False)


def test_an_offloaded_teacher_stays_on_the_device_for_a_whole_rollout(tmp_path, tiny_folders, monkeypatch):
    config = teacher_rollouts_config(tiny_folders["sd1"], tiny_folders["sd2-v"], tmp_path, 1.0)
    config.teacher.offload = True
    trainer = Trainer(config, progress=False)
    unet = trainer.teachers.concept.unet
    moves = []
    original = unet.to
    monkeypatch.setattr(unet, "to", lambda *a, **k: moves.append(a) or original(*a, **k))
    trainer.samples.roll_out()  # 8 denoising steps, each a teacher call
    assert len(moves) == 2  # there once and back once
    trainer.teachers.concept.predict(
        [_block_at(torch.zeros(1, 4, 8, 8), torch.tensor(5), trainer.prompts[0], [""])]
    )
    assert len(moves) == 4  # a single call outside a rollout still moves it there and back

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline

from leco.conditioning import predict
from leco.config import LecoConfig
from leco.errors import LecoError
from leco.network import read_lora_file
from leco.trainer import Trainer, train

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


def test_batched_teacher_equals_three_separate_calls(tmp_path, tiny_folders):
    config = make_config(tiny_folders["sdxl"], tmp_path)
    config.prompts[0].neutral = "a photo"  # three distinct teacher prompts
    trainer = Trainer(config, progress=False)
    trainer.network.multiplier = 1.0
    with torch.no_grad():
        for p in trainer.network.parameters():
            p.normal_(0, 0.3)  # a LoRA that changes things: the teacher must still see the original model
    sample = trainer.next_sample()
    prompt = trainer.prompts[sample.prompt]
    calls = trainer.unet_calls
    batched, _ = trainer.teacher_predictions(prompt, sample)
    assert trainer.unet_calls == calls + 1
    trainer.network.remove()  # the original UNet, no LoRA at all
    for role, row in prompt.teacher_rows.items():
        cond = trainer.conditioning(prompt.teacher, prompt, sample.size, sample.crop)
        rows = cond.hidden_states.shape[0] // len(prompt.teacher)
        single = type(cond)(
            *(None if t is None else t[row * rows : (row + 1) * rows] for t in cond._tensors())
        )
        with torch.no_grad():
            alone = predict(trainer.unet, sample.latents, sample.timesteps, single)
        torch.testing.assert_close(batched[role], alone, rtol=1e-4, atol=1e-5)


def test_teacher_batch_drops_duplicate_prompts(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path), progress=False)
    first, second = trainer.prompts
    # defaults: neutral == unconditional == "" -> two teacher rows, not three
    assert len(first.teacher) == 2 and first.teacher_rows == {"positive": 0, "neutral": 1, "unconditional": 1}
    assert len(second.teacher) == 3


def test_each_prompt_trains_at_its_own_multiplier(tmp_path, tiny_folders):
    # A two-sided slider: the second entry's poles are swapped and it trains the LoRA at -1.
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=1)
    config.prompts[1].multiplier = -1.0
    trainer = Trainer(config, progress=False)
    seen: list[tuple[int, float]] = []  # (batch rows, LoRA multiplier) of every UNet call
    original = trainer.predict

    def spy(latents, timesteps, cond):
        seen.append((latents.shape[0], trainer.network.multiplier))
        return original(latents, timesteps, cond)

    trainer.predict = spy
    sides = set()
    for _ in range(12):
        seen.clear()
        sample = trainer.next_sample()
        rolled_out = list(seen)
        trainer.loss(sample)
        multiplier = config.prompts[sample.prompt].multiplier
        sides.add(multiplier)
        assert all(m == multiplier for _, m in rolled_out)  # the rollout: the edited model at that side
        teacher, student = seen[len(rolled_out) :]
        assert teacher[1] == 0.0 and student[1] == multiplier
    assert sides == {1.0, -1.0} and trainer.network.multiplier == 1.0
    with pytest.raises(ValueError, match="must not be 0"):
        config.prompts[0].multiplier = 0


class BatchCounter:
    """Wraps the UNet to record the batch size of every call."""

    def __init__(self, unet):
        self.unet, self.batches = unet, []

    def __call__(self, latents, *args, **kwargs):
        self.batches.append(latents.shape[0])
        return self.unet(latents, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.unet, name)


@pytest.mark.parametrize(("guidance", "factor"), [(1.0, 1), (3.0, 2)])
def test_rollout_doubles_the_batch_only_when_guiding(tmp_path, tiny_folders, guidance, factor):
    config = make_config(
        tiny_folders["sd1"], tmp_path, rollout_guidance_scale=guidance, samples_per_rollout=2
    )
    config.prompts = config.prompts[:1]
    trainer = Trainer(config, progress=False)
    counter = BatchCounter(trainer.unet)
    trainer.unet = counter
    samples = trainer.rollout_samples()
    batch = trainer.prompts[0].batch_size
    assert counter.batches and set(counter.batches) == {batch * factor}
    assert len(samples) == 2 and samples[0].timesteps[0] != samples[1].timesteps[0]


@pytest.mark.parametrize("reuse", [1, 4])
def test_unet_calls_per_step_follow_the_rollout_reuse(tmp_path, tiny_folders, reuse):
    config = make_config(tiny_folders["sd1"], tmp_path, samples_per_rollout=reuse, max_denoising_steps=20)
    trainer = Trainer(config, progress=False)
    calls = []
    for _ in range(4 * reuse):
        before_queue = len(trainer.queue)
        plans_calls = trainer.unet_calls
        trainer.train_step()
        calls.append(trainer.unet_calls - plans_calls)
        if before_queue == 0:
            assert len(trainer.queue) == reuse - 1  # one rollout feeds `reuse` steps
    # every step: 1 teacher call + 1 student call; rollout calls only when the queue ran dry
    assert sum(c == 2 for c in calls) == len(calls) - 4
    if reuse == 1:
        assert all(c > 2 for c in calls)


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl"])
def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path, tiny_folders, name):
    trainer = Trainer(make_config(tiny_folders[name], tmp_path, lr=1e-2), progress=False)
    sample = trainer.next_sample()
    trainer.queue.insert(0, sample)
    with torch.no_grad():
        before = trainer.loss(sample).item()
    for _ in range(8):
        trainer.queue.insert(0, sample)
        trainer.train_step()
    with torch.no_grad():
        after = trainer.loss(sample).item()
    assert after < 0.7 * before, (before, after)


def test_multiplier_zero_reproduces_the_original_unet(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path), progress=False)
    for _ in range(3):
        trainer.train_step()
    sample = trainer.next_sample()
    prompt = trainer.prompts[sample.prompt]
    cond = trainer.conditioning(prompt.target, prompt, sample.size, sample.crop)
    with torch.no_grad(), trainer.network.strength(0.0):
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


def test_resumed_run_ends_with_the_same_lora_as_an_uninterrupted_one(tmp_path, tiny_folders):
    whole = train(make_config(tiny_folders["sd1"], tmp_path / "whole", iterations=8), progress=False)
    first = train(make_config(tiny_folders["sd1"], tmp_path / "split", iterations=5), progress=False)
    resumed = train(
        make_config(tiny_folders["sd1"], tmp_path / "split", iterations=8), resume=first.state, progress=False
    )
    assert resumed.steps == 8
    a, b = lora_tensors(whole.path), lora_tensors(resumed.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_state_of_another_run(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path, iterations=2), progress=False)
    other = make_config(tiny_folders["sd1"], tmp_path, iterations=4)
    other.network.rank = 8
    with pytest.raises(LecoError, match="different `network` section"):
        train(other, resume=first.state, progress=False)


def test_nan_loss_stops_with_a_message_naming_the_step(tmp_path, tiny_folders, monkeypatch):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path), progress=False)
    trainer.train_step()
    monkeypatch.setattr(trainer, "loss", lambda sample: torch.tensor(float("nan")))
    with pytest.raises(LecoError, match=r"step 2: the loss became nan; use train.precision: bf16 or fp32"):
        trainer.train_step()


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "lion", "prodigy", "sgd"])
@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "cosine_with_restarts", "step"])
def test_optimizers_and_schedules_train(tmp_path, tiny_folders, optimizer, scheduler):
    config = make_config(
        tiny_folders["sd1"], tmp_path, iterations=2, optimizer=optimizer, lr_scheduler=scheduler
    )
    trainer = Trainer(config, progress=False)
    start = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.train_step()
    trainer.train_step()
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.network.parameters(), strict=True))


def test_missing_optional_optimizer_names_the_package(tmp_path, tiny_folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(LecoError, match="adamw8bit needs the bitsandbytes package"):
        Trainer(make_config(tiny_folders["sd1"], tmp_path, optimizer="adamw8bit"), progress=False)


def test_lora_weights_stay_fp32_under_bf16(tmp_path, tiny_folders):
    trainer = Trainer(make_config(tiny_folders["sd1"], tmp_path, precision="bf16"), progress=False)
    assert next(trainer.unet.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in trainer.network.parameters()} == {torch.float32}
    loss = trainer.train_step()
    assert loss == loss  # finite under bf16 autocast
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())


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
    assert line.startswith(f"leco: error: {tmp_path / 'c.yaml'}: train.guidance: unknown key; did you mean")
    assert "'rollout_guidance_scale'" in line


def test_ctrl_c_saves_a_loadable_file_and_resume_finishes_the_same_run(tmp_path, tiny_folders):
    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=400)
    process = subprocess.Popen(
        [sys.executable, "-m", "leco", "train", str(config), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "out" / "fox_2steps.safetensors").exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
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
    assert all(torch.equal(a[k], b[k]) for k in a)


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
        trainer.train_step()
        updates.append([p.detach().clone() for p in trainer.network.parameters()])
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

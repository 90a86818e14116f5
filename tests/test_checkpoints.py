"""Run folders: outputs checked before training, one run per name at a time, nothing silently lost."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_trainer import make_config, stop_a_cli_run

from leco import train
from leco.checkpoints import RunFolder, StopRequest, read_state
from leco.errors import LecoError, Terminated
from leco.network import read_lora_file
from leco.trainer import Trainer


def test_a_save_path_under_a_file_fails_before_the_model_loads(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    config = make_config(tmp_path / "no-such-model", tmp_path / "taken" / "out")
    with pytest.raises(LecoError, match=r"save.path: .*taken is a file, not a folder"):
        Trainer(config, progress=False)  # the model path does not exist: the folder was checked first


def test_a_file_where_the_state_goes_or_a_path_that_cannot_be_made_fails_before_the_model_loads(tmp_path):
    config = make_config(tmp_path / "no-such-model", tmp_path / "out")
    (tmp_path / "out").mkdir()
    mine = tmp_path / "out" / f"{config.save.name}_state"
    mine.write_text("the user's notes")  # the run would find it only at its first save, minutes later
    with pytest.raises(LecoError, match=r"save.path: .*_state is a file, where the run keeps its resumable"):
        Trainer(config, progress=False)
    with pytest.raises(LecoError, match=r"_state is a file"):
        Trainer(config, progress=False, overwrite=True)  # not leco's to replace
    assert mine.read_text() == "the user's notes"
    too_long = make_config(tmp_path / "no-such-model", tmp_path / ("d" * 300))
    with pytest.raises(LecoError, match=r"^save.path: .*d{300} cannot be made \(File name too long\)"):
        Trainer(too_long, progress=False)


def test_a_file_where_the_previews_go_fails_before_the_model_loads(tmp_path):
    (tmp_path / "previews").write_text("not a folder")
    config = make_config(tmp_path / "no-such-model", tmp_path)
    config.preview.prompts = ["a fox"]
    with pytest.raises(
        LecoError, match=r"save.path: .*previews is a file, but the preview grids go into a folder"
    ):
        Trainer(config, progress=False)
    config.preview.prompts = []  # no previews: the file is none of leco's business
    with pytest.raises(LecoError, match="no-such-model"):
        Trainer(config, progress=False)


def test_a_fresh_run_does_not_replace_an_earlier_one(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path, iterations=5), progress=False)
    before = first.path.read_bytes()
    with pytest.raises(LecoError) as caught:
        train(make_config(tiny_folders["sd1"], tmp_path, iterations=2), progress=False)
    message = str(caught.value)
    assert "already holds the run 'fox'" in message and "--resume" in message and "--overwrite" in message
    assert "\n" not in message and first.path.read_bytes() == before


def test_preview_grids_of_the_name_count_as_an_earlier_run(tmp_path):
    (tmp_path / "previews").mkdir()
    grid = tmp_path / "previews" / "fox_last.png"
    grid.write_bytes(b"a grid the user kept")
    (tmp_path / "previews" / "wolf_last.png").write_bytes(b"another name's: no concern")
    with pytest.raises(LecoError, match=r"already holds the run 'fox' \(fox_last.png\)") as caught:
        RunFolder(tmp_path, "fox").check(overwrite=False, previews=True)
    assert "--resume" not in str(caught.value)  # no state folder: nothing to continue, only to replace
    RunFolder(tmp_path, "wolf2").check(overwrite=False, previews=True)
    folder = RunFolder(tmp_path, "fox")
    folder.open(overwrite=True)  # --overwrite: the grid goes with the run it showed, at the first save
    try:
        assert grid.read_bytes() == b"a grid the user kept"
        folder.clear_replaced()
        assert not grid.exists() and (tmp_path / "previews" / "wolf_last.png").exists()
    finally:
        folder.close()


def test_overwrite_replaces_the_earlier_run_and_its_stale_step_files(tmp_path, tiny_folders):
    train(make_config(tiny_folders["sd1"], tmp_path, iterations=9), progress=False)  # writes 4 and 8 steps
    assert (tmp_path / "fox_8steps.safetensors").exists()
    second = train(make_config(tiny_folders["sd1"], tmp_path, iterations=5), overwrite=True, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["fox_4steps.safetensors", "fox_last.safetensors", "fox_state"]
    assert read_lora_file(second.path)[1]["leco.step"] == "5"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_overwrite_refuses_before_training_when_the_state_folder_holds_the_users_things(
    tmp_path, tiny_folders, kind
):
    train(make_config(tiny_folders["sd1"], tmp_path, iterations=2), progress=False)
    notes = tmp_path / "fox_state" / "notes"
    notes.mkdir() if kind == "folder" else notes.write_text("lr 1e-3 looked best")
    (tmp_path / "fox_state" / ".DS_Store").write_bytes(b"\0")  # a file manager's: not named
    with pytest.raises(
        LecoError, match=r"^--overwrite: .*fox_state also holds notes, which leco did not write"
    ):
        Trainer(make_config(tiny_folders["sd1"], tmp_path, iterations=3), overwrite=True, progress=False)
    assert notes.exists() and (tmp_path / "fox_last.safetensors").is_file()


def test_overwrite_never_deletes_a_lora_of_the_runs_name_that_leco_did_not_write(tmp_path, tiny_folders):
    """Another tool's file (or any file) under a run's file name is not the run: --overwrite stops."""
    mine = tmp_path / "fox_last.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(mine), {"ss_network_dim": "1"})
    with pytest.raises(
        LecoError, match=r"^--overwrite: .*fox_last.safetensors has this run's name but leco did not write it"
    ):
        Trainer(make_config(tiny_folders["sd1"], tmp_path, iterations=2), overwrite=True, progress=False)
    assert mine.read_bytes() and not (tmp_path / "fox_state").exists()


def test_overwrite_of_a_state_folder_that_is_a_link_keeps_the_folder_it_points_to(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path / "elsewhere", iterations=2), progress=False)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "fox_state").symlink_to(first.state)
    (tmp_path / "run" / "fox_last.safetensors").write_bytes(first.path.read_bytes())
    config = make_config(tiny_folders["sd1"], tmp_path / "run", iterations=3)
    result = train(config, overwrite=True, progress=False)
    assert result.steps == 3 and (tmp_path / "run" / "fox_state" / "training_state.pt").is_file()
    assert first.state.is_dir()  # emptied of the old state, not removed


def test_overwrite_leaves_the_earlier_run_whole_when_the_new_one_fails_before_its_first_save(
    tmp_path, tiny_folders, monkeypatch
):
    train(make_config(tiny_folders["sd1"], tmp_path, iterations=9), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}

    def crash(self):
        raise RuntimeError("the new run dies at its first step")

    monkeypatch.setattr(Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="dies at its first step"):
        train(make_config(tiny_folders["sd1"], tmp_path, iterations=5), overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == before
    assert (tmp_path / "fox_state" / "training_state.pt").is_file()


def test_a_second_run_of_the_same_name_is_refused_while_the_first_trains(tmp_path):
    first = RunFolder(tmp_path, "fox")
    first.open(overwrite=False)
    try:
        with pytest.raises(LecoError, match=r"another `leco train` \(pid \d+\) is writing the run 'fox'"):
            RunFolder(tmp_path, "fox").open(overwrite=False)
        other = RunFolder(tmp_path, "other")
        other.open(overwrite=False)  # other names are free
        other.close()
    finally:
        first.close()
    again = RunFolder(tmp_path, "fox")
    again.open(overwrite=False)  # released when the first run ends
    again.close()
    assert not list(tmp_path.glob(".*lock"))


def test_a_run_writing_its_state_now_is_named_before_resume_or_overwrite_is_suggested(tmp_path):
    first = RunFolder(tmp_path, "fox")
    first.open(overwrite=False)
    try:
        first.write_state({"step": 1})  # the run has saved once: its name is taken twice over
        for options in (
            {"overwrite": False},
            {"overwrite": True},
            {"overwrite": False, "resume_source": first.state_dir},
        ):
            with pytest.raises(LecoError, match=r"another `leco train` \(pid \d+\) is writing the run 'fox'"):
                RunFolder(tmp_path, "fox").check(**options)
        assert (tmp_path / ".fox.lock").is_file()  # the check leaves the running run's lock as it was
    finally:
        first.close()
    with pytest.raises(LecoError, match=r"already holds the run 'fox'.*--resume"):
        RunFolder(tmp_path, "fox").check(overwrite=False)


@pytest.mark.parametrize("damage", ["optimizer", "ranks", "step", "sampling"])
def test_a_damaged_state_is_one_line_naming_it(tmp_path, tiny_folders, damage):
    first = train(make_config(tiny_folders["sd1"], tmp_path, iterations=4), progress=False)
    file = first.state / "training_state.pt"
    state = torch.load(file, weights_only=True)
    if damage == "sampling":
        state["ranks"][0] = {"edited": 1}  # of the right kind, but not what the run saved
    else:
        del state[damage]
    torch.save(state, file)
    says = "optimizer or sampling state cannot be read" if damage == "sampling" else f"lacks its {damage}"
    with pytest.raises(LecoError, match=rf"--resume: .*{says}.*start the run again with --overwrite"):
        train(make_config(tiny_folders["sd1"], tmp_path, iterations=6), resume=first.state, progress=False)


def test_temp_files_of_a_killed_save_are_cleared_when_the_run_continues(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path, iterations=4), progress=False)
    left = [tmp_path / ".fox_8steps.safetensors.x1y2.tmp", first.state / ".training_state.pt.a1.tmp"]
    # a run whose name starts with this one's, saving in the same folder now: its temp files stay
    others = [tmp_path / ".fox_v2_last.safetensors.k3j4.tmp", tmp_path / ".fox_v2_8steps.safetensors.q1.tmp"]
    for path in left + others:
        path.write_bytes(b"half a file")
    train(make_config(tiny_folders["sd1"], tmp_path, iterations=6), resume=first.state, progress=False)
    assert not any(path.exists() for path in left) and all(path.exists() for path in others)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the ssh session gone
def test_sigterm_and_a_hang_up_save_an_interrupted_file_like_ctrl_c(tmp_path, tiny_folders, stop_signal):
    spaced = tmp_path / "my runs"  # the resume hint must paste as one argument per path
    spaced.mkdir()
    process, out, err = stop_a_cli_run(spaced, tiny_folders["sd1"], stop_signal, "--set", "train.seed=5")
    assert process.returncode == 128 + stop_signal, err  # the shell's code for that signal: 143, 129
    assert "Traceback" not in err
    assert f"{stop_signal.name} again aborts without saving" in err  # stdout stays the results
    assert "preview grid" not in err  # none was asked for: none was skipped
    _, metadata = read_lora_file(spaced / "out" / "fox_interrupted.safetensors")
    assert 2 <= int(metadata["leco.step"]) < 400
    hint = next(line for line in out.splitlines() if line.startswith("continue with: "))
    words = shlex.split(hint.removeprefix("continue with: "))
    assert words[:2] == ["leco", "train"] and Path(words[2]).is_file() and Path(words[-1]).is_dir(), words
    assert words[3:5] == ["--set", "train.seed=5"] and metadata["leco.seed"] == "5"  # resumed the same


def test_previews_are_rendered_again_when_a_run_is_resumed(tmp_path, tiny_folders):
    def config(iterations):
        config = make_config(tiny_folders["sd1"], tmp_path, iterations=iterations)
        config.preview.prompts, config.preview.steps = ["a red fox"], 2
        return config

    first = train(config(4), progress=False)
    (tmp_path / "previews" / "fox_last.png").unlink()
    train(config(9), resume=first.state, progress=False)
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["fox_8steps.png", "fox_last.png"]


def test_previews_sample_as_the_model_recommends_where_the_config_says_nothing(
    tmp_path, tiny_folders, monkeypatch
):
    model = tmp_path / "model"
    shutil.copytree(tiny_folders["sd1"], model)
    (model / "README.md").write_text("---\ninference:\n  parameters:\n    num_inference_steps: 3\n"
                                     "    guidance_scale: 2.5\n---\n# a model\n")  # fmt: skip
    drawn = []
    monkeypatch.setattr("leco.trainer.render_preview", lambda *args: drawn.append(args[-1]))
    config = make_config(model, tmp_path / "a", iterations=1)
    config.preview.prompts = ["a red fox"]
    train(config, progress=False)
    config.preview.steps, config.save.path = 2, str(tmp_path / "b")  # what is set wins
    train(config, progress=False)
    config.prompts = [config.prompts[0].model_copy(update={"action": "distill", "guidance_scale": 3.0})]
    config.preview.steps, config.save.path = None, str(tmp_path / "c")  # a distilled LoRA works at 1
    train(config, progress=False)
    assert drawn == [(3, 2.5), (2, 2.5), (3, 1.0)]


def test_resume_past_train_iterations_or_from_no_state_is_one_line(tmp_path, tiny_folders, monkeypatch):
    first = train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=5), progress=False)
    with monkeypatch.context() as patched:  # named before minutes of model loading, not after
        patched.setattr("leco.trainer.load_models", lambda *a, **k: pytest.fail("models loaded first"))
        with pytest.raises(LecoError, match=r"train.iterations: 3, but the run in .* is already at step 5"):
            train(make_config(tiny_folders["sd1"], tmp_path / "b", iterations=3), resume=first.state)
    files = {path: path.stat().st_mtime_ns for path in (tmp_path / "a").rglob("*")}
    with pytest.raises(LecoError, match=r"train.iterations: 5, but the run in .* is finished .*above 5"):
        train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=5), resume=first.state)
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "a").rglob("*")} == files  # none rewritten
    backup = tmp_path / "backup.pt"  # a copy of a state under another name resumes as the state does
    backup.write_bytes((first.state / "training_state.pt").read_bytes())
    assert train(make_config(tiny_folders["sd1"], tmp_path / "c", iterations=6), resume=backup).steps == 6
    not_a_state = tmp_path / "config.yaml"
    not_a_state.write_text("train: {}\n")
    for path in (not_a_state, tmp_path / "a"):  # a config file; the run's folder, not its *_state folder
        with pytest.raises(
            LecoError, match=r"--resume: .* holds no training_state.pt; pass the \*_state"
        ) as e:
            train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=8), resume=path)
    assert str(e.value).endswith(f"(here: {first.state})")  # the run's folder: its state is named
    run_seed = torch.load(first.state / "training_state.pt", weights_only=True)["seed"]
    other_seed = make_config(tiny_folders["sd1"], tmp_path / "a", iterations=8)
    other_seed.train.seed = run_seed + 1  # the state continues its own streams: refused, not ignored
    with pytest.raises(LecoError, match=rf"train.seed: {run_seed + 1}, but .* is a run of seed {run_seed}"):
        train(other_seed, resume=first.state)
    with pytest.raises(LecoError, match=r"--resume: .*nowhere_state not found; pass the \*_state"):
        train(make_config(tiny_folders["sd1"], tmp_path / "a"), resume=tmp_path / "nowhere_state")


def test_previews_at_a_size_diffusers_refuses_are_drawn_at_the_next_multiple_of_8(
    tmp_path, tiny_folders, capsys
):
    from PIL import Image

    config = make_config(tiny_folders["sd1"], tmp_path, iterations=4)
    config.train.resolution = 12  # a multiple of the tiny model's latent grid (4), not of 8
    config.preview.prompts, config.preview.steps, config.preview.strengths = ["a red fox"], 2, [0]
    train(config, progress=False)
    assert "preview: drawn at 16x16, the training resolution 12x12 rounded up" in capsys.readouterr().err
    grid = Image.open(tmp_path / "previews" / "fox_last.png")
    assert grid.height >= 16  # the preview was drawn, not the run lost to a refusal at the first one


def test_a_resumed_run_trains_on_with_the_new_lr(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=4), progress=False)
    config = make_config(tiny_folders["sd1"], tmp_path / "b", iterations=8)
    saved_lr = config.train.lr
    config.train.lr = saved_lr / 10
    trainer = Trainer(config, progress=False, resume=first.state)
    (group,) = trainer.updates.optimizer.param_groups
    assert group["initial_lr"] == saved_lr / 10 and trainer.updates.lr == pytest.approx(saved_lr / 10)
    assert trainer.updates.optimizer.state  # the moments of the first run are kept
    unchanged = make_config(tiny_folders["sd1"], tmp_path / "c", iterations=8)
    (group,) = Trainer(unchanged, progress=False, resume=first.state).updates.optimizer.param_groups
    assert group["lr"] == saved_lr


@pytest.mark.filterwarnings(
    "ignore:Detected call of `lr_scheduler.step\\(\\)` before"
)  # the fresh curve, stepped bare
@pytest.mark.parametrize("schedule", ["cosine", "linear", "polynomial"])
def test_a_resumed_run_with_more_iterations_takes_its_lr_from_the_longer_curve(
    tmp_path, tiny_folders, schedule
):
    """The documented way to go on with a finished run: the first new step's lr is the longer run's
    at that step, not the end of the shorter curve (cosine's 0)."""
    settings = {"lr_scheduler": schedule, "lr_warmup_steps": 1}
    first = train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=4, **settings), progress=False)
    longer = make_config(tiny_folders["sd1"], tmp_path / "b", iterations=12, **settings)
    resumed = Trainer(longer, progress=False, resume=first.state).updates
    fresh = Trainer(
        make_config(tiny_folders["sd1"], tmp_path / "c", iterations=12, **settings), progress=False
    )
    for _ in range(4):  # the same curve, stepped as far
        fresh.updates.lr_scheduler.step()
    assert resumed.lr == fresh.updates.lr > 0
    assert resumed.optimizer.param_groups[0]["lr"] == fresh.updates.optimizer.param_groups[0]["lr"]


def test_a_resumed_step_schedule_follows_the_new_iterations(tmp_path, tiny_folders):
    first = make_config(tiny_folders["sd1"], tmp_path / "a", iterations=4, lr_scheduler="step")
    state = train(first, progress=False).state
    longer = make_config(tiny_folders["sd1"], tmp_path / "b", iterations=40, lr_scheduler="step")
    schedule = Trainer(longer, progress=False, resume=state).updates.lr_scheduler
    assert schedule.step_size == 10 and schedule.last_epoch == 4  # its position kept, its shape the config's
    slightly_longer = make_config(tiny_folders["sd1"], tmp_path / "a", iterations=7, lr_scheduler="step")
    assert Trainer(slightly_longer, progress=False, resume=state).updates.lr_scheduler.step_size == 1


def test_a_file_trained_in_parts_records_what_each_resume_changed(tmp_path, tiny_folders):
    import json

    first = train(make_config(tiny_folders["sd1"], tmp_path, iterations=2), progress=False)
    assert "leco.resumes" not in read_lora_file(first.path)[1]
    second = train(make_config(tiny_folders["sd1"], tmp_path, iterations=4, lr=1e-3), resume=first.state)
    third = train(make_config(tiny_folders["sd1"], tmp_path, iterations=5, lr=1e-3), resume=second.state)
    resumes = json.loads(read_lora_file(third.path)[1]["leco.resumes"])
    assert resumes == [
        {"step": 2, "changed": {"train.iterations": [2, 4], "train.lr": [3e-3, 1e-3]}},
        {"step": 4, "changed": {"train.iterations": [4, 5]}},
    ]
    assert json.loads(read_lora_file(third.path)[1]["leco.config"])["train"]["lr"] == 1e-3


def test_resume_allows_settings_of_where_weights_are_read_but_not_of_what_is_trained(tmp_path, tiny_folders):
    state = train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=2), progress=False).state
    config = make_config(tiny_folders["sd1"], tmp_path / "b", iterations=4)
    config.pretrained_model.allow_pickle = True  # as teacher.offload: where and how weights are read
    assert read_state(state, config.to_json())["step"] == 2
    config.network.rank = 4
    with pytest.raises(
        LecoError, match=r"trained with a different `network` section \(network.rank: 2 then, 4 now\)"
    ):
        read_state(state, config.to_json())
    config.network.rank = 2
    config.prompts[0].target = "a blue fox"  # e.g. resumed without the --prompts_file it was started with
    with pytest.raises(LecoError, match=r"`prompts` section .* started the run \(and the --prompts_file it"):
        read_state(state, config.to_json())


def test_a_model_moved_to_another_folder_resumes_but_another_model_does_not(tmp_path, tiny_folders, capsys):
    original = tmp_path / "disk1" / Path(tiny_folders["sd1"]).name
    shutil.copytree(tiny_folders["sd1"], original)
    state = train(make_config(original, tmp_path / "a", iterations=2), progress=False).state
    moved = tmp_path / "disk2" / original.name
    moved.parent.mkdir()
    original.rename(moved)
    config = make_config(moved, tmp_path / "b", iterations=4)
    config.pretrained_model.allow_pickle = True  # a free key changed with it
    assert read_state(state, config.to_json())["step"] == 2
    assert f"taking {moved} as the same model moved" in capsys.readouterr().err
    renamed = tmp_path / "other-model"
    shutil.copytree(tiny_folders["sd1"], renamed)
    with pytest.raises(LecoError, match=r"trained with a different `pretrained_model` section"):
        read_state(state, make_config(renamed, tmp_path / "c", iterations=4).to_json())
    config = make_config(moved, tmp_path / "d", iterations=4)
    config.pretrained_model.clip_skip = 2  # moved, and read otherwise: not the same training
    with pytest.raises(LecoError, match=r"trained with a different `pretrained_model` section"):
        read_state(state, config.to_json())
    shutil.copytree(tiny_folders["sd1"], original)  # a model at the first path again
    shutil.copytree(tiny_folders["sd1"], tmp_path / "disk3" / original.name)
    with pytest.raises(LecoError, match=r"trained with a different `pretrained_model` section"):
        # the first path still holds a model: one of that name elsewhere is another model
        read_state(
            state, make_config(tmp_path / "disk3" / moved.name, tmp_path / "e", iterations=4).to_json()
        )


def test_a_second_signal_during_a_save_aborts_after_the_save_not_inside_it(capsys):
    """Inside torch.save an abort leaves a traceback and the file and state at different steps."""
    written = []
    with StopRequest() as stop:
        stop._handle(signal.SIGINT, None)  # the first: stop after this step and save
        assert stop.requested
        with pytest.raises(KeyboardInterrupt), stop.saving():
            stop._handle(signal.SIGINT, None)  # the second, mid-save: waits for it
            written.append("file and state")
        assert written == ["file and state"]
        assert "aborting once the file being saved is written" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)  # outside a save: at once
    with StopRequest() as stop:  # a SIGTERM's abort keeps its own exit code (143), not Ctrl-C's
        stop._handle(signal.SIGTERM, None)
        with pytest.raises(Terminated) as raised, stop.saving():
            stop._handle(signal.SIGTERM, None)
        assert raised.value.signal_number == signal.SIGTERM
        with pytest.raises(Terminated):
            stop._handle(signal.SIGHUP, None)  # outside a save: at once


SECOND_SIGNAL_SCRIPT = """
import os, signal, sys, time
from leco.checkpoints import StopRequest
StopRequest.second_signal_ends_process = True  # as the leco command sets it
with StopRequest() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # the first: stop after this step
    while not stop.requested:
        time.sleep(0.01)
    print("asked", flush=True)
    sum(range(10**10))  # one long call in C, as a UNet step at 512 px is: no Python handler runs in it
"""


def test_a_second_signal_ends_the_run_at_once_even_inside_a_long_call():
    process = subprocess.Popen(
        [sys.executable, "-c", SECOND_SIGNAL_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "asked", process.communicate()
        time.sleep(0.5)  # inside the call
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)  # the call alone takes minutes
    finally:
        process.kill()
    assert process.returncode == -signal.SIGINT  # as the shell reports a Ctrl-C: 130


def test_a_second_signal_waits_for_a_save_and_for_data_parallel_peers(monkeypatch):
    from leco.cli import main

    main(["train", "--config_file", "missing.yaml"])  # the command sets it for its run alone
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:  # in Python (leco.train in a notebook): a KeyboardInterrupt to catch
        stop._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == stop._handle
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    monkeypatch.setattr(StopRequest, "second_signal_ends_process", True)  # the leco command
    with StopRequest() as stop:
        stop._handle(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # the next one ends the process
        with stop.saving():
            assert signal.getsignal(signal.SIGINT) == stop._handle  # not inside a save
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setenv("WORLD_SIZE", "2")  # processes of one run end together, through their launcher
    with StopRequest() as stop:
        stop._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == stop._handle
    assert signal.getsignal(signal.SIGINT) == before  # the caller's again


def test_resuming_with_another_optimizer_is_one_line(tmp_path, tiny_folders):
    first = train(make_config(tiny_folders["sd1"], tmp_path / "a", iterations=3), progress=False)
    config = make_config(tiny_folders["sd1"], tmp_path / "b", iterations=6)
    config.train.optimizer = "sgd"
    with pytest.raises(LecoError, match=r"^train.optimizer: sgd, but .* was trained with adamw; resume with"):
        train(config, resume=first.state)
    config = make_config(tiny_folders["sd1"], tmp_path / "c", iterations=6)
    config.train.optimizer_args = {"amsgrad": True}  # its state would lack the moments amsgrad needs
    with pytest.raises(
        LecoError, match=r"^train.optimizer_args: \{'amsgrad': True\}, but .* was trained with \{\}"
    ):
        train(config, resume=first.state)


def test_a_hang_up_that_nohup_ignores_stays_ignored(monkeypatch):
    import os

    from leco.checkpoints import StopRequest

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what `nohup leco train ...` sets
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stop.requested  # the run goes on after the terminal closes
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    monkeypatch.setattr("sys.stdout", None)  # output closed (1>&-): the hang-up still only asks to stop
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGHUP)
        assert stop.requested


@pytest.mark.parametrize(("keep", "left"), [(None, [1, 2, 3]), (0, [1, 2, 3]), (1, [3]), (2, [2, 3])])
def test_max_step_files_keeps_the_newest_and_zero_keeps_all(tmp_path, keep, left):
    folder = RunFolder(tmp_path, "fox")
    for step in (1, 2, 3):
        (tmp_path / f"fox_{step}steps.safetensors").write_bytes(b"x")
    (tmp_path / "fox_last.safetensors").write_bytes(b"x")
    folder.prune_step_files(keep)
    assert sorted(int(p.name[4:-17]) for p in tmp_path.glob("fox_*steps.safetensors")) == left
    assert (tmp_path / "fox_last.safetensors").exists()


def test_resume_keeps_the_stopped_weights_once_and_their_grid_beside_them(tmp_path):
    from safetensors.torch import save_file

    def saved(name: str, step: int) -> None:
        save_file(
            {"w": torch.full((1,), float(step))}, str(tmp_path / name), metadata={"leco.step": str(step)}
        )

    folder = RunFolder(tmp_path, "fox")
    saved("fox_4steps.safetensors", 4)  # per_steps 4 ...
    saved("fox_interrupted.safetensors", 4)  # ... and stopped right after step 4: the same weights
    (tmp_path / "previews").mkdir()
    (tmp_path / "previews" / "fox_interrupted.png").write_bytes(b"grid at 4")
    folder.keep_final_files(4)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["fox_4steps.safetensors"]
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["fox_4steps.png"]
    saved("fox_last.safetensors", 6)  # a finished run continued: its last file and grid become step 6's
    (tmp_path / "previews" / "fox_last.png").write_bytes(b"grid at 6")
    folder.keep_final_files(6)
    assert (tmp_path / "fox_6steps.safetensors").is_file() and not (
        tmp_path / "fox_last.safetensors"
    ).exists()
    assert (tmp_path / "previews" / "fox_6steps.png").read_bytes() == b"grid at 6"


def test_a_run_that_fails_before_training_leaves_no_folder_behind(tmp_path, tiny_folders):
    # the folder is made to prove it can be, then taken away: only a run that starts keeps it
    config = make_config(tmp_path / "no_model", tmp_path / "new" / "deeper")
    with pytest.raises(LecoError, match="pretrained_model.name_or_path"):
        train(config, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays, even empty
    config = make_config(tmp_path / "no_model", tmp_path / "kept")
    with pytest.raises(LecoError):
        train(config, progress=False)
    assert (tmp_path / "kept").is_dir()
    unwritable = make_config(tiny_folders["sd1"], tmp_path / "a_file" / "out")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(LecoError, match="is a file, not a folder"):
        train(unwritable, progress=False)


def test_a_run_whose_folder_is_deleted_locks_its_name_again_at_its_next_save(tmp_path):
    out = tmp_path / "out"
    running = RunFolder(out, "fox")
    running.open(overwrite=False)
    try:
        shutil.rmtree(out)  # the save makes the folder again; its lock file went with it
        assert RunFolder(out, "fox").check(overwrite=False) is None  # nothing stops a second run now
        running._lock_again_if_gone()  # what each save does first
        with pytest.raises(LecoError, match=r"another `leco train` \(pid \d+\) is writing the run 'fox'"):
            RunFolder(out, "fox").check(overwrite=True)
    finally:
        running.close()
    assert not (out / ".fox.lock").exists()
    # a second run started in the folder made again before the first one's next save: the first
    # stops there (one line) instead of writing over the second's files
    first = RunFolder(out, "fox")
    first.open(overwrite=False)
    shutil.rmtree(out)
    second = RunFolder(out, "fox")
    second.open(overwrite=False)
    try:
        with pytest.raises(LecoError, match=r"another `leco train` \(pid \d+\) is writing the run 'fox'"):
            first._lock_again_if_gone()
    finally:
        first.close()
        second.close()


def test_a_preview_that_cannot_be_written_is_a_warning_and_training_goes_on(
    tmp_path, tiny_folders, monkeypatch, capsys
):
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "previews" / "fox_last.png"))

    monkeypatch.setattr("leco.preview.save_image", read_only)
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=4)
    config.preview.prompts = ["a red fox"]
    assert train(config, progress=False).steps == 4
    assert (
        "fox_last.png not written (Read-only file system); the trained files are saved"
        in capsys.readouterr().err
    )


def overwritten_with_previews(folder, out: Path):
    """A run whose grids (every 2 steps) come before its first save (step 4)."""
    config = make_config(folder, out, iterations=5, max_denoising_steps=2)
    config.preview.prompts, config.preview.every, config.preview.steps = ["a fox"], 2, 2
    return config


def test_overwrite_keeps_the_grids_the_new_run_drew_before_its_first_save(tmp_path, tiny_folders):
    train(overwritten_with_previews(tiny_folders["sd1"], tmp_path), progress=False)
    grids = tmp_path / "previews"
    (grids / "fox_2steps.png").write_bytes(b"the earlier run's grid")
    train(overwritten_with_previews(tiny_folders["sd1"], tmp_path), overwrite=True, progress=False)
    assert sorted(p.name for p in grids.iterdir()) == ["fox_2steps.png", "fox_4steps.png", "fox_last.png"]
    assert (grids / "fox_2steps.png").read_bytes() != b"the earlier run's grid"  # drawn again, kept


def test_an_overwrite_run_that_fails_before_its_first_save_leaves_the_earlier_grids_whole(
    tmp_path, tiny_folders, monkeypatch
):
    def files() -> dict[Path, bytes]:
        return {
            path: path.read_bytes()
            for path in tmp_path.rglob("*")
            if path.is_file() and "logs" not in path.parts
        }

    train(overwritten_with_previews(tiny_folders["sd1"], tmp_path), progress=False)
    before = files()

    def disk_full(*args, **kwargs):
        raise LecoError("save.path: disk full")

    monkeypatch.setattr(RunFolder, "save", disk_full)  # its grid at step 2 is drawn, its save at 4 fails
    other = overwritten_with_previews(tiny_folders["sd1"], tmp_path)
    other.train.seed = 7  # another grid at step 2
    with pytest.raises(LecoError, match="disk full"):
        train(other, overwrite=True, progress=False)
    assert files() == before  # the earlier run's grid of step 2 included, and no temp file left


def test_a_stop_asked_for_does_not_wait_for_a_scheduled_grid(tmp_path, tiny_folders, monkeypatch):
    trainer = Trainer(overwritten_with_previews(tiny_folders["sd1"], tmp_path), progress=False)
    drawn = []
    monkeypatch.setattr(trainer, "render_preview", drawn.append)
    trainer.step = 2
    with StopRequest() as stop:
        trainer.save_if_due(stop)
        stop._handle(signal.SIGINT, None)
        trainer.step = 6
        trainer.save_if_due(stop)  # due, but the run is about to save and stop: its grid then
    assert drawn == ["2steps"]


def test_overwrite_takes_the_earlier_runs_tensorboard_curves_with_it(tmp_path, tiny_folders):
    train(make_config(tiny_folders["sd1"], tmp_path, iterations=4), progress=False)
    logs, named = tmp_path / "logs" / "fox", tmp_path / "runs"
    logs.mkdir(parents=True)
    named.mkdir()
    for folder in (logs, named):  # the default folder's, and one a config named itself
        (folder / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"the earlier run's curves")
    (logs / "notes.txt").write_text("the user's")
    train(make_config(tiny_folders["sd1"], tmp_path, iterations=4), overwrite=True, progress=False)
    assert sorted(p.name for p in logs.iterdir()) == ["notes.txt"] and len(list(named.iterdir())) == 1


def test_a_named_tensorboard_folder_gets_a_folder_per_run_which_overwrite_clears(tmp_path, tiny_folders):
    from leco.tracking import tensorboard_folder

    config = make_config(tiny_folders["sd1"], tmp_path, iterations=2)
    config.logging.tensorboard_dir = str(tmp_path / "tb")
    assert tensorboard_folder(config) == tmp_path / "tb" / "fox"  # TensorBoard draws a folder as one run
    train(config, progress=False)
    for run in ("fox", "other"):
        (tmp_path / "tb" / run).mkdir(parents=True, exist_ok=True)
        (tmp_path / "tb" / run / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"curves")
    train(config, overwrite=True, progress=False)
    assert (
        not list((tmp_path / "tb" / "fox").iterdir())
        and len(list((tmp_path / "tb" / "other").iterdir())) == 1
    )


@pytest.mark.parametrize(("stop_signal", "grid"), [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_terminated_run_saves_and_exits_without_its_grid(
    tmp_path, tiny_folders, monkeypatch, stop_signal, grid
):
    # A job scheduler's SIGTERM kills after a grace period: minutes of preview images would not fit
    # in it. Ctrl-C is a person at the terminal, who gets the grid and can press again to skip it.
    config = make_config(tiny_folders["sd1"], tmp_path, iterations=50, max_denoising_steps=2)
    config.preview.prompts, config.preview.steps = ["a fox"], 2
    trainer = Trainer(config, progress=False)
    step = trainer.train_step

    def step_then_signal() -> float:
        loss = step()
        if trainer.step == 2:
            os.kill(os.getpid(), stop_signal)
        return loss

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    result = trainer.run()
    assert result.interrupted and result.path.name == "fox_interrupted.safetensors" and result.path.is_file()
    assert (tmp_path / "previews" / "fox_interrupted.png").is_file() == grid

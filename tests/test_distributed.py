"""Data-parallel training on the CPU (gloo): 2 processes give one file, equal to a 2-sample-stream step."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from test_trainer import make_config, stop_a_cli_run, write_yaml_config

from leco.distributed import Ranks
from leco.errors import LecoError
from leco.launcher import child_processes
from leco.network import read_lora_file
from leco.trainer import Trainer

# One worker runs them in turn: two torchrun launches at once on 2 cores can collide (each takes a
# free port by binding and letting go of it) and a worker dies before training (CI saw it once).
pytestmark = pytest.mark.xdist_group("torchrun")

ITERATIONS = 4


def test_two_processes_write_one_file_equal_to_averaging_two_streams_in_one(tmp_path, tiny_folders):
    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=ITERATIONS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "leco", "train", str(config), "--no-progress", "--num-processes", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 4 steps") == 1, result.stdout  # only the main process reports
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "fox_2steps.safetensors",
        "fox_last.safetensors",
        "fox_state",
    ]
    state = torch.load(out / "fox_state" / "training_state.pt", weights_only=True)
    assert len(state["ranks"]) == 2  # each process's own random stream, for an exact resume
    distributed = read_lora_file(out / "fox_last.safetensors")[0]

    # The same global batch in one process: two trainers, the second on the stream of rank 1,
    # gradients averaged before each step of one optimizer.
    first = Trainer(make_config(tiny_folders["sd1"], tmp_path / "one", iterations=ITERATIONS), progress=False)
    second = Trainer(
        make_config(tiny_folders["sd1"], tmp_path / "two", iterations=ITERATIONS), progress=False
    )
    second.generator.manual_seed(second.seed + 1)
    steps = 0
    while steps < ITERATIONS:  # each block: the steps of one rollout, gradients from one forward
        blocks = [
            t.step_gradients(t.step_queue.next_steps(t.config.train.steps_per_forward))
            for t in (first, second)
        ]
        for (_, a), (_, b) in zip(*blocks, strict=True):
            first.updates.start([(x + y) / 2 for x, y in zip(a, b, strict=True)])
            first.updates.step()
            steps += 1
        with torch.no_grad():
            for mine, theirs in zip(second.trainable.parameters(), first.trainable.parameters(), strict=True):
                mine.copy_(theirs)
    assert steps == ITERATIONS
    single = first.trainable.state_dict()
    assert distributed.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(distributed[key].float(), single[key], rtol=1e-5, atol=1e-6)


# (a hang-up is passed on by the same code as SIGTERM; a single process is tested with all three)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_data_parallel_run_saves_once_without_a_traceback(tmp_path, tiny_folders, stop_signal):
    process, out, err = stop_a_cli_run(tmp_path, tiny_folders["sd1"], stop_signal, "--num-processes", "2")
    assert process.returncode == 128 + stop_signal, err
    assert "Traceback" not in err and "Error" not in err, err  # torchrun's, when it was signalled itself
    assert err.count("stopping after this step") == 1 and "continue with: leco train" in out, (out, err)
    assert "preview grid" not in err  # none was asked for: none was skipped
    assert "--num-processes 2" in out.splitlines()[-1]  # the resume needs as many processes
    _, metadata = read_lora_file(tmp_path / "out" / "fox_interrupted.safetensors")
    assert 2 <= int(metadata["leco.step"]) < 400
    state = torch.load(tmp_path / "out" / "fox_state" / "training_state.pt", weights_only=True)
    assert state["step"] == int(metadata["leco.step"]) and len(state["ranks"]) == 2


def test_ctrl_c_while_torchrun_starts_waits_for_the_processes_and_aborts_quietly(tmp_path, tiny_folders):
    # Passed on at once, the signal would land in torchrun's or a worker's imports: a traceback.
    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=400)
    command = [sys.executable, "-m", "leco", "train", str(config), "--no-progress", "--num-processes", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not child_processes(process.pid):  # torchrun has started; its own imports take seconds
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "FAILED" not in err and "exitcode" not in err, err
    # Stopped while loading (most runs): aborted; if the processes were already training: saved.
    aborted, saved = err.count("leco train: aborted"), err.count("stopping after this step")
    assert (aborted, saved) in ((1, 0), (0, 1)), (out, err)


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a number of processes"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 asks for data-parallel processes, which cannot meet"),
    ],
)
def test_a_stray_world_size_is_one_line(monkeypatch, environment, message):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LecoError, match=message):
        Ranks(torch.device("cpu"))


@pytest.mark.parametrize(
    ("environment", "main"),
    [
        ({}, True),
        ({"RANK": "1"}, True),
        ({"RANK": "1", "WORLD_SIZE": "1"}, True),
        ({"RANK": "1", "WORLD_SIZE": "2"}, False),
        ({"RANK": "0", "WORLD_SIZE": "2"}, True),
    ],
)
def test_a_stray_rank_alone_does_not_silence_the_one_process(monkeypatch, environment, main):
    from leco.errors import is_main_process

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert is_main_process() is main


def test_what_can_be_refused_before_loading_is_said_once_before_any_process_starts(
    tmp_path, tiny_folders, monkeypatch, capsys
):
    import leco.cli
    from leco.cli import main

    def launched(*args, **kwargs):
        raise AssertionError("processes were started")

    monkeypatch.setattr(leco.cli, "launch_processes", launched)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fox_last.safetensors").write_bytes(b"an earlier run")  # not to be replaced
    assert main(["train", str(config), "--num-processes", "2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "already holds the run 'fox'" in error[0]


def test_a_resume_another_process_count_saved_is_refused_once_before_any_process_starts(
    tmp_path, tiny_folders, monkeypatch, capsys
):
    import leco.cli
    from leco.cli import main

    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=2)
    assert main(["train", str(config), "--no-progress"]) == 0  # one process
    monkeypatch.setattr(leco.cli, "launch_processes", lambda *a, **k: pytest.fail("processes were started"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    capsys.readouterr()
    state = tmp_path / "out" / "fox_state"
    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=4)  # to train on from step 2
    assert main(["train", str(config), "--resume", str(state), "--num-processes", "2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "was saved by one process; resume with no --num-processes" in errors[0]


def test_a_bad_input_the_processes_find_after_loading_is_one_line_and_exit_2(tmp_path, tiny_folders):
    config = write_yaml_config(tmp_path, tiny_folders["sd1"], iterations=ITERATIONS)
    document = yaml.safe_load(config.read_text())
    document["pretrained_model"]["clip_skip"] = 40  # found once the text encoder is loaded
    config.write_text(yaml.safe_dump(document))
    result = subprocess.run(
        [sys.executable, "-m", "leco", "train", str(config), "--no-progress", "--num-processes", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr  # once, not torchrun's report too
    assert errors[0].startswith(f"leco train: error: {config}: pretrained_model.clip_skip: 40 skips past")
    assert result.stderr.strip().splitlines()[-1] == errors[0] and "Traceback" not in result.stderr


def test_a_later_process_does_not_take_the_first_ones_lock_for_another_run(
    tmp_path, tiny_folders, monkeypatch
):
    """The first process locks the run's name when it starts training; a second process still
    loading then must not read that lock as another run writing there (it writes nothing itself)."""
    from leco.checkpoints import RunFolder

    config = make_config(tiny_folders["sd1"], tmp_path / "out", iterations=ITERATIONS)
    first = RunFolder(config.save.path, config.save.name)
    first.open(overwrite=False)  # the first process, already training
    try:
        # as the first process it is refused: another run of the name is writing there
        with pytest.raises(LecoError, match="another `leco train` .* is writing the run"):
            Trainer(config, progress=False)
        monkeypatch.setattr(Ranks, "is_main", property(lambda self: False))
        Trainer(config, progress=False)  # as the second, it goes on to train beside the first
    finally:
        first.close()

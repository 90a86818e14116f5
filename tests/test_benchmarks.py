"""The GPU benchmark's code path runs on the CPU at a tiny size (the figures come from a GPU)."""

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _scripts_environment_undone(monkeypatch):
    # The scripts quiet the libraries through these at import; tests after one here must not inherit it
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)


def test_gpu_scale_smoke_prints_a_row_per_setting():
    result = subprocess.run(
        [sys.executable, "gpu_scale.py", "--smoke", "--steps", "1", "--families", "sdxl"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| sdxl")]
    assert (
        len(rows) == 2 * 3
    )  # checkpointing x (leco, 4 steps per forward, reference); SDXL: the most conditioning code
    for row in rows:
        seconds = float(row.split("|")[6])
        assert seconds > 0


def test_gpu_scale_runs_the_rows_the_readme_rests_on_first(monkeypatch):
    # A GPU call has minutes: a --budget-s cut must drop the least telling rows, never these.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_scale = runpy.run_path(str(BENCHMARKS / "gpu_scale.py"))
    families, schedules = list(gpu_scale["FAMILIES"]), list(gpu_scale["SCHEDULES"])
    assert schedules[::2] == ["leco default", "reference LECO"]
    rows = gpu_scale["rows_in_order"](families, ["fp16", "bf16"], schedules)
    assert len(rows) == len(set(rows)) == 3 * 2 * 2 * 3  # every row, once
    first = {
        *((family, "fp16", False, schedule) for family in families for schedule in schedules[::2]),
        ("sdxl", "fp16", True, "leco default"),  # the SDXL memory goal assumes checkpointing
    }
    assert set(rows[: len(first)]) == first
    last_fp16 = max(i for i, row in enumerate(rows) if row[1] == "fp16")
    assert all(row[1] == "bf16" for row in rows[last_fp16 + 1 :]) and len(rows) - last_fp16 - 1 == 18


@pytest.mark.parametrize("offloaded", [False, True])
def test_gpu_scale_transplant_rows_train_with_the_other_familys_unet_as_teacher(
    offloaded, monkeypatch, tmp_path
):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    gpu_scale = runpy.run_path(str(BENCHMARKS / "gpu_scale.py"))
    built, build, teacher_calls = [], gpu_scale["build"], []

    def build_and_watch(family, *args):
        models = build(family, *args)
        if family == "sd2.1-v":
            models.unet.register_forward_hook(lambda *_: teacher_calls.append(1))
        built.append(family)
        return models

    # runpy hands back a copy of the script's globals: measure() looks `build` up in its own
    monkeypatch.setitem(gpu_scale["measure"].__globals__, "build", build_and_watch)
    schedule = "offloaded" if offloaded else "on the GPU"
    args = argparse.Namespace(smoke=True, steps=1, compile=False)
    row = gpu_scale["measure"]("sd1.5", "fp16", False, schedule, args, str(tmp_path))
    assert built == ["sd1.5", "sd2.1-v"] and row["seconds_per_step"] > 0
    assert teacher_calls  # the SD2.1-v UNet predicted for the student's concept


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["slider_leak.py", "--recipes", "anchors,nope"], "--recipes: nope not known; choose from default,"),
        (["rollout_reuse.py", "--reuse", "1,0"], "--reuse: 0 must be 1 or more"),
        (["slider_closed_form.py", "--settings", "2:eos,bogus"], "--settings: 'bogus' is not PUSH:START"),
        (["distill.py", "--images", "0"], "argument --images: 0 must be 1 or more"),
        (["slider_leak.py", "--slider", "3,green,purple"], "--slider: give a digit and two of the inks"),
        (["slider_padding.py", "--steps", "0"], "argument --steps: 0 must be 1 or more"),
        (["specificity.py", "--seeds", "0,-1"], "--seeds: '0,-1': seeds are 0 or more"),  # -1: drawn
        (["gpu_scale.py", "--families", "sd1.5,bogus"], "--families: bogus not known; choose from sd1.5"),
        (["gpu_scale.py", "--schedules", "default,nope"], "--schedules: nope not known; choose from default"),
        (["gpu_scale.py", "--budget-s", "-5"], "--budget-s: -5 must be a finite number of seconds"),
        (["gpu_scale.py", "--budget-s", "nan"], "--budget-s: nan must be a finite number of seconds"),
        (["gpu_scale.py", "--checkpointing", "maybe"], "--checkpointing: maybe not known; choose from no"),
        (["gpu_scale.py", "--transplant", "--families", "sdxl"], "--transplant: a student of sd1.5, sd2.1-v"),
        (["step_speed.py", "--reuse", "x"], "--reuse: 'x' is not a whole number"),  # before the timing
        (["time_to_erase.py", "--skip-scaling", "--only-scaling"], "not allowed with argument"),
        (["rollout_reuse.py", "--example", "nope"], "--example: "),
    ],
)
def test_a_benchmark_refuses_a_bad_flag_in_one_line_before_any_work(command, expected, monkeypatch, capsys):
    # In this process (a fresh interpreter per script spent seconds importing torch each)
    monkeypatch.chdir(BENCHMARKS)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", command)
    before = _leco_functions()
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARKS / command[0]), run_name="__main__")
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert stop.value.code == 2 and expected in lines[-1], err
    assert out == ""  # stopped before the first table line
    # A script imported into this process leaves leco as it was: the tests after it use leco too
    assert {name: f for name, f in _leco_functions().items() if name in before} == before


def _leco_functions() -> dict[str, object]:
    return {
        f"{module.__name__}.{name}": value
        for module in list(sys.modules.values())
        if module is not None and module.__name__.startswith("leco")
        for name, value in list(vars(module).items())
        if callable(value)
    }


def test_the_eval_specs_benchmarks_build_are_valid(monkeypatch):
    # Built after training: a spec the evaluator refuses would lose every run of a benchmark.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import specificity
    import transplant

    for task in transplant.TASKS:
        spec = transplant.eval_spec(task, images=1)
        assert (spec.erase or spec.enhance) and spec.keep_all
    spec = transplant.eval_spec("teal", images=1)
    assert {item.concept for item in spec.enhance} == {"ink:teal"} and all(i.end == 1 for i in spec.enhance)
    for task in specificity.TASKS.values():
        assert specificity.eval_spec(task, images=1).erase


def test_a_benchmark_stops_rather_than_judge_a_run_stopped_half_way(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import recipe_runs

    from leco.trainer import TrainResult

    stopped = TrainResult(Path("fox_interrupted.safetensors"), Path("fox_state"), 7, True, None)
    monkeypatch.setattr("leco.train", lambda config, **options: stopped)
    with pytest.raises(SystemExit, match="interrupted at step 7; the benchmark stops"):
        recipe_runs.train_fully({}, progress=False)
    finished = TrainResult(Path("fox_last.safetensors"), Path("fox_state"), 9, False, None)
    monkeypatch.setattr("leco.train", lambda config, **options: finished)
    assert recipe_runs.train_fully({}, progress=False) is finished

"""Other trainers' files (kohya train_leco TOML, ai-toolkit slider jobs, sliders prompts) run as leco."""

import json
import math
import os
import re
import string
import threading
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from leco import train
from leco.cli import main
from leco.config import ConfigError, LecoConfig, PromptSettings, TrainConfig, load_config, load_prompts
from leco.errors import LecoError
from leco.formats.origins import in_file_keys
from leco.models import load_models
from leco.network import read_lora_file
from leco.prompts import encode_texts, prepare_prompts

DATA = Path(__file__).resolve().parent / "data" / "formats"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ink-digits"


def fields(entry, *names):
    return tuple(getattr(entry, name) for name in names)


POLES = ("target", "positive", "unconditional", "neutral", "action", "multiplier")


def slider_rows(target, positive, negative, neutral, m):
    """kohya's four entries of a two-pole slider target, as POLES tuples."""
    return [
        (target, negative, positive, neutral, "erase", m),
        (target, positive, negative, neutral, "enhance", m),
        (target, positive, negative, neutral, "erase", -m),
        (target, negative, positive, neutral, "enhance", -m),
    ]


# -- kohya sd-scripts train_leco TOML -------------------------------------------------------------


def test_kohya_prompt_entries_take_the_file_defaults_and_their_own_keys():
    first, second, *slider = load_prompts(DATA / "kohya_prompts.toml")
    # Top-level guidance_scale / resolution / batch_size are defaults; kohya's own defaults fill the rest.
    assert fields(first, "target", "positive", "unconditional", "neutral", "action") == (
        "van gogh",
        "van gogh",
        "",
        "",
        "erase",
    )
    assert fields(first, "guidance_scale", "resolution", "batch_size", "multiplier", "weight") == (
        1.5,
        768,
        2,
        1.0,
        0.5,
    )
    assert fields(first, "dynamic_resolution", "dynamic_crops") == (False, False)
    assert fields(second, "positive", "unconditional", "neutral", "action") == (
        "a photo of a fluffy cat",
        "a photo",
        "a photo of an animal",
        "enhance",
    )
    assert fields(second, "guidance_scale", "resolution", "batch_size", "multiplier", "weight") == (
        3.0,
        (512, 768),
        2,
        -1.0,
        1.0,
    )
    assert fields(second, "dynamic_resolution", "dynamic_crops") == (True, True)
    # A slider target among [[prompts]]: positive pole only -> enhance at +m, erase at -m.
    assert [fields(e, *POLES) for e in slider] == [
        ("a person", "a smiling person", "", "a portrait", "enhance", 2.0),
        ("a person", "a smiling person", "", "a portrait", "erase", -2.0),
    ]
    assert {(e.guidance_scale, e.resolution, e.batch_size) for e in slider} == {(1.5, 768, 2)}


def test_kohya_sizes_and_batch_sizes_with_a_fraction_are_cut_as_kohya_reads_them(tmp_path):
    # kohya's PromptSettings takes int() of both (24.9 trains at 24); a text with a fraction it refuses
    (tmp_path / "p.toml").write_text(
        '[[prompts]]\ntarget = "a digit four"\nresolution = 24.9\nbatch_size = 1.5\n'
        '[[prompts]]\ntarget_class = "a digit two"\npositive = "red"\nresolutions = [[16.7, 16.2], 20.5]\n'
        "batch_size = 2.0\n"
    )
    entry, *slider = load_prompts(tmp_path / "p.toml")
    assert fields(entry, "resolution", "batch_size") == (24, 1)
    assert {fields(e, "resolution", "batch_size") for e in slider} == {(16, 2), (20, 2)}
    (tmp_path / "q.toml").write_text('[[prompts]]\ntarget = "a digit four"\nbatch_size = "1.5"\n')
    with pytest.raises(ConfigError, match=r"q.toml: prompts 1.batch_size"):
        load_prompts(tmp_path / "q.toml")


def test_kohya_slider_targets_expand_into_kohyas_entries_with_signs():
    entries = load_prompts(DATA / "kohya_slider.toml")
    rows = [fields(e, *POLES) for e in entries]
    girl = "1girl", "1girl, long hair", "1girl, short hair"
    # Both poles: four entries per file-level neutral ("" and "a photo"), +1.5 towards long hair.
    assert rows[:8] == slider_rows(*girl, "", 1.5) + slider_rows(*girl, "a photo", 1.5)
    assert {(e.weight, e.guidance_scale, e.resolution) for e in entries[:8]} == {(0.5, 2.0, 1024)}
    # Only the negative pole: two entries; the target's own neutral beats the file-level list.
    assert rows[8:10] == [
        ("a city", "a city at night", "", "a street", "erase", 1.0),
        ("a city", "a city at night", "", "a street", "enhance", -1.0),
    ]
    # Only the positive pole, per neutral line of its file (blank lines skipped) and per resolution.
    detail = [(e.neutral, e.resolution, e.action, e.multiplier) for e in entries[10:]]
    assert detail == [
        (neutral, size, action, m)
        for neutral in ("a landscape", "a room")
        for size in (512, (768, 512))
        for action, m in (("enhance", 1.0), ("erase", -1.0))
    ]
    assert {(e.target, e.positive, e.unconditional) for e in entries[10:]} == {("", "high detail", "")}
    assert len(entries) == 18


@pytest.mark.parametrize("name", ["kohya_prompts.toml", "kohya_slider.toml", "kohya_slider_table.toml"])
def test_kohya_tables_written_as_yaml_read_as_the_toml(tmp_path, name):
    # kohya's docs once showed its prompt files as YAML: the same tables give the same entries
    tables = tomllib.loads((DATA / name).read_text())
    for neutral_file in ("kohya_neutrals.txt", "kohya_more_neutrals.txt"):
        (tmp_path / neutral_file).write_text((DATA / neutral_file).read_text())
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(tables))
    assert load_prompts(path) == load_prompts(DATA / name)


@pytest.mark.parametrize("entry", ["{target: a cat, action: preserve}", "{target_file: cats.txt}"])
def test_leco_entries_under_a_prompts_key_say_how_leco_writes_its_own_file(tmp_path, entry):
    """A YAML prompts file with a top-level `prompts:` is read as kohya's tables; a leco-only action
    or key there says so, and how leco's own prompts file is written."""
    path = tmp_path / "prompts.yaml"
    path.write_text(f"prompts:\n  - {entry}\n")
    with pytest.raises(
        ConfigError,
        match=r"is read as kohya train_leco's tables; leco's own prompts file is a top-level list",
    ) as error:
        load_prompts(path)
    assert "\n" not in str(error.value)
    path.write_text(f"- {entry}\n")  # leco's form
    (tmp_path / "cats.txt").write_text("a cat\n")
    assert load_prompts(path)[0].targets == ["a cat"]


def test_kohya_file_level_neutral_lists_are_joined_in_order():
    entries = load_prompts(DATA / "kohya_slider_table.toml")  # targets inside [slider]
    neutrals = [e.neutral for e in entries[::4]]
    assert neutrals == ["a painting", "a landscape", "a room", "a dog"]  # neutrals, then both files
    assert [fields(e, *POLES) for e in entries[:4]] == slider_rows(
        "a cat", "a fat cat", "a thin cat", "a painting", 1.0
    )
    assert {e.resolution for e in entries} == {512}


def test_kohya_single_top_level_target_uses_the_per_target_precedence():
    entries = load_prompts(DATA / "kohya_single_target.toml")
    # neutrals beats neutral_prompt_file for a target's own lists (kohya joins them only file-wide).
    assert [fields(e, *POLES) for e in entries] == slider_rows(
        "a car", "a red car", "a blue car", "a road", 1.0
    )
    assert {e.resolution for e in entries} == {640}


def test_a_config_yaml_names_a_kohya_toml_as_its_prompts_file(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"prompts_file: {DATA / 'kohya_slider.toml'}\npretrained_model: {{name_or_path: some/model}}\n"
    )
    assert len(load_config(config).prompts) == 18


KOHYA_ERRORS = {
    "text_for_a_flag": (  # kohya's bool("false") is True: neither reading is safe
        '[[prompts]]\ntarget = "seven"\ndynamic_resolution = "false"\n',
        "prompts 1.dynamic_resolution: must be true or false (got 'false')",
    ),
    "empty": ("", "the file is empty"),
    "no_prompts_or_targets": ('guidance_scale = 2.0\nneutral = "x"\n', "no [[prompts]] or [[targets]]"),
    "empty_targets": ("targets = []\n", "targets: the list is empty"),
    "empty_prompts": ("prompts = []\n", "prompts: the list is empty"),
    "neither_pole": ('[[targets]]\ntarget_class = "cat"\nweight = 2.0\n', "targets 1: a slider target needs"),
    "same_poles": (
        '[[targets]]\ntarget_class = "a cat"\npositive = "Fat  cat"\nnegative = "fat cat"\n',
        "targets 1: positive and negative are the same prompt ('Fat  cat', as the model reads it)",
    ),
    "unknown_entry_key": ('[[prompts]]\ntarget = "cat"\nguidance = 3\n', "prompts 1.guidance: unknown key"),
    "unknown_target_key": (
        '[[targets]]\ntarget_class = "c"\npositive = "p"\nnegatve = "n"\n',
        "targets 1.negatve: unknown key in a slider target; did you mean 'negative'?",
    ),
    "unknown_target_keys_all_at_once": (
        '[[targets]]\ntarget_class = "c"\npositive = "p"\nnegatve = "n"\nwieght = 2\n',
        "targets 1.negatve (did you mean 'negative'?), targets 1.wieght (did you mean 'weight'?): unknown "
        "keys in a slider target",
    ),
    "targets_beside_prompts": (
        '[[prompts]]\ntarget = "a"\n[[targets]]\ntarget_class = "b"\npositive = "c"\n',
        "targets: kohya reads only [[prompts]] when a file has them",
    ),
    "bad_value": (
        '[[prompts]]\ntarget = "cat"\naction = "erse"\n',
        "prompts 1.action: 'erse' is not allowed; use erase or enhance",
    ),
    "leco_only_action": (
        'action = "distill"\n[[prompts]]\ntarget = "cat"\n',
        "prompts 1.action: 'distill' is not a kohya train_leco action (erase, enhance)",
    ),
    "zero_multiplier": (
        '[[prompts]]\ntarget = "cat"\nmultiplier = 0\n',
        "prompts 1.multiplier: must not be 0",
    ),
    "bad_resolution": ('[[prompts]]\ntarget = "cat"\nresolution = [512]\n', "prompts 1.resolution"),
    "infinite_resolution": (
        '[[prompts]]\ntarget = "cat"\nresolution = [16, inf]\n',
        "prompts 1.resolution: [16, inf] is not a size",
    ),
    "huge_resolution": (
        '[[targets]]\ntarget_class = "c"\npositive = "p"\nresolutions = [[1e30, 16]]\n',
        "resolution: must be at most 16384 pixels a side",
    ),
    "missing_neutral_file": (
        'neutral_prompt_file = "nope.txt"\n[[targets]]\ntarget_class = "c"\npositive = "p"\n',
        "nope.txt not found; paths are relative to the prompt file",
    ),
    # what is wrong with the file and its fix, as a leco target_file says
    "neutral_file_is_a_folder": (
        '[[targets]]\ntarget_class = "c"\npositive = "p"\nneutral_prompt_file = "folder"\n',
        "targets 1.neutral_prompt_file: {tmp}/folder is a folder; name the text file with one prompt a line",
    ),
    "neutral_file_in_utf16": (
        '[[targets]]\ntarget_class = "c"\npositive = "p"\nprompt_file = "wide.txt"\n',
        "wide.txt cannot be read as UTF-8 text: it is UTF-16; save it again as UTF-8",
    ),
    "invalid_toml": ("[[prompts]\n", "invalid TOML"),
    "neutral_file_is_the_toml": (
        'neutral_prompt_file = "prompts.toml"\n[[targets]]\ntarget_class = "c"\npositive = "p"\n',
        "prompts.toml is a toml file; name a text file with one prompt a line",
    ),
    "list_as_a_pole": (
        '[[targets]]\ntarget_class = ["a digit five", "a digit three"]\npositive = "red"\n',
        "targets 1.target_class: must be one prompt text (got ['a digit five', 'a digit three'])",
    ),
    "table_as_a_pole": (
        '[[targets]]\ntarget_class = "c"\npositive = "p"\nnegative = {ink = "blue"}\n',
        "targets 1.negative: must be one prompt text",
    ),
    "list_as_a_neutral": (
        '[[targets]]\ntarget_class = "c"\npositive = "p"\nneutral = ["x", "y"]\n',
        "targets 1.neutral: must be one prompt text",
    ),
    "boolean_in_neutrals": (
        'neutrals = ["", true]\n[[targets]]\ntarget_class = "c"\npositive = "p"\n',
        "neutrals[1]: must be one prompt text (got True)",
    ),
    "slider_in_prompts_with_a_list_neutral": (
        '[[prompts]]\ntarget_class = "c"\npositive = "p"\nneutral = ["x", "y"]\n',
        "prompts 1.neutral: must be one prompt text",
    ),
    "empty_neutral_file_name_of_a_top_level_target": (
        'target_class = "c"\npositive = "p"\nneutral_prompt_file = "  "\n',
        ": neutral_prompt_file: empty; name a text file",
    ),
    "empty_neutral_file_name": (
        'neutral_prompt_file = ""\n[[targets]]\ntarget_class = "c"\npositive = "p"\n',
        "neutral_prompt_file: empty; name a text file of prompts",
    ),
    "neutral_file_is_binary": (
        'neutral_prompt_file = "binary.txt"\n[[targets]]\ntarget_class = "c"\npositive = "p"\n',
        "binary.txt holds NUL bytes: UTF-16 or UTF-32 text, or not a text file",
    ),
}


@pytest.mark.parametrize("case", KOHYA_ERRORS, ids=str)
def test_kohya_errors_are_one_line_naming_the_file_and_key(tmp_path, case):
    text, expected = KOHYA_ERRORS[case]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "binary.txt").write_bytes(b"\x08\x00\x00\x00{}\x00\x00")
    (tmp_path / "folder").mkdir()
    (tmp_path / "wide.txt").write_text("a digit three\n", encoding="utf-16")  # with its byte-order mark
    path = tmp_path / "prompts.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_prompts(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected.replace("{tmp}", str(tmp_path)) in message


def test_kohya_targets_that_all_weigh_0_are_named_where_they_are_written(tmp_path, capsys):
    path = tmp_path / "prompts.toml"
    path.write_text('neutrals = []\n[[targets]]\ntarget_class = "c"\npositive = "p"\nweight = 0\n')
    config = LecoConfig.model_validate({"pretrained_model": {"name_or_path": "ink-digits"}})
    config.prompts = load_prompts(path)
    assert "prompts.toml: neutrals: an empty list; the neutral prompt is used" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"every entry has weight 0 \(.*prompts.toml: targets 1\), so the"):
        config.check_combination()


def test_kohya_empty_neutral_files_fall_back_to_neutral_and_a_bom_is_no_prompt(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bom.txt").write_bytes("\ufeffa photo\r\na room\r\n".encode())
    path = tmp_path / "prompts.toml"
    path.write_text(
        'neutral = "top"\nneutral_prompt_file = "empty.txt"\n'
        '[[targets]]\ntarget_class = "c"\npositive = "p"\n'
        '[[targets]]\ntarget_class = "d"\npositive = "q"\nneutral = "own"\nprompt_file = "empty.txt"\n'
        '[[targets]]\ntarget_class = "e"\npositive = "r"\nneutral_prompt_file = "bom.txt"\n'
    )
    entries = load_prompts(path)
    # kohya: an empty list falls back to the neutral the target would read (its own, else the file's)
    assert [(e.target, e.neutral) for e in entries[::2]] == [
        ("c", "top"),
        ("d", "own"),
        ("e", "a photo"),
        ("e", "a room"),
    ]
    assert capsys.readouterr().err.count("empty.txt holds no prompts; the neutral prompt is used") == 2


def test_kohya_reads_neutral_lists_only_in_targets_and_a_zero_pole_as_none(tmp_path, capsys):
    path = tmp_path / "prompts.toml"
    path.write_text(
        '[[prompts]]\ntarget_class = "a digit five"\npositive = "red"\nnegative = "blue"\nneutral = "z"\n'
        'neutrals = ["x", "y"]\n'
    )
    entries = load_prompts(path)
    # kohya's [[prompts]] slider item reads `neutral` alone: four entries, every one with "z"
    assert [fields(e, *POLES) for e in entries] == slider_rows("a digit five", "red", "blue", "z", 1.0)
    assert (
        "prompts 1.neutrals: kohya reads only `neutral` in a [[prompts]] slider item"
        in capsys.readouterr().err
    )
    # str(value or ""): a 0 pole is no pole (one-pole target: two entries), a 0 neutral is ""; the
    # class and the neutral lists keep the text "0"
    path.write_text('[[targets]]\ntarget_class = 0\npositive = "red"\nnegative = 0\nneutral = 0\n')
    entries = load_prompts(path)
    assert [fields(e, *POLES) for e in entries] == [
        ("0", "red", "", "", "enhance", 1.0),
        ("0", "red", "", "", "erase", -1.0),
    ]
    assert (
        'targets 1.negative: 0 is read as no prompt, as kohya reads it; write "0"' in capsys.readouterr().err
    )
    path.write_text('neutrals = [0]\n[[targets]]\ntarget_class = "c"\npositive = "p"\n')
    assert {e.neutral for e in load_prompts(path)} == {"0"}


def _refused_at_once(read, path) -> str:
    """read(path)'s ConfigError, failing (not hanging) if reading blocks on a FIFO."""
    outcome: list[str] = []

    def attempt() -> None:
        with pytest.raises(ConfigError) as error:
            read(path)
        outcome.append(str(error.value))

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert outcome, f"reading {path} blocked or did not refuse it"
    return outcome[0]


@pytest.mark.parametrize("key", ["neutral_prompt_file", "prompt_file"])
def test_a_kohya_neutral_file_that_is_a_fifo_is_refused_not_read(tmp_path, key):
    os.mkfifo(tmp_path / "fifo")  # reading one would wait for a writer for ever
    path = tmp_path / "prompts.toml"
    path.write_text(f'[[targets]]\ntarget_class = "c"\npositive = "p"\n{key} = "fifo"\n')
    message = _refused_at_once(load_prompts, path)
    assert f"targets 1.{key}:" in message and "is not a regular file" in message


def test_a_config_or_prompts_file_that_is_a_fifo_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert "is not a regular file" in _refused_at_once(load_config, tmp_path / "fifo")
    config = tmp_path / "config.yaml"
    config.write_text("pretrained_model: {name_or_path: ink-digits}\nprompts_file: fifo\n")
    assert "prompts_file: " in _refused_at_once(load_config, config)


KOHYA_KEYS = [
    "prompts",
    "targets",
    "slider",
    "target",
    "target_class",
    "positive",
    "negative",
    "neutral",
    "neutrals",
    "action",
    "resolution",
    "resolutions",
    "multiplier",
    "weight",
    "guidance_scale",
    "batch_size",
    "prompt_file",
]
scalars = st.booleans() | st.integers(-3, 2000) | st.floats(allow_nan=False) | st.text(max_size=8)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(KOHYA_KEYS) | st.text(string.ascii_letters, max_size=5), children, max_size=4
        )
    ),
    max_leaves=16,
)


def toml_value(value) -> str:
    """TOML for a value (inline tables and arrays), so any generated document is a valid file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(st.sampled_from(KOHYA_KEYS), documents, max_size=5))
def test_any_kohya_toml_gives_prompts_or_a_config_error(tmp_path, document):
    path = tmp_path / "fuzz.toml"
    path.write_text("\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in document.items()) + "\n")
    try:
        assert load_prompts(path)
    except ConfigError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)


def test_a_kohya_toml_given_as_the_config_says_where_it_belongs(tmp_path):
    (tmp_path / "slider.toml").write_text((DATA / "kohya_slider.toml").read_text())
    with pytest.raises(ConfigError, match="prompts_file: slider.toml"):
        load_config(tmp_path / "slider.toml")
    # The same written as YAML, and a list of entries (leco's or sliders' prompts file): one line each.
    (tmp_path / "slider.yaml").write_text("targets:\n  - target_class: a digit five\n    positive: red\n")
    (tmp_path / "entries.yaml").write_text("- target: a digit seven\n  action: erase\n")
    for name in ("slider.yaml", "entries.yaml"):
        with pytest.raises(
            ConfigError, match=rf"prompts file.*, not a training config.*prompts_file: {name}"
        ):
            load_config(tmp_path / name)
    with pytest.raises(ConfigError, match="absent.toml: file not found"):
        load_config(tmp_path / "absent.toml")


KOHYA_PROMPTS = '[[prompts]]\ntarget = "a digit seven"\naction = "erase"\nresolution = 16\n'


def kohya_arguments(tmp_path: Path, lines: str, name: str = "args.toml") -> Path:
    """An arguments file with the options every run needs, and `lines`, beside a prompt TOML."""
    (tmp_path / "erase.toml").write_text(KOHYA_PROMPTS)
    path = tmp_path / name
    path.write_text(
        'pretrained_model_name_or_path = "ink-digits"\nprompts_file = "erase.toml"\noutput_dir = "out"\n'
        + lines
    )
    return path


@pytest.fixture
def loggers_installed(monkeypatch):
    """As if TensorBoard and wandb were installed (the dev extras leave them out): a kohya file's
    loggers are read only where they can run."""
    import importlib.util

    real = importlib.util.find_spec
    installed = lambda name, *a: real("json") if name in ("tensorboard", "wandb") else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", installed)


def test_kohyas_arguments_toml_runs_with_kohyas_defaults_and_meaning(
    tmp_path, monkeypatch, loggers_installed
):
    """train_leco.py --config_file: its options by argparse name, flat or in tables, become the leco
    config they mean; what the file leaves out takes kohya's default, not leco's."""
    monkeypatch.chdir(tmp_path)  # kohya opens prompts_file and output_dir from the working directory
    (tmp_path / "erase.toml").write_text(KOHYA_PROMPTS)
    minimal = tmp_path / "run1.toml"
    minimal.write_text(
        '[model_arguments]\npretrained_model_name_or_path = "ink-digits"\n'
        '[training_arguments]\nprompts_file = "erase.toml"\noutput_dir = "out"\n'
    )
    config = load_config(minimal)
    train = config.train
    assert (train.iterations, train.lr, train.max_grad_norm, train.min_snr_gamma) == (1600, 2e-6, 1.0, None)
    assert (train.max_denoising_steps, train.rollout_guidance_scale, train.noise_scheduler) == (
        40,
        3.0,
        "ddpm",
    )
    assert (train.precision, train.optimizer, train.lr_scheduler) == ("fp32", "adamw", "constant")
    assert (config.network.type, config.network.rank, config.network.alpha) == ("lierla", 4, 1.0)
    # leco's files are NAME_last / NAME_Nsteps: NAME is the file's own name without output_name
    assert (config.save.name, Path(config.save.path), config.save.per_steps) == (
        "run1",
        tmp_path / "out",
        1600,
    )
    assert [entry.target for entry in config.prompts] == ["a digit seven"]
    full = kohya_arguments(
        tmp_path,
        'output_name = "no_seven"\nmax_train_steps = 300\nlearning_rate = 1e-4\nunet_lr = 3e-3\n'
        'optimizer_type = "SGDNesterov"\noptimizer_args = ["weight_decay=0.01"]\n'
        'lr_scheduler = "polynomial"\nlr_scheduler_power = 2\nlr_warmup_steps = 0.1\n'
        'lr_scheduler_args = "lr_end=1e-7"\nnetwork_dim = 8\nnetwork_alpha = 4\n'
        'network_args = ["conv_dim=2"]\n'
        "max_denoising_steps = 25\nleco_denoise_guidance_scale = 5.0\nmax_grad_norm = 0\nseed = 7\n"
        'mixed_precision = "bf16"\nsave_precision = "fp16"\nsave_every_n_steps = 100\nmin_snr_gamma = 5\n'
        'sdpa = true\nnetwork_train_unet_only = true\nlog_with = "wandb"\nlog_tracker_name = "leco-runs"\n'
        # as kohya_ss' GUI writes every option: at their defaults those leco lacks change nothing
        'noise_offset = 0\nloss_type = "l2"\nmax_timestep = 1000\nsave_state = true\ntrain_batch_size = 1\n'
        "zero_terminal_snr = false\nnetwork_dropout = 0\n",
        name="full.toml",
    )
    config = load_config(full)
    train = config.train
    assert (train.iterations, train.lr, train.lr_warmup_steps, train.seed) == (
        300,
        3e-3,
        30,
        7,
    )  # unet_lr wins
    assert train.optimizer_args == {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    assert (train.lr_scheduler, train.lr_scheduler_args) == (
        "polynomial",
        {"power": 2, "lr_end": 1e-7},
    )
    assert (train.max_denoising_steps, train.rollout_guidance_scale, train.max_grad_norm) == (25, 5.0, None)
    assert (train.optimizer, train.precision, train.min_snr_gamma) == ("sgd", "bf16", 5.0)
    network = config.network
    # conv_dim without conv_alpha: kohya scales the convolutions at alpha 1, not network_alpha
    assert (network.type, network.rank, network.alpha, network.conv_rank, network.conv_alpha) == (
        "c3lier",
        8,
        4.0,
        2,
        1.0,
    )
    assert (config.save.name, config.save.per_steps, config.save.precision) == ("no_seven", 100, "fp16")
    assert config.logging.use_wandb and config.logging.wandb_project == "leco-runs"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('network_args = ["conv_alpha=4"]', lambda c: c.network.type == "lierla"),  # no conv_dim: no convs
        ("min_snr_gamma = 0", lambda c: c.train.min_snr_gamma is None),  # kohya: 0 is off
        (
            "lr_scheduler = 'cosine_with_restarts'\nlr_scheduler_num_cycles = 3",
            lambda c: c.train.lr_scheduler_args == {"num_cycles": 3},
        ),
        ("use_8bit_adam = true", lambda c: c.train.optimizer == "adamw8bit"),
        ("use_lion_optimizer = true", lambda c: c.train.optimizer == "lion"),
        ('logging_dir = "logs"', lambda c: c.logging.use_tensorboard and c.logging.tensorboard_dir == "logs"),
        ("lr_warmup_steps = 5\nlr_scheduler = 'linear'", lambda c: c.train.lr_warmup_steps == 5),
        # kohya's get_scheduler_fix: any float is a share of the steps (default 1600), 1.0 included
        ("lr_warmup_steps = 1.0\nlr_scheduler = 'linear'", lambda c: c.train.lr_warmup_steps == 1600),
        ("lr_warmup_steps = 0.25\nlr_scheduler = 'linear'", lambda c: c.train.lr_warmup_steps == 400),
        (  # a whole number of steps written as a float
            "max_train_steps = 800.0\nlr_warmup_steps = 0.25\nlr_scheduler = 'linear'",
            lambda c: (c.train.iterations, c.train.lr_warmup_steps) == (800, 200),
        ),
        ("[extra]\nlearning_rate = 1e-3", lambda c: c.train.lr == 1e-3),  # a table: flattened
    ],
)
def test_kohya_options_read_as_kohya_reads_them(tmp_path, monkeypatch, loggers_installed, lines, expected):
    monkeypatch.chdir(tmp_path)
    assert expected(load_config(kohya_arguments(tmp_path, lines + "\n")))


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        ('logging_dir = "logs"', "logging_dir: tensorboard is not installed"),  # kohya_ss GUI files hold it
        ('log_with = "tensorboard"\nlogging_dir = "logs"', "log_with: tensorboard is not installed"),
        ('log_with = "wandb"', "log_with: wandb is not installed"),
    ],
)
def test_a_kohya_logger_that_is_not_installed_is_said_and_the_run_trains_unlogged(
    tmp_path, monkeypatch, capsys, lines, said
):
    # kohya hands its loggers to accelerate, which skips one whose package is missing
    import importlib.util

    real = importlib.util.find_spec
    missing = {"tensorboard", "wandb"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    monkeypatch.chdir(tmp_path)
    path = kohya_arguments(tmp_path, lines + "\n")
    logging = load_config(path).logging
    assert not logging.use_tensorboard and not logging.use_wandb
    assert f"{path}: {said}, so no logs are written; pip install" in capsys.readouterr().err


def test_kohya_options_train_leco_never_reads_are_said_and_ignored(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = kohya_arguments(tmp_path, 'loss_type = "huber"\nmax_train_epochs = 10\nhuber_c = 0.1\n')
    assert load_config(path).train.iterations == 1600
    said = f"{path}: loss_type, max_train_epochs: not read by train_leco either; ignored"
    assert said in capsys.readouterr().err


def test_the_kohya_arguments_example_loads_as_written():
    config = load_config(EXAMPLES / "slider_red_blue_kohya_args.toml")
    assert (config.train.iterations, config.train.lr, config.save.per_steps) == (300, 3e-3, 100)
    assert {entry.multiplier for entry in config.prompts} == {1.0, -1.0}  # kohya's four slider entries


def test_the_prompt_file_comes_from_the_command_line_as_kohya_takes_it(tmp_path, monkeypatch, capsys):
    """kohya's train_leco requires --prompts_file on its command line, so a user's arguments file
    often lacks it: `--prompts_file` gives it, and replaces the prompts of a leco config too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "erase.toml").write_text(KOHYA_PROMPTS)
    one_pole = '[[targets]]\ntarget_class = "a digit five"\nnegative = "red ink"\n'
    (tmp_path / "slider.toml").write_text(one_pole)
    arguments = tmp_path / "args.toml"
    arguments.write_text('pretrained_model_name_or_path = "ink-digits"\noutput_dir = "out"\n')
    with pytest.raises(ConfigError, match=r"args.toml: prompts_file: required .* --prompts_file PROMPTS"):
        load_config(arguments)
    from_command_line = load_config(arguments, prompts_file="slider.toml")
    slider = [("red ink", "erase", 1.0), ("red ink", "enhance", -1.0)]  # kohya's pairs for one pole
    slider = [(f"a digit five/{pole}", action, m) for pole, action, m in slider]
    assert [(f"{e.target}/{e.positive}", e.action, e.multiplier) for e in from_command_line.prompts] == slider
    written = kohya_arguments(tmp_path, "", name="written.toml")  # names erase.toml; the command line wins
    read = load_config(written, prompts_file="slider.toml")
    assert [(f"{e.target}/{e.positive}", e.action, e.multiplier) for e in read.prompts] == slider
    leco_config = tmp_path / "config.yaml"
    leco_config.write_text(
        "pretrained_model: {name_or_path: ink-digits}\nprompts:\n  - target: a digit seven\n"
    )
    read = load_config(leco_config, prompts_file="slider.toml")
    assert [(f"{e.target}/{e.positive}", e.action, e.multiplier) for e in read.prompts] == slider
    with pytest.raises(ConfigError, match=r"^--prompts_file: absent.toml is not found; name the prompts"):
        load_config(arguments, prompts_file="absent.toml")
    spec = tmp_path / "spec.yaml"  # still told apart from a config, with the option
    spec.write_text("erase: [a digit seven]\nkeep: all\n")
    with pytest.raises(ConfigError, match=r"this is an eval spec .*, not a training config"):
        load_config(spec, prompts_file="slider.toml")
    job = tmp_path / "job.yaml"
    job.write_text(
        "job: extension\nconfig:\n  process:\n    - type: slider\n      model: {name_or_path: ink-digits}\n"
        "      slider: {targets: [{target_class: a digit five, positive: red ink}]}\n"
    )
    assert main(["train", str(job), "--prompts_file", "slider.toml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("an ai-toolkit job, whose slider targets are its prompts; leave the option out")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('lr_scheduler = "constant"\nlr_warmup_steps = 3', r"lr_warmup_steps: 3 with lr_scheduler constant"),
        ("lr_warmup_steps = 0.5", r"lr_warmup_steps: 0.5 with lr_scheduler constant"),  # kohya's default
        (
            "sdpaa = true",
            r"sdpaa \(did you mean 'sdpa'\?\): not an option of any kohya script \(kohya would skip it "
            "without a word\\); fix or remove it",
        ),
        ("noise_offset = 0.05", r"noise_offset: 0.05 has no leco equivalent; remove it"),
        ("zero_terminal_snr = true", r"zero_terminal_snr: True has no leco equivalent; remove it"),
        (
            'optimizer_type = "DAdaptation"',
            r"optimizer_type: 'DAdaptation' is D-Adaptation's AdamPreprint .* nearest is DAdaptAdam",
        ),
        ('use_8bit_adam = true\noptimizer_type = "Lion"', r"use_8bit_adam, optimizer_type: give one of them"),
        ("network_args = 5", r'network_args: give a list of "key=value" strings \(got 5\)'),
        ("optimizer_args = [1]", r'optimizer_args: give a list of "key=value" strings'),
        (
            "lr_scheduler_power = 0\nlr_scheduler = 'polynomial'",
            r"lr_scheduler_power \(leco: train.lr_scheduler_args\)",
        ),
        (
            "max_train_steps = 0",
            r"max_train_steps \(leco: train.iterations\): Input should be greater than or equal to 1",
        ),
        ("[broken", r"invalid TOML"),
        ("network_weights = 'a.safetensors'", r"network_weights: 'a.safetensors' has no leco equivalent"),
        (
            'optimizer_type = "AdaFactor"',
            r"optimizer_type: 'AdaFactor' has no leco equivalent; use one of AdamW, ",
        ),
        (
            "network_dim = 0",
            r"network_dim \(leco: network.rank\): Input should be greater than or equal to 1",
        ),
        ('network_module = "lycoris.kohya"', r"network_module: 'lycoris.kohya': leco trains kohya's LoRA"),
        ('network_args = ["algo=locon"]', r"network_args: algo: leco reads conv_dim and conv_alpha"),
        (
            'lr_scheduler = "adafactor"',
            r"lr_scheduler: 'adafactor' has no leco equivalent; use one of constant",
        ),
        ('save_model_as = "ckpt"', r"save_model_as: leco writes .safetensors only"),
        ("gradient_accumulation_steps = 4", r"gradient_accumulation_steps: 4 has no leco equivalent"),
        ('mixed_precision = "fp8"', r"mixed_precision: 'fp8' is not one leco trains in; use 'no' \(full"),
    ],
)
def test_kohya_options_without_equivalent_are_one_line_naming_them(tmp_path, monkeypatch, line, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "erase.toml").write_text(KOHYA_PROMPTS)
    arguments = tmp_path / "args.toml"
    arguments.write_text(
        'pretrained_model_name_or_path = "ink-digits"\nprompts_file = "erase.toml"\n'
        f'output_dir = "o"\n{line}\n'
    )
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(arguments))}: {message}") as error:
        load_config(arguments)
    assert "\n" not in str(error.value)


def test_a_kohya_gui_dump_loads_naming_the_options_train_leco_skips(tmp_path, monkeypatch, capsys):
    # kohya_ss's GUI writes train_network's dataset and bucket settings into every arguments file;
    # train_leco skips what it does not know, and so does leco, naming them all at once.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "erase.toml").write_text(KOHYA_PROMPTS)
    arguments = tmp_path / "args.toml"
    gui = 'enable_bucket = true\ncaption_extension = ".txt"\ntext_encoder_lr = 0.0001\ntrain_data_dir = ""\n'
    arguments.write_text(
        f'pretrained_model_name_or_path = "ink-digits"\nprompts_file = "erase.toml"\noutput_dir = "o"\n{gui}'
    )
    assert load_config(arguments).train.lr == pytest.approx(2e-6)  # kohya's learning_rate default
    said = capsys.readouterr().err
    assert "4 options of kohya's other scripts, which train_leco skips too; ignored: enable_bucket, " in said
    arguments.write_text(arguments.read_text() + "network_dimm = 8\nlearnig_rate = 0.001\nmax_steps = 9\n")
    with pytest.raises(ConfigError) as error:  # a typo of an option is no script's setting: all named
        load_config(arguments)
    assert (
        "network_dimm (did you mean 'network_dim'?), learnig_rate (did you mean 'learning_rate'?), max_steps "
        "(did you mean" in str(error.value)
    )


def test_kohyas_arguments_toml_is_told_apart_from_its_prompt_file(tmp_path, monkeypatch):
    """The arguments file given where its prompt file belongs says so; its prompt file is looked up
    from the working directory as kohya does, else beside the arguments file."""
    arguments = tmp_path / "args.toml"
    arguments.write_text(
        '[model_arguments]\npretrained_model_name_or_path = "ink-digits"\n'
        '[training_arguments]\nprompts_file = "erase.toml"\nmax_train_steps = 500\noutput_dir = "o"\n'
    )
    (tmp_path / "erase.toml").write_text(KOHYA_PROMPTS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert [entry.target for entry in load_config(arguments).prompts] == ["a digit seven"]
    (elsewhere / "erase.toml").write_text(KOHYA_PROMPTS.replace("seven", "three"))
    assert [entry.target for entry in load_config(arguments).prompts] == ["a digit three"]
    config = tmp_path / "config.yaml"
    config.write_text("prompts_file: args.toml\npretrained_model: {name_or_path: ink-digits}\n")
    with pytest.raises(
        ConfigError, match=r"args.toml: is a kohya train_leco arguments file .*, not its prompt file"
    ):
        load_config(config)


def test_kohyas_arguments_toml_trains_with_leco_train(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "erase.toml").write_text(KOHYA_PROMPTS)
    (tmp_path / "args.toml").write_text(
        'pretrained_model_name_or_path = "ink-digits"\nprompts_file = "erase.toml"\noutput_dir = "out"\n'
        'output_name = "no_seven"\nmax_train_steps = 3\nlearning_rate = 1e-3\nmax_denoising_steps = 4\n'
        'lr_scheduler = "constant_with_warmup"\nlr_warmup_steps = 3\n'
    )
    assert main(["train", "args.toml", "--no-progress"]) == 0
    # a setting without effect is named by the option the file wrote
    said = "lr_warmup_steps (leco: train.lr_warmup_steps): 3 is not below train.iterations (3)"
    assert said in capsys.readouterr().err
    with safe_open(str(tmp_path / "out" / "no_seven_last.safetensors"), "pt") as file:
        keys, metadata = list(file.keys()), file.metadata()  # noqa: SIM118
    assert metadata["ss_network_dim"] == "4" and any(key.startswith("lora_unet_") for key in keys)


def test_entries_expanded_from_a_prompt_file_are_named_where_they_were_written(tmp_path):
    """A kohya target becomes four entries: a problem found with the whole config names the target
    and its file, not "prompts entry 7" of a config that lists none."""
    (tmp_path / "sliders.toml").write_text(
        'target_class = "a digit three"\n[[targets]]\npositive = "green ink"\n'
        '[[targets]]\npositive = "orange ink"\nnegative = "black ink"\n'
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        "prompts_file: sliders.toml\npretrained_model: {name_or_path: ink-digits}\n"
        "train: {method: closed_form}\n"
    )
    with pytest.raises(
        ConfigError, match=r"config.yaml: sliders.toml: targets 1: action enhance has no closed form"
    ):
        load_config(config)
    (tmp_path / "prompts.yaml").write_text(
        "- target: a digit three\n- target: a digit\n  attributes: red, blue\n  action: enhance\n"
    )
    config.write_text(edit(config.read_text(), "sliders.toml", "prompts.yaml"))
    with pytest.raises(
        ConfigError, match=r"config.yaml: prompts.yaml: entry 2: action enhance has no closed"
    ):
        load_config(config)


def test_neutral_files_split_at_line_breaks_only_as_kohya_reads_them(tmp_path):
    (tmp_path / "neutrals.txt").write_bytes(b"a digit\x0cin a box\r\nplain \xc2\x85 line\rthird\n")
    (tmp_path / "slider.toml").write_text(
        'neutral_prompt_file = "neutrals.txt"\n'
        '[[targets]]\ntarget_class = "a digit five"\npositive = "red ink"\n'
    )
    neutrals = {entry.neutral for entry in load_prompts(tmp_path / "slider.toml")}
    assert neutrals == {"a digit\x0cin a box", "plain \x85 line", "third"}


# -- ostris/ai-toolkit slider jobs ------------------------------------------------------------------


@pytest.fixture
def ai_toolkit_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LECO_TEST_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("LECO_TEST_MODEL", str(tmp_path / "model"))
    monkeypatch.chdir(DATA)  # ai-toolkit opens slider.prompt_file from the working directory
    return tmp_path


def test_ai_toolkit_yaml_maps_every_section(ai_toolkit_env):
    config = load_config(DATA / "ai_toolkit_slider.yaml")
    model, network, train_, save = config.pretrained_model, config.network, config.train, config.save
    assert (model.name_or_path, model.v2, model.v_pred) == (str(ai_toolkit_env / "model"), False, False)
    assert (network.type, network.rank, network.alpha, network.training_method) == (
        "all-linear",
        8,
        4.0,
        "full",
    )
    assert (train_.iterations, train_.lr, train_.optimizer, train_.optimizer_args) == (
        3,
        2e-4,  # written 2e-4: ai-toolkit's YAML reads it as a number, plain PyYAML as text
        "adamw",
        {"eps": 1e-6},  # ai-toolkit always passes eps=1e-6 to Adam
    )
    assert (train_.lr_scheduler, train_.noise_scheduler, train_.max_denoising_steps) == ("cosine", "ddpm", 6)
    assert (train_.precision, train_.batch_size, train_.gradient_checkpointing) == ("fp32", 1, False)
    # ai-toolkit's rollout: the network off, one text embedding a latent (no guidance)
    assert (train_.device, train_.rollout_model, train_.rollout_guidance_scale) == ("cpu", "frozen", 1.0)
    assert (save.name, save.path, save.per_steps, save.precision) == (
        "eye_size_slider",
        str(ai_toolkit_env / "out" / "eye_size_slider"),
        2,
        "fp16",
    )
    assert config.anchors.prompts == ["a house"]
    preview = config.preview
    assert (preview.prompts, preview.strengths, preview.seeds) == (
        ["a person, close-up", "a dog on a couch"],
        [-2.0, 2.0],
        [42],
    )
    assert (preview.steps, preview.guidance, preview.every) == (2, 7.0, 2)


def test_ai_toolkit_targets_become_kohyas_four_pairs_at_guidance_one(ai_toolkit_env):
    entries = load_config(DATA / "ai_toolkit_slider.yaml").prompts
    eyes = "person", "person with huge eyes", "person with tiny eyes"
    face = "a face", "a face, wide open eyes"
    expected = set()
    # The neutral is "" whatever slider.prompt_file holds: ai-toolkit's loop predicts it from "".
    for size in (16, (16, 24)):  # slider.resolutions, each [height, width]
        expected |= {(*row, size, 0.8) for row in slider_rows(*eyes, "", 1.0)}
        expected |= {
            (*face, "", "", "enhance", 1.0, size, 1.0),
            (*face, "", "", "erase", -1.0, size, 1.0),
        }
    got = [(*fields(e, *POLES), e.resolution, e.weight) for e in entries]
    assert len(expected) == 12 and set(got) == expected
    # batch_full_slide (ai-toolkit's default) trains a target a step: the one-pole target's two
    # pairs are listed twice, so both targets get as many of leco's evenly dealt steps
    assert [e.target for e in entries].count("person") == [e.target for e in entries].count("a face") == 8
    # the batch is train.batch_size, the default of every entry (which names none)
    assert {(e.guidance_scale, e.batch_size) for e in entries} == {(1.0, None)}


def test_ai_toolkit_pair_at_a_time_gives_each_pair_one_entry(ai_toolkit_env, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        edit(
            (DATA / "ai_toolkit_slider.yaml").read_text(), "batch_full_slide: true", "batch_full_slide: false"
        )
    )
    entries = load_config(path).prompts
    assert len(entries) == 12 and [e.target for e in entries].count("a face") == 4


def test_ai_toolkit_prompt_file_lines_are_read_and_said_to_change_nothing(ai_toolkit_env, capsys):
    load_config(DATA / "ai_toolkit_slider.yaml")
    assert (
        "slider.prompt_file: its lines change nothing in ai-toolkit's slider loop" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("old", "new", "check"),
    [
        # ai-toolkit's get_torch_dtype spellings of fp32
        ("dtype: fp32", "dtype: float", lambda c: c.train.precision == "fp32"),
        ("dtype: fp32", "dtype: single", lambda c: c.train.precision == "fp32"),
        ("dtype: float16", "dtype: float", lambda c: c.save.precision == "fp32"),
        # keys the slider loop never reads, at any value, and no-op values of others
        ("noise_offset: 0.0", "noise_offset: 0.0\n        timestep_type: linear", "unchanged"),
        ("noise_offset: 0.0", "noise_offset: 0.0\n        cache_text_embeddings: true", "unchanged"),
        ("is_xl: false", "is_xl: false\n        quantize: false", "unchanged"),
        (
            'lr_scheduler: "cosine"',
            'lr_scheduler: "cosine"\n        lr_scheduler_params: {eta_min: 0}',
            "unchanged",
        ),
        ("    - type: slider\n", "    - type: slider\n      trigger_word: null\n", "unchanged"),
        # what ai-toolkit's UI writes into every job, read by its image trainers only
        (
            "noise_offset: 0.0",
            "noise_offset: 0.0\n        loss_type: mse\n        content_or_style: balanced\n"
            "        unload_text_encoder: false\n        diff_output_preservation: false\n"
            "        do_cfg: false\n        noise_multiplier: 1.0\n        linear_timesteps: false",
            "unchanged",
        ),
        ("is_xl: false", "is_xl: false\n        model_kwargs: {}\n        compile: false", "unchanged"),
        # a sample section without prompts (ai-toolkit's default []) draws nothing: no previews
        ('        prompts:\n          - "a person, close-up --m -2"\n', "        prompts: []\n", None),
    ],
)
def test_ai_toolkit_accepts_what_changes_nothing_in_its_slider_loop(ai_toolkit_env, old, new, check):
    path = ai_toolkit_env / "job.yaml"
    text = (DATA / "ai_toolkit_slider.yaml").read_text()
    if check is None:  # the whole prompts list emptied
        text = edit(
            text, '          - "a person, close-up --m 2"\n          - "a dog on a couch --m 2"\n', ""
        )
        check = lambda c: c.preview.prompts == []  # noqa: E731
    path.write_text(edit(text, old, new))
    if check == "unchanged":  # the config leco trains is the one the job without the key gives
        (ai_toolkit_env / "plain.yaml").write_text(text)
        assert load_config(path).model_dump() == load_config(ai_toolkit_env / "plain.yaml").model_dump()
    else:
        assert check(load_config(path))


@pytest.mark.parametrize(
    ("scheduler", "params", "said"),
    [
        ("cosine", "{T_max: 100, eta_min: 0}", "lr_scheduler_params.T_max: ai-toolkit replaces it"),
        ("cosine_with_restarts", "{T_0: 50}", "lr_scheduler_params.T_0: ai-toolkit replaces it"),
        ("constant", "{total_iters: 7}", "lr_scheduler_params.total_iters: ai-toolkit replaces it"),
        ("cosine", "{T_max: 3}", None),  # its own steps: nothing to say
    ],
)
def test_ai_toolkit_schedule_lengths_it_replaces_with_its_steps_are_said_and_ignored(
    ai_toolkit_env, capsys, scheduler, params, said
):
    # BaseSDTrainProcess sets total_iters to train.steps; its cosine schedules take T_max / T_0 from it
    path = ai_toolkit_env / "job.yaml"
    path.write_text(
        edit(
            (DATA / "ai_toolkit_slider.yaml").read_text(),
            'lr_scheduler: "cosine"',
            f'lr_scheduler: "{scheduler}"\n        lr_scheduler_params: {params}',
        )
    )
    config = load_config(path)
    assert config.train.lr_scheduler == scheduler and config.train.iterations == 3
    assert config.train.lr_scheduler_args == {}  # one cycle over the steps, as ai-toolkit's T_0 = steps
    warnings = capsys.readouterr().err
    assert (said in warnings and "train.steps (3)" in warnings) if said else "replaces" not in warnings


def test_ai_toolkit_max_iterations_in_the_schedule_is_refused(ai_toolkit_env):
    path = ai_toolkit_env / "job.yaml"
    text = (DATA / "ai_toolkit_slider.yaml").read_text()
    path.write_text(
        edit(
            text,
            'lr_scheduler: "cosine"',
            'lr_scheduler: "cosine"\n        lr_scheduler_params: {max_iterations: 9, T_max: 9}',
        )
    )
    with pytest.raises(ConfigError, match=r"lr_scheduler_params.max_iterations: has no leco equivalent"):
        load_config(path)


def test_ai_toolkit_anchor_multipliers_are_accepted_and_said_unused(ai_toolkit_env, capsys):
    path = ai_toolkit_env / "job.yaml"
    text = edit(
        (DATA / "ai_toolkit_slider.yaml").read_text(), "multiplier: 1.0\nmeta", "multiplier: 0.2\nmeta"
    )
    path.write_text(text)
    assert load_config(path).anchors.prompts == ["a house"]
    warnings = capsys.readouterr().err
    assert "slider.anchors[0].multiplier: 0.2 is not used" in warnings
    # ai-toolkit's loop never trains its anchors: the LoRA differs from its, said once on loading
    assert warnings.count("builds these anchors but never trains them") == 1


def test_ai_toolkit_targets_written_as_one_mapping_say_to_make_a_list(ai_toolkit_env):
    path = ai_toolkit_env / "job.yaml"
    text = (DATA / "ai_toolkit_slider.yaml").read_text()
    second = '          - target_class: "a face"\n            positive: "a face, wide open eyes"\n'
    path.write_text(
        edit(
            edit(text, second, ""), '          - target_class: "person"', '            target_class: "person"'
        )
    )
    with pytest.raises(
        ConfigError, match=r"slider.targets: is one target written as a mapping; make it a list"
    ):
        load_config(path)


@pytest.mark.parametrize("inline", [True, False])
def test_a_kohya_slider_target_where_leco_entries_go_says_where_it_belongs(tmp_path, inline):
    target = "- target_class: a digit five\n  positive: a digit five in red ink\n  negative: blue\n"
    config = tmp_path / "config.yaml"
    if inline:
        config.write_text("pretrained_model: {name_or_path: ink-digits}\nprompts:\n" + target)
        where = "prompts.1.target_class"
    else:
        (tmp_path / "sliders.yaml").write_text(target)
        config.write_text("pretrained_model: {name_or_path: ink-digits}\nprompts_file: sliders.yaml\n")
        where = "entry 1.target_class"
    with pytest.raises(ConfigError) as error:
        load_config(config)
    message = str(error.value)
    assert f"{where}: a kohya slider target" in message and "top-level `targets:`" in message
    assert "\n" not in message


def test_ai_toolkit_log_dir_without_tensorboard_warns_and_trains_unlogged(
    ai_toolkit_env, monkeypatch, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    path = ai_toolkit_env / "job.yaml"
    path.write_text(
        edit(
            (DATA / "ai_toolkit_slider.yaml").read_text(),
            "  device: cpu\n",
            "  device: cpu\n  log_dir: logs\n",
        )
    )
    assert load_config(path).logging.use_tensorboard is False
    assert "config.log_dir: tensorboard is not installed, so no logs are written" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("keys", "rank"),
    [({"rank": 16, "linear": 8}, 16), ({"linear": 8}, 8), ({"rank": None, "linear": 8}, 8), ({}, 4)],
)
def test_ai_toolkit_rank_wins_over_linear_as_in_its_network_config(ai_toolkit_env, tmp_path, keys, rank):
    job = yaml.safe_load((DATA / "ai_toolkit_slider.yaml").read_text())
    network = job["config"]["process"][0]["network"]
    network.pop("linear")
    network.update(keys)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert load_config(path).network.rank == rank


@pytest.mark.parametrize(
    ("keys", "alphas"),
    [
        ({"linear_alpha": None}, (8, None)),  # its LoRAModule: an alpha of null or 0 is the rank
        ({"linear_alpha": 0}, (8, None)),
        ({"alpha": None, "linear_alpha": "absent"}, (8, None)),
        ({"alpha": 2, "linear_alpha": "absent"}, (2, None)),
        ({"conv": 2, "conv_alpha": None}, (4, 2)),
        ({"conv": 2}, (4, 2)),
        ({"conv": 2, "conv_alpha": 1}, (4, 1)),
    ],
)
def test_ai_toolkit_alphas_read_as_its_network_reads_them(ai_toolkit_env, tmp_path, keys, alphas):
    job = yaml.safe_load((DATA / "ai_toolkit_slider.yaml").read_text())
    network = job["config"]["process"][0]["network"]
    network.update(keys)
    if network.get("linear_alpha") == "absent":
        del network["linear_alpha"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    read = load_config(path).network
    assert (read.alpha, read.conv_alpha if "conv" in keys else None) == alphas


@pytest.mark.parametrize(
    ("keys", "lr", "warned"),
    [
        ({"lr": 2e-4, "unet_lr": 1e-3}, 2e-4, True),
        ({"unet_lr": 1e-3}, 1e-6, True),
        ({"lr": 2e-4, "unet_lr": 2e-4}, 2e-4, False),
    ],
)
def test_ai_toolkit_trains_at_lr_whatever_unet_lr_says(ai_toolkit_env, tmp_path, capsys, keys, lr, warned):
    # ai-toolkit stores unet_lr but hands the network and the optimizer train.lr (default 1e-6)
    job = yaml.safe_load((DATA / "ai_toolkit_slider.yaml").read_text())
    train_ = job["config"]["process"][0]["train"]
    train_.pop("lr", None)
    train_.update(keys)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert load_config(path).train.lr == pytest.approx(lr)
    assert ("unet_lr" in capsys.readouterr().err) == warned


def test_ai_toolkit_json_maps_optimizer_scheduler_network_and_shuffle():
    config = load_config(DATA / "ai_toolkit_slider.json")
    train_ = config.train
    # prodigy: ai-toolkit replaces an Adam-sized lr (< 0.1) by 1.0 and passes eps=1e-6.
    assert (train_.optimizer, train_.lr, train_.optimizer_args) == (
        "prodigy",
        1.0,
        {"eps": 1e-6, "weight_decay": 0.01},
    )
    assert (train_.lr_scheduler, train_.lr_warmup_steps, train_.seed) == ("constant_with_warmup", 20, 7)
    assert (train_.max_denoising_steps, train_.gradient_checkpointing, train_.precision) == (
        999,
        True,
        "fp32",
    )
    assert (train_.device, config.other.use_xformers) == ("auto", True)
    network = config.network
    assert (network.type, network.rank, network.alpha, network.conv_rank, network.conv_alpha) == (
        "all",
        4,
        4.0,
        2,
        2.0,  # conv_alpha defaults to conv in ai-toolkit
    )
    assert (config.pretrained_model.v2, config.pretrained_model.v_pred) == (None, None)
    # Files are named after the job, in a folder named after the process.
    assert (config.save.name, config.save.path) == (
        "detail_slider",
        str(Path("output/LoRA/detail_slider_run2")),
    )
    assert config.save.per_steps == 100 and config.save.precision == "fp16"
    # shuffle: up to 8 (positive, negative) phrase orders, four entries each.
    assert len(config.prompts) == 32
    positives = {e.positive for e in config.prompts if e.action == "enhance" and e.multiplier > 0}
    assert len(positives) > 1
    for text in positives:
        assert sorted(text.split(", ")) == ["high detail", "intricate", "sharp"]
    assert load_config(DATA / "ai_toolkit_slider.json").prompts == config.prompts  # reproducible


def test_ai_toolkit_keys_that_only_change_samples_are_named_in_one_warning(ai_toolkit_env, capsys):
    load_config(DATA / "ai_toolkit_slider.yaml")
    lines = [line for line in capsys.readouterr().err.splitlines() if "not honoured" in line]
    assert len(lines) == 1 and "meta" in lines[0] and "sample.sampler" in lines[0]
    assert "sample.width" not in lines[0]  # 16 is the size leco previews at anyway


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new)


AI_TOOLKIT_ERRORS = {
    "network_left_empty": (
        (
            '      network:\n        type: "lierla"\n        linear: 8\n        linear_alpha: 4\n',
            "      network:\n",
        ),
        "config.process[0].network: required key is missing or empty; leco trains a LoRA",
    ),
    "noise_offset": (
        ("        noise_offset: 0.0\n", "        noise_offset: 0.1\n"),
        "config.process[0].train.noise_offset: 0.1 has no leco equivalent",
    ),
    "unknown_key": (
        ("        weight: 0.8\n", "        wieght: 0.8\n"),
        "slider.targets[0].wieght: leco has no equivalent for this key; did you mean 'weight'?",
    ),
    "misspelt_targets": (
        ("        targets:\n", "        targetz:\n"),  # not "add at least one target"
        "config.process[0].slider.targetz: leco has no equivalent for this key; did you mean 'targets'?",
    ),
    "negative_step_files": (
        ("max_step_saves_to_keep: 3", "max_step_saves_to_keep: -1"),
        "max_step_saves_to_keep: must be a whole number >= 0",
    ),
    "not_a_slider": (("- type: slider", "- type: sd_trainer"), "config.process[0].type: 'sd_trainer'"),
    "lokr": (('type: "lierla"', 'type: "lokr"'), "network.type: 'lokr' has no leco equivalent"),
    "linear_schedule": (('lr_scheduler: "cosine"', 'lr_scheduler: "linear"'), "train.lr_scheduler: 'linear'"),
    "text_encoder": (
        ("train_text_encoder: false", "train_text_encoder: true"),
        "train.train_text_encoder: true is not what ai-toolkit's slider process trains (it caches the "
        "prompts); a leco config trains the text encoder instead of the UNet with network.training_method: "
        "text-encoder",
    ),
    "no_pole": (('positive: "a face, wide open eyes"', 'positive: ""'), "slider.targets[1]: needs positive"),
    "same_poles": (
        ('negative: "person with tiny eyes"', 'negative: "Person with  huge eyes"'),
        "slider.targets[0]: positive and negative are the same prompt ('person with huge eyes'",
    ),
    "bad_number": (
        ("multiplier: 1.0\n            weight", "multiplier: lots\n            weight"),
        "multiplier",
    ),
    "zero_multiplier": (
        ("multiplier: 1.0\n            weight", "multiplier: 0\n            weight"),
        "slider.targets[0].multiplier (leco: prompts.1.multiplier): must not be 0",
    ),
    "a_list_as_a_pole": (
        ('positive: "a face, wide open eyes"', 'positive: ["a face", "wide open eyes"]'),
        "slider.targets[1].positive: must be one prompt text",
    ),
    "missing_prompt_file": (
        ('prompt_file: "ai_toolkit_neutrals.txt"', 'prompt_file: "gone.txt"'),
        "gone.txt",
    ),
    "environment": (('"${LECO_TEST_MODEL}"', '"${LECO_UNSET_VARIABLE}"'), "${LECO_UNSET_VARIABLE}"),
    "process_name_leaves_the_folder": (
        ("    - type: slider\n", "    - type: slider\n      name: ../elsewhere\n"),
        "config.process[0].name: '../elsewhere' must name one folder inside training_folder",
    ),
    "huge_resolution": (
        ("          - [16, 24]\n", "          - [16, 100000000000000000000]\n"),
        "resolutions",
    ),
    "job_name_leaves_the_folder": (
        ("  name: eye_size_slider\n", "  name: x/../../y\n"),
        "config.name: 'x/../../y' must name one folder inside training_folder",
    ),
}


def test_an_ai_toolkit_job_without_a_process_says_what_to_add(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("job: train\nconfig:\n  name: x\n  process: []\n")
    with pytest.raises(ConfigError, match=r"config.process: is empty; add the slider process"):
        load_config(path)
    path.write_text("job: train\nconfig:\n  name: x\n  process:\n    type: slider\n")
    with pytest.raises(ConfigError, match=r"config.process: must be a list of processes; .*`- type: slider`"):
        load_config(path)


def test_a_jsonc_job_with_comments_is_reported_as_json_and_a_job_as_prompts_file_is_named(tmp_path):
    path = tmp_path / "job.jsonc"
    path.write_text('{\n  // my slider\n  "job": "train", "config": {}\n}\n')
    with pytest.raises(ConfigError, match=r"job.jsonc: line 2: invalid JSON"):
        load_config(path)
    job = tmp_path / "job.yaml"
    job.write_text((DATA / "ai_toolkit_slider.yaml").read_text())
    with pytest.raises(ConfigError, match=r"job.yaml: is an ai-toolkit job config, not a prompts file; run"):
        load_prompts(job)


def test_ai_toolkit_targets_cut_to_the_step_count_are_warned_of(tmp_path, capsys):
    job = json.loads((DATA / "ai_toolkit_slider.json").read_text())
    job["config"]["process"][0]["train"]["steps"] = 5  # shuffle makes 8 pairs of its one target
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    assert len(load_config(path).prompts) == 5 * 4
    assert "8 targets (with shuffle, one per phrase order) but train.steps is 5" in capsys.readouterr().err


@pytest.mark.parametrize("case", AI_TOOLKIT_ERRORS, ids=str)
def test_ai_toolkit_errors_are_one_line_naming_the_file_and_key(ai_toolkit_env, case):
    (old, new), expected = AI_TOOLKIT_ERRORS[case]
    path = ai_toolkit_env / "job.yaml"
    path.write_text(edit((DATA / "ai_toolkit_slider.yaml").read_text(), old, new))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert expected in message


def test_ai_toolkit_keys_without_equivalent_in_several_sections_are_named_at_once(ai_toolkit_env):
    text = (DATA / "ai_toolkit_slider.yaml").read_text()
    text = edit(text, "        noise_offset: 0.0\n", "        noise_offset: 0.0\n        nois_offset: 0.1\n")
    path = ai_toolkit_env / "job.yaml"
    path.write_text(edit(text, "            weight: 0.8\n", "            wieght: 0.8\n"))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: leco has no equivalent for these keys: ") and "\n" not in message
    assert "config.process[0].train.nois_offset (did you mean 'noise_offset'?; read there: " in message
    assert "config.process[0].slider.targets[0].wieght (did you mean 'weight'?; read there: " in message


def test_ai_toolkit_problems_found_after_conversion_name_the_jobs_own_key(ai_toolkit_env, capsys):
    from leco.cli import main

    path = ai_toolkit_env / "job.yaml"
    text = (DATA / "ai_toolkit_slider.yaml").read_text()
    text = edit(text, '"${LECO_TEST_MODEL}"', "ink-digits")
    path.write_text(edit(text, "is_v2: false", "is_v2: true"))  # ink-digits is an SD 1.x model
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        f"{path}: config.process[0].model.is_v2 (leco: pretrained_model.v2): is true but ink-digits" in error
    )
    path.write_text(edit(text, "is_xl: false", "is_xl: true"))  # nor an SDXL one: ai-toolkit would fail
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "config.process[0].model.is_xl (leco: pretrained_model.sdxl): is true but ink-digits is an sd1"
        in error
    )
    # leco's own count of expanded entries is no key of the job: such a message stays as it is
    assert in_file_keys(path, "prompts entry 5: resolution 10") == "prompts entry 5: resolution 10"
    assert in_file_keys(path, "prompts: x").startswith("config.process[0].slider.targets (leco: prompts): x")
    # the Python call names them so too
    with pytest.raises(LecoError) as raised:
        train(path)
    assert str(raised.value).startswith(
        f"{path}: config.process[0].model.is_xl (leco: pretrained_model.sdxl)"
    )


AI_TOOLKIT_KEYS = [
    "job",
    "config",
    "name",
    "training_folder",
    "process",
    "type",
    "network",
    "train",
    "model",
    "save",
    "sample",
    "slider",
    "targets",
    "resolutions",
    "prompts",
    "linear",
    "steps",
    "lr",
    "optimizer",
    "name_or_path",
    "positive",
    "negative",
    "anchors",
    "prompt_file",
]
ai_toolkit_documents = st.recursive(
    st.none() | scalars | st.just("slider") | st.just("train"),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(AI_TOOLKIT_KEYS), children, max_size=5)
    ),
    max_leaves=24,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=ai_toolkit_documents, job=st.just("train") | scalars)
def test_any_ai_toolkit_job_gives_a_config_or_a_config_error(tmp_path, config, job):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump({"job": job, "config": config}))
    try:
        load_config(path)
    except ConfigError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)


def test_ai_toolkit_job_runs_its_one_slider_process_among_others(ai_toolkit_env, capsys):
    job = yaml.safe_load((DATA / "ai_toolkit_slider.yaml").read_text())
    slider = job["config"]["process"][0]
    job["config"]["process"] = [{"type": "vae"}, slider]  # ai-toolkit runs both in turn
    path = ai_toolkit_env / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    alone = load_config(DATA / "ai_toolkit_slider.yaml")
    capsys.readouterr()
    assert load_config(path).model_dump() == alone.model_dump()
    assert (
        "config.process[0] ('vae'): not a slider, skipped; leco runs config.process[1]"
        in capsys.readouterr().err
    )
    job["config"]["process"] = [slider, {"type": "vae"}, slider]
    path.write_text(yaml.safe_dump(job))
    with pytest.raises(
        ConfigError,
        match=r"config\.process: leco runs one slider process per file \(found config\.process\[0\], "
        r"config\.process\[2\]\)",
    ):
        load_config(path)


# -- rohitgandikota/sliders prompt files ---------------------------------------------------------------


def test_a_sliders_prompt_file_loads_as_it_is():
    old, sky = load_prompts(DATA / "sliders_prompts.yaml")
    assert fields(old, "target", "positive", "unconditional", "neutral", "action") == (
        "male person",
        "male person, very old",
        "male person, very young",
        "male person",
        "enhance",
    )
    assert fields(old, "guidance_scale", "resolution", "dynamic_resolution", "batch_size") == (
        4.0,
        512,
        False,
        1,
    )
    assert fields(sky, "positive", "unconditional", "neutral", "action", "dynamic_crops") == (
        "chaotic dark sky",
        "sky",
        "sky",
        "erase",
        False,
    )


def test_sliders_gpt_prompt_files_run_with_the_keys_sliders_ignores_named(capsys):
    entries = load_prompts(DATA / "sliders_gpt_prompts.yaml")
    assert [(e.target, e.guidance_scale, e.action) for e in entries] == [
        ("woman", 1.0, "enhance"),  # `guidance: 4` is not read by sliders: it trains at 1
        ("man", 1.0, "enhance"),
        ("child", 2.0, "enhance"),
    ]
    warning = capsys.readouterr().err
    assert "guidance (entries 1-2), rank (entries 1-2): keys of rohitgandikota/sliders'" in warning


def test_sliders_files_left_at_its_defaults_train_at_its_size_and_batch(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(
        "- {target: woman, positive: woman with a hat, rank: 4}\n"
        "- {target: man, positive: man with a hat, rank: 4, resolution: 1024, batch_size: 2}\n"
        "- {target: child, positive: child with a hat}\n"
    )
    entries = load_prompts(path)
    # sliders' PromptSettings defaults (512, 1) where its file leaves them out, as its SDXL script
    # uses them too; a leco entry (no `rank`) keeps leco's: the model's size, the run's batch
    assert [(e.resolution, e.batch_size) for e in entries] == [(512, 1), (1024, 2), (None, None)]


def test_sliders_attributes_duplicate_an_entry_with_each_attribute_before_its_four_prompts():
    entries = load_prompts(DATA / "sliders_attributes.yaml")
    rows = [fields(e, "target", "positive", "unconditional", "neutral") for e in entries]
    assert rows == [
        ("white person", "white person, smiling", "white person, frowning", "white person"),
        ("black person", "black person, smiling", "black person, frowning", "black person"),
        # Defaults first (positive = target, unconditional = "", neutral = unconditional), then the prefix.
        ("small a dog", "small a dog", "small ", "small "),
        ("big a dog", "big a dog", "big ", "big "),
        ("sky", "dark sky", "", ""),
    ]
    assert [(e.action, e.guidance_scale) for e in entries[:2]] == [("enhance", 4.0)] * 2


def test_attributes_work_in_inline_config_prompts(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "pretrained_model: {name_or_path: x/y}\nprompts:\n  - {target: cat, attributes: [a, b]}\n"
    )
    assert [p.target for p in load_config(path).prompts] == ["a cat", "b cat"]
    # Roles the file left unset stay defaults: a preserve entry is not told it sets `neutral`.
    path.write_text(
        "pretrained_model: {name_or_path: x/y}\n"
        "prompts:\n  - {target: cat, action: preserve, attributes: [a]}\n  - {target: dog}\n"
    )
    config = load_config(path)
    assert (config.prompts[0].positive, config.prompts[0].neutral) == ("a cat", "a ")
    assert config.unused_settings() == []
    # a problem is named by the entry as written, not its place once attributes made two of one
    path.write_text(
        "pretrained_model: {name_or_path: x/y}\n"
        "prompts:\n  - {target: cat, attributes: [a, b]}\n  - {target: dog, guidance_scale: abc}\n"
    )
    with pytest.raises(
        ConfigError, match=r"c.yaml: prompts.2.guidance_scale: Input should be a valid number"
    ):
        load_config(path)


@pytest.mark.parametrize("value", ["'a,,b'", "[a, 3]", "{a: 1}", "[]"])
def test_bad_attributes_are_one_line_errors(tmp_path, value):
    path = tmp_path / "prompts.yaml"
    path.write_text(f"- target: cat\n- target: dog\n  attributes: {value}\n")
    with pytest.raises(ConfigError) as error:
        load_prompts(path)
    assert str(error.value).startswith(f"{path}: entry 2.attributes: ") and "\n" not in str(error.value)


def test_ai_toolkit_ui_concept_slider_maps_each_end_to_an_enhance_at_its_guidance(ai_toolkit_env, capsys):
    """ConceptSliderTrainer: the class's prediction goes to class + g (positive - negative) at +1,
    class + g (negative - positive) at -1; the anchor class is kept at both, at anchor_strength
    against the two equal losses of an end. Every key the UI writes is read or named."""
    config = load_config(DATA / "ai_toolkit_concept_slider.yaml")
    person, huge, tiny = "a person", "a person with huge eyes", "a person with tiny eyes"
    rows = {(fields(e, *POLES), e.guidance_scale, e.resolution) for e in config.prompts}
    assert rows == {
        ((person, pole, other, person, "enhance", strength), 3.0, size)
        for pole, other, strength in ((huge, tiny, 1.0), (tiny, huge, -1.0))
        for size in (16, 24)  # the datasets' resolutions
    }
    assert len(config.prompts) == 4
    # its norm_like_tensor: each end's target moved to the neutral prediction's mean and spread
    from leco.prompts import objective_of

    generator = torch.Generator().manual_seed(0)
    p = {
        role: torch.randn(1, 4, 8, 8, generator=generator)
        for role in ("neutral", "positive", "unconditional")
    }
    for entry in config.prompts:
        target = objective_of(entry).target(p, entry.guidance_scale)
        torch.testing.assert_close((target.mean(), target.std()), (p["neutral"].mean(), p["neutral"].std()))
    assert (config.anchors.prompts, config.anchors.weight) == (["a house"], 0.25)
    # the same images for both ends, as its dataset's: unguided (guided, each end's rollout would be
    # steered away from its unconditional, the other pole)
    assert (config.train.rollout_model, config.train.rollout_guidance_scale) == ("frozen", 1.0)
    assert (config.train.iterations, config.train.lr, config.train.max_denoising_steps) == (3, 1e-4, 50)
    assert (config.network.type, config.network.rank, config.network.alpha) == ("all-linear", 4, 4.0)
    assert config.save.precision == "fp16" and config.preview.prompts == ["a person, close-up"]
    warnings = capsys.readouterr().err
    assert "datasets: leco trains from the model's own images of the target class" in warnings
    assert "logging.use_ui_logger" in warnings  # only the UI's progress view


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("anchor_class: a house", "anchor_class: ''", lambda c: c.anchors.prompts == [""]),  # the UI's ""
        ("        anchor_class: a house\n", "", lambda c: c.anchors.prompts == []),  # no key: no anchor
        ("anchor_class: a house", "anchor_class: null", lambda c: c.anchors.prompts == []),  # its default
        ("guidance_strength: 3.0", "guidance_strength: 5", lambda c: c.prompts[0].guidance_scale == 5.0),
        ("arch: sd15", "arch: sdxl", lambda c: c.pretrained_model.sdxl is True),
        ("arch: sd15", "arch: sdxl\n        is_xl: false", lambda c: c.pretrained_model.sdxl is True),
        ("arch: sd15", "arch: sd2", lambda c: c.pretrained_model.v2 and c.pretrained_model.sdxl is False),
        ("      datasets:\n", "      unused_datasets:\n", None),  # none: the model's own size
        # Its trainer's step clips the gradient norm (1.0 unless set) and its loss weighs no SNR
        ("        steps: 3\n", "        steps: 3\n", lambda c: c.train.max_grad_norm == 1.0),
        (
            "        steps: 3\n",
            "        steps: 3\n        max_grad_norm: 0.05\n",
            lambda c: c.train.max_grad_norm == 0.05,
        ),
        (
            "        steps: 3\n",
            "        steps: 3\n        min_snr_gamma: 5\n",
            lambda c: c.train.min_snr_gamma is None,
        ),
        (  # an index bound of its timestep draw (its default, every timestep), not a rollout's length
            "        steps: 3\n",
            "        steps: 3\n        min_denoising_steps: 0\n        max_denoising_steps: 1000\n",
            lambda c: c.train.max_denoising_steps == 50,
        ),
    ],
)
def test_ai_toolkit_concept_slider_settings(ai_toolkit_env, old, new, expected):
    path = ai_toolkit_env / "job.yaml"
    text = (DATA / "ai_toolkit_concept_slider.yaml").read_text()
    if expected is None:  # the datasets section left out
        start, end = text.index("      datasets:\n"), text.index("      train:\n")
        text, old, new = text[:start] + text[end:], "", ""
        expected = lambda c: {e.resolution for e in c.prompts} == {None}  # noqa: E731
    path.write_text(edit(text, old, new))
    assert expected(load_config(path))


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("type: concept_slider", "type: slider", "`job: extension` are `type: concept_slider`"),
        ("job: extension", "job: train", "in a `job: train` are `type: slider`"),
        ("positive_prompt: a person with huge eyes", "positive_prompt: [a, b]", "slider.positive_prompt"),
        ("          resolution: [16, 24]", "          resolution: big", "datasets[0].resolution"),
        (
            "        guidance_strength: 3.0\n",
            "        guidance_strenght: 3.0\n",
            "did you mean 'guidance_strength'",
        ),
        ("arch: sd15", "arch: flux", "leco trains sd1, sd2 and sdxl"),
        ("arch: sd15", "arch: sd15\n        is_xl: true", "is_xl: is true but arch is 'sd15'; keep one"),
        # its timestep draw narrowed or biased (BaseSDTrainProcess): leco has no such draw
        (
            "content_or_style: balanced",
            "content_or_style: content",
            "content_or_style: 'content' (the UI's Timestep Bias) biases the",
        ),
        ("timestep_type: sigmoid", "timestep_type: two_step", "timestep_type: 'two_step' draws a few fixed"),
        (
            "        steps: 3\n",
            "        steps: 3\n        min_denoising_steps: 100\n",
            "100 narrows the timesteps",
        ),
        ("        steps: 3\n", "        steps: 3\n        max_denoising_steps: 200\n", "set 999 (or 1000)"),
        # its step scales every gradient by max_grad_norm / norm: 0 trains nothing, below 0 backwards
        ("        steps: 3\n", "        steps: 3\n        max_grad_norm: 0\n", "max_grad_norm: 0 would"),
        ("        steps: 3\n", "        steps: 3\n        max_grad_norm: -1\n", "to its opposite in"),
    ],
)
def test_ai_toolkit_concept_slider_errors_are_one_line(ai_toolkit_env, old, new, says):
    path = ai_toolkit_env / "job.yaml"
    path.write_text(edit((DATA / "ai_toolkit_concept_slider.yaml").read_text(), old, new))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    assert says in str(error.value)


# -- the ink-digits examples -------------------------------------------------------------------------------


def test_the_ink_digits_kohya_example_trains_red_at_plus_one_and_blue_at_minus_one():
    config = load_config(EXAMPLES / "slider_red_blue_kohya.yaml")
    five = "a digit five", "a digit five in red ink", "a digit five in blue ink"
    assert [fields(e, *POLES) for e in config.prompts] == slider_rows(*five, "a digit five", 1.0)
    assert {(e.resolution, e.guidance_scale) for e in config.prompts} == {(16, 2.0)}


def test_the_ink_digits_ai_toolkit_example_is_the_same_slider_at_guidance_one():
    config = load_config(EXAMPLES / "slider_red_blue_ai_toolkit.yaml")
    five = "a digit five", "a digit five in red ink", "a digit five in blue ink"
    assert [fields(e, *POLES) for e in config.prompts] == slider_rows(*five, "", 1.0)
    assert {(e.resolution, e.guidance_scale) for e in config.prompts} == {(16, 1.0)}
    assert (config.train.iterations, config.train.seed, config.pretrained_model.name_or_path) == (
        300,
        0,
        "ink-digits",
    )


def test_the_ink_digits_concept_slider_example_is_each_end_at_guidance_three():
    config = load_config(EXAMPLES / "slider_red_blue_concept.yaml")
    five, red, blue = "a digit five", "a digit five in red ink", "a digit five in blue ink"
    assert [fields(e, *POLES) for e in config.prompts] == [
        (five, red, blue, five, "enhance", 1.0),
        (five, blue, red, five, "enhance", -1.0),
    ]
    assert {(e.resolution, e.guidance_scale) for e in config.prompts} == {(16, 3.0)}
    assert (config.anchors.prompts, config.anchors.weight) == ([""], 0.5)
    assert (config.train.iterations, config.train.seed) == (300, 0)
    assert config.save.path == "output/ink-digits/red_blue_concept_slider"  # training_folder/name


# -- training smoke tests on the tiny SD1 pipeline -----------------------------------------------------------


def assert_trained_lora(path: Path) -> None:
    tensors, _ = read_lora_file(path)
    ups = [t for key, t in tensors.items() if key.endswith("lora_up.weight")]
    assert ups and all(key.startswith("lora_unet_") for key in tensors)
    assert any(torch.count_nonzero(t) for t in ups)  # kohya init is up = 0: training moved it


def test_a_kohya_slider_toml_trains_on_the_tiny_sd1_model(tmp_path, tiny_folders):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"prompts_file: {DATA / 'kohya_tiny_slider.toml'}\n"
        f"pretrained_model: {{name_or_path: {tiny_folders['sd1']}}}\n"
        "network: {rank: 2}\n"
        "train: {precision: fp32, iterations: 3, max_denoising_steps: 6, seed: 1, lr: 1e-2}\n"
        f"save: {{name: kohya_slider, path: {tmp_path / 'out'}, per_steps: 100}}\n"
    )
    result = train(config, progress=False)
    assert result.steps == 3 and result.path.name == "kohya_slider_last.safetensors"
    assert_trained_lora(result.path)


def test_an_ai_toolkit_config_trains_on_the_tiny_sd1_model(ai_toolkit_env, tiny_folders, monkeypatch):
    monkeypatch.setenv("LECO_TEST_MODEL", str(tiny_folders["sd1"]))
    result = train(DATA / "ai_toolkit_slider.yaml", progress=False)
    folder = ai_toolkit_env / "out" / "eye_size_slider"
    assert result.steps == 3 and result.path == folder / "eye_size_slider_last.safetensors"
    assert (folder / "eye_size_slider_2steps.safetensors").is_file()  # save_every: 2
    assert_trained_lora(result.path)


def test_an_ai_toolkit_ui_concept_slider_trains_on_the_tiny_sd1_model(
    ai_toolkit_env, tiny_folders, monkeypatch
):
    monkeypatch.setenv("LECO_TEST_MODEL", str(tiny_folders["sd1"]))
    result = train(DATA / "ai_toolkit_concept_slider.yaml", progress=False)
    assert result.steps == 3
    assert result.path == ai_toolkit_env / "out" / "five_red_blue" / "five_red_blue_last.safetensors"
    assert_trained_lora(result.path)


def test_kohyas_512_default_on_a_small_model_is_pointed_out(tmp_path, tiny_folders, capsys):
    toml = tmp_path / "p.toml"
    toml.write_text('[[prompts]]\ntarget = "a fox"\n[[prompts]]\ntarget = "a cat"\nresolution = 32\n')
    models = load_models(str(tiny_folders["sd1"]))
    prepare_prompts(load_prompts(toml), models, TrainConfig())
    warning = capsys.readouterr().err
    assert f"p.toml: prompts 1 train at 512x512 px; this model draws at {models.resolution} px" in warning
    assert f"set `resolution: {models.resolution}`" in warning
    prepare_prompts(load_prompts(toml)[1:], models, TrainConfig())  # its own size: nothing to say
    assert capsys.readouterr().err == ""
    written = [
        PromptSettings(target=t, resolution=512).written_at(f"p.yaml: entry {n}")
        for n, t in ((1, "a"), (3, "b"))
    ]
    prepare_prompts(written, models, TrainConfig())
    assert "p.yaml: entries 1, 3 train at 512x512 px" in capsys.readouterr().err


def test_dynamic_crops_on_a_model_without_crop_conditioning_is_named(tiny_folders, capsys):
    entries = [PromptSettings(target="a fox"), PromptSettings(target="a cat", dynamic_crops=True)]
    prepare_prompts(entries, load_models(str(tiny_folders["sd1"])), TrainConfig())
    assert (
        "prompts entry 2: dynamic_crops is SDXL's crop conditioning, which sd1 lacks"
        in capsys.readouterr().err
    )
    prepare_prompts(entries, load_models(str(tiny_folders["sdxl"])), TrainConfig())
    assert "dynamic_crops" not in capsys.readouterr().err


def test_a_kohya_toml_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    plain = load_prompts(DATA / "kohya_prompts.toml")
    marked = tmp_path / "bom.toml"
    marked.write_bytes(b"\xef\xbb\xbf" + (DATA / "kohya_prompts.toml").read_bytes())
    for name in ("kohya_neutrals.txt", "kohya_more_neutrals.txt"):  # the neutral files it names
        (tmp_path / name).write_bytes((DATA / name).read_bytes())
    assert load_prompts(marked) == plain


def test_prompts_longer_than_the_tokenizer_reads_are_named_once(tiny_folders, capsys):
    models = load_models(str(tiny_folders["sd1"]))
    limit = models.tokenizers[0].model_max_length
    long_one, long_two = "red " * (limit + 5), "blue " * (limit + 5)
    encode_texts(models, ["a fox", long_one], None, "cpu")
    assert f"prompt {long_one[:40]!r}... is longer than {limit} tokens" in capsys.readouterr().err
    encode_texts(models, ["a fox", long_one, long_two], None, "cpu")
    warning = capsys.readouterr().err
    assert warning.count("leco: warning:") == 1 and f"2 prompts are longer than {limit} tokens" in warning
    encode_texts(models, ["a fox"], None, "cpu")
    assert capsys.readouterr().err == ""


def test_prompts_in_a1111_syntax_are_named_as_read_as_plain_words(tiny_folders, capsys):
    """A prompt pasted from A1111 keeps its emphasis and LoRA tags; diffusers reads them as words."""
    models = load_models(str(tiny_folders["sd1"]))
    encode_texts(models, ["a (red:1.2) fox", "a (blue:0.8) fox", "((masterpiece)), a fox"], None, "cpu")
    warning = capsys.readouterr().err
    assert warning.count("A1111's emphasis") == 2  # one line per kind, naming one prompt
    assert re.search(r"'\((red:1\.2|blue:0\.8)\)' is A1111's emphasis", warning)
    assert "(and 1 more prompts)" in warning and "'((' is A1111's emphasis" in warning
    encode_texts(models, ["a fox <lora:styles:0.7>"], None, "cpu")
    assert "'<lora:styles:0.7>' is an A1111 LoRA tag" in capsys.readouterr().err
    encode_texts(models, ["a fox (snow)", "ratio 3:2 (wide)", "a [small] fox", "a photo (16:9)"], None, "cpu")
    assert "A1111" not in capsys.readouterr().err  # plain brackets and colons are ordinary text


def test_a_listed_target_is_read_in_place_not_copied_per_prompt():
    # role_text() indexes targets once per prompt; a copy each time made a long target_file quadratic.
    entry = PromptSettings(target=["a fox", "a cat"], neutral=["an animal", "a pet"])
    assert entry.targets is entry.target
    assert [entry.role_text("positive", i) for i in range(2)] == ["a fox", "a cat"]
    assert [entry.role_text("neutral", i) for i in range(2)] == ["an animal", "a pet"]


def test_a_leco_config_given_as_a_prompts_file_is_named_as_such(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("pretrained_model: {name_or_path: ink-digits}\nprompts:\n  - target: a digit seven\n")
    with pytest.raises(
        ConfigError, match=r"is a leco config, not a prompts file; run it as `leco train .*prompts.yaml`"
    ):
        load_prompts(path)


def test_a_misspelt_attributes_key_is_named_with_the_keys_an_entry_takes(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("- target: cat\n  atributes: male, female\n")
    with pytest.raises(
        ConfigError, match=r"entry 1.atributes: unknown key; did you mean 'attributes'\?.*attributes"
    ):
        load_prompts(path)

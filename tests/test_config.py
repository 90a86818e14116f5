import re
import shutil
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from leco.config import (
    ConfigError,
    LecoConfig,
    NetworkConfig,
    PromptSettings,
    describe_validation_error,
    load_config,
    load_prompts,
    parse_optimizer_args,
    read_yaml,
)
from leco.evaluate import load_spec
from leco.preservation import entries_and_anchors

DATA = Path(__file__).parent / "data" / "reference_style"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


MINIMAL = "prompts_file: prompts.yaml\npretrained_model:\n  name_or_path: some/model\n"


@pytest.fixture
def folder(tmp_path):
    write(tmp_path, "prompts.yaml", "- target: van gogh\n")
    return tmp_path


def test_arguments_yaml_reads_as_text_are_read_as_the_numbers_written(folder):
    text = MINIMAL + (
        "train:\n  optimizer_args:\n    eps: 1e-8\n    weight_decay: 1e-2\n    betas: (0.9, 0.99)\n"
        "    foreach: no\n  lr_scheduler: polynomial\n  lr_scheduler_args: {power: 2, lr_end: 1e-7}\n"
    )
    config = load_config(write(folder, "c.yaml", text))
    assert config.train.optimizer_args == {
        "eps": 1e-8,
        "weight_decay": 0.01,
        "betas": [0.9, 0.99],
        "foreach": False,
    }
    assert config.train.lr_scheduler_args == {"power": 2, "lr_end": 1e-7}
    flow = MINIMAL + "train:\n  optimizer_args: {eps: 1e-8, betas: (0.9, 0.99)}\n"
    with pytest.raises(ConfigError, match=r"'\(0\.9' is half a list .* write betas: \[0\.9, 0\.99\]"):
        load_config(write(folder, "flow.yaml", flow))


def test_reference_style_files_load_with_their_meaning():
    config = load_config(DATA / "config.yaml")
    assert config.pretrained_model.v2 is True and config.pretrained_model.v_pred is True
    assert config.pretrained_model.clip_skip == 2
    assert (config.network.type, config.network.rank, config.network.alpha) == ("c3lier", 8, 4.0)
    assert config.network.training_method == "xattn"
    assert config.train.precision == "bf16"  # bfloat16 is normalised
    assert config.train.optimizer == "adamw"  # case-insensitive as in the reference tool
    assert config.train.optimizer_args == {"weight_decay": 0.01, "betas": (0.9, 0.99)}
    assert config.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string
    assert config.train.noise_scheduler == "euler_a"
    assert (config.train.resolution, config.train.batch_size) == (768, 2)
    assert config.train.max_denoising_steps == 40
    assert config.save.precision == "fp16"
    assert config.other.use_xformers is True
    first, second, third = config.prompts
    assert first.target == first.positive == "monet" and first.batch_size == 2
    assert second.positive == "1girl, cat ears" and second.neutral == "" and second.action == "enhance"
    assert second.guidance_scale == 2.0 and second.dynamic_crops is True
    assert third.target == third.positive == "7" and third.unconditional == third.neutral == ""
    assert third.action == "erase" and third.guidance_scale == 1.0


def test_prompt_defaults_follow_the_reference_rules(tmp_path):
    path = write(tmp_path, "p.yaml", "- target: a\n  unconditional: u\n- target: b\n  neutral: n\n")
    a, b = load_prompts(path)
    assert (a.positive, a.unconditional, a.neutral) == ("a", "u", "u")
    assert (b.positive, b.unconditional, b.neutral) == ("b", "", "n")


def test_new_keys_have_defaults(folder):
    config = load_config(write(folder, "c.yaml", MINIMAL))
    assert config.network.training_method == "full" and config.train.seed is None
    assert config.train.device == "auto" and config.train.samples_per_rollout >= 1
    assert config.train.max_denoising_steps == 50 and config.train.rollout_guidance_scale == 3.0


def test_prompts_file_is_resolved_next_to_the_config_first(tmp_path, monkeypatch, capsys):
    (tmp_path / "cfg").mkdir()
    write(tmp_path / "cfg", "prompts.yaml", "- target: near\n")
    write(tmp_path, "prompts.yaml", "- target: cwd\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(write(tmp_path / "cfg", "c.yaml", MINIMAL)).prompts[0].target == "near"
    # the reference tool reads the working directory's: the choice is said
    assert "prompts.yaml, in the working directory, is another file of that name" in capsys.readouterr().err
    write(tmp_path, "prompts.yaml", "- target: near\n")  # a copy: nothing to tell apart
    load_config(tmp_path / "cfg" / "c.yaml")
    assert capsys.readouterr().err == ""


def test_a_utf16_config_is_told_to_be_saved_as_utf8(tmp_path):
    # Windows editors save "Unicode" as UTF-16 with a byte-order mark
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL, encoding="utf-16")
    with pytest.raises(
        ConfigError, match=r"c.yaml: cannot be read as UTF-8 text: it is UTF-16; save it again"
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("encoding", "said"),
    [
        ("utf-32", "cannot be read as UTF-8 text: it is UTF-32; save it again as UTF-8"),
        ("utf-16-le", "holds NUL bytes: UTF-16 or UTF-32 text, or not a text file; save it as UTF-8"),
    ],
)
def test_wide_text_without_or_with_another_mark_is_named_too(tmp_path, encoding, said):
    path = tmp_path / "c.yaml"
    path.write_bytes(MINIMAL.encode(encoding))  # utf-16-le: no byte-order mark, every other byte NUL
    with pytest.raises(ConfigError, match=re.escape(f"c.yaml: {said}")):
        load_config(path)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (
            "a digit seven\n".encode("utf-16"),
            "sevens.txt cannot be read as UTF-8 text: it is UTF-16; save it",
        ),
        (
            "caf\u00e9 au lait\n".encode("latin-1"),
            "sevens.txt cannot be read as UTF-8 text (UnicodeDecodeError)",
        ),
    ],
)
def test_a_prompt_list_that_is_not_utf8_is_one_line(folder, data, said):
    (folder / "sevens.txt").write_bytes(data)
    write(folder, "prompts.yaml", "- target_file: sevens.txt\n")
    with pytest.raises(ConfigError) as caught:
        load_config(write(folder, "c.yaml", MINIMAL))
    assert said in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_the_reference_tools_first_prompt_key_for_dynamic_resolution_still_loads(tmp_path):
    # p1atdev/LECO's example prompts.yaml of its first releases named dynamic_resolution `bucketing`
    text = "- target: van gogh\n  resolution: 512\n  bucketing: {}\n  batch_size: 2\n"
    for value in ("false", "true"):
        (entry,) = load_prompts(write(tmp_path, "p.yaml", text.format(value)))
        assert entry.dynamic_resolution is (value == "true")
    with pytest.raises(ConfigError, match=r"entry 1.bucketing: the reference tool's old name for dynamic_"):
        load_prompts(write(tmp_path, "p.yaml", text.format("true") + "  dynamic_resolution: false\n"))
    for same in ("'True'", "'on'", "'yes'", "1"):  # each reads as true for the field itself: no conflict
        (entry,) = load_prompts(
            write(tmp_path, "p.yaml", text.format("true") + f"  dynamic_resolution: {same}\n")
        )
        assert entry.dynamic_resolution is True


def test_prompts_file_falls_back_to_the_working_directory(tmp_path, monkeypatch):
    # The reference tool's own examples say prompts_file: ./examples/prompts.yaml, run from the repo root.
    shutil.copytree(DATA, tmp_path / "examples")
    text = (DATA / "config.yaml").read_text().replace("./prompts.yaml", "./examples/prompts.yaml")
    write(tmp_path / "examples", "config.yaml", text)
    monkeypatch.chdir(tmp_path)
    assert load_config("examples/config.yaml").prompts[0].target == "monet"


def test_empty_sections_mean_defaults(folder):
    config = load_config(write(folder, "c.yaml", MINIMAL + "train:\nsave:\nlogging:\nother:\n"))
    assert config.train.iterations == 500 and config.save.name == "untitled"


def test_anchors_auto_in_any_case(tmp_path):
    text = MINIMAL + "anchors: {prompts: ' Auto'}\n"
    write(tmp_path, "prompts.yaml", "- target: a\n")
    assert load_config(write(tmp_path, "c.yaml", text)).anchors.prompts == "auto"


def test_inline_prompts_are_accepted(tmp_path):
    text = "pretrained_model: {name_or_path: x/y}\nprompts:\n  - target: cat\n    action: enhance\n"
    assert load_config(write(tmp_path, "c.yaml", text)).prompts[0].action == "enhance"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "train:\n  guidance: 4\n", ["train.guidance: unknown key", "rollout_guidance_scale"]),
        (MINIMAL + "netwrok:\n  rank: 4\n", ["netwrok: unknown key", "did you mean 'network'"]),
        (MINIMAL + "train:\n  iterations: many\n", ["train.iterations:", "valid integer", "'many'"]),
        (MINIMAL + "train:\n  precision: fp8\n", ["train.precision:", "'fp8' is not allowed", "'bf16'"]),
        (MINIMAL + "network:\n  training_method: xatn\n", ["network.training_method:", "'xattn'"]),
        (MINIMAL + "train:\n  device: gpu\n", ["train.device:", "cuda"]),
        (MINIMAL + "train:\n  optimizer_args: '=3'\n", ["train.optimizer_args:", "key=value"]),
        (MINIMAL + "save:\n  name: a/b\n", ["save.name:", "plain file name"]),
        (
            "pretrained_model:\n  v2: true\nprompts_file: prompts.yaml\n",
            ["pretrained_model.name_or_path", "missing"],
        ),
        ("prompts_file: nowhere.yaml\npretrained_model: {name_or_path: x}\n", ["prompts_file:", "not found"]),
        ("pretrained_model: {name_or_path: x}\n", ["prompts_file: missing"]),
        ("pretrained_model: {name_or_path: x}\nprompts: []\n", ["prompts: an empty list", "- target:"]),
        ("pretrained_model: {name_or_path: x}\nprompts_file: /\n", ["prompts_file: / is a folder"]),
        (
            "pretrained_model: {name_or_path: x}\nprompts_file: ''\n",
            ["prompts_file: empty; name the prompts"],
        ),
        (MINIMAL + "train:\n  optimizer_args: {lr: 1}\n", ["optimizer_args:", "set train.lr instead"]),
        (MINIMAL + "train:\n  lr_warmup_steps: 0.25\n", ["lr_warmup_steps:", "a share of the run, as kohya"]),
        (MINIMAL + "train:\n  optimizer_args: 'params=1'\n", ["optimizer_args:", "params is not"]),
        ("train: [1, 2\n", ["line", "invalid YAML"]),
        ("- just\n- a list\n", ["must be a YAML mapping"]),
        (
            MINIMAL + "train:\n  iterations: 2\ntrain:\n  iterations: 3000\n",
            ["line", "'train' appears twice in one mapping; keep one"],
        ),
        (MINIMAL + "train:\n  lr: 1e-3\n  lr: 1e-4\n", ["'lr' appears twice"]),
        (MINIMAL + "train:\n  iterations: true\n", ["train.iterations: true/false, which", "quote"]),
        (
            MINIMAL + "iterations: 3\n",
            ["iterations: unknown key; it belongs under train: (train.iterations)"],
        ),
        (
            MINIMAL + "anchors:\n  prompts: a digit three\n",
            ["anchors.prompts: ", "give a list of prompts", "or auto", "(got 'a digit three')"],
        ),
        (MINIMAL + "train:\n  save: {name: x}\n", ["train.save: unknown key; it belongs at the top level"]),
        # another trainer's names are pointed to leco's, not to a near spelling ("lr_warmup_steps")
        (MINIMAL + "train:\n  steps: 500\n", ["train.steps: unknown key; leco calls it train.iterations;"]),
        (MINIMAL + "learning_rate: 1e-4\n", ["learning_rate: unknown key; leco calls it train.lr;"]),
        (
            MINIMAL + "save:\n  save_every: 50\n",
            ["save.save_every: unknown key; leco calls it save.per_steps"],
        ),
        # a key of another section, in a section
        (
            MINIMAL + "train:\n  use_tensorboard: true\n",
            ["train.use_tensorboard: unknown key; it belongs under logging: (logging.use_tensorboard)"],
        ),
        (MINIMAL + "preview:\n  prompts: [a]\n  strengths: [.inf]\n", ["preview.strengths.1:", "finite"]),
        (MINIMAL + "preview:\n  prompts: [a]\n  seeds: [-1]\n", ["preview.seeds.1:"]),
        # a grid has one row or column per value: a repeat would be drawn once, silently
        (
            MINIMAL + "preview:\n  prompts: [a]\n  strengths: [1, 1.0]\n",
            ["preview.strengths: 1.0 is listed twice"],
        ),
        (MINIMAL + "preview:\n  prompts: [a]\n  seeds: [0, 0]\n", ["preview.seeds: 0 is listed twice"]),
        (MINIMAL + "preview:\n  prompts: [a b, 'A  b']\n", ["preview.prompts: 'A  b' is listed twice"]),
        (MINIMAL + "train:\n  lr: .inf\n", ["train.lr:", "finite"]),
        (MINIMAL + "network:\n  alpha: .inf\n", ["network.alpha:", "finite"]),
        (MINIMAL + "anchors:\n  prompts: [a]\n  weight: .inf\n", ["anchors.weight:", "finite"]),
        (MINIMAL + "anchors:\n  prompts: [a]\n  text_weight: .inf\n", ["anchors.text_weight:", "finite"]),
        (MINIMAL + "train:\n  max_grad_norm: .inf\n", ["train.max_grad_norm:", "finite"]),
        (MINIMAL + "anchors:\n  prompts: auto\n  exclude: ['7', ' ']\n", ["anchors.exclude:", "empty entry"]),
        (
            MINIMAL + "preview:\n  prompts: [a]\n  steps: 2000\n",
            ["preview.steps:", "less than or equal to 1000"],
        ),
        (MINIMAL + "save:\n  name: '..'\n", ["save.name:", "plain file name"]),
        (MINIMAL + 'save:\n  name: "a\\0b"\n', ["save.name:", "without control characters"]),
        (MINIMAL + 'save:\n  name: "a\\tb"\n', ["save.name:", "without control characters"]),
        (MINIMAL + 'save:\n  name: " "\n', ["save.name:", "starts or ends with spaces"]),
        (MINIMAL + f"save:\n  name: {'n' * 201}\n", ["save.name:", "is 201 bytes long; use at most 200"]),
        (
            MINIMAL + "train:\n  seed: 99999999999999999999999\n",
            ["train.seed:", "less than 9223372036854775808"],
        ),
        (MINIMAL + "train:\n  seed: -2\n", ["train.seed:", "greater than or equal to -1"]),
        (MINIMAL + "train:\n  max_denoising_steps: 1001\n", ["train.max_denoising_steps:", "1000"]),
        (
            MINIMAL + "network:\n  type: embedding\n  token: <x>\n  init_text: ''\n",
            ["network.init_text: empty; give the text whose vectors the token starts from"],
        ),
    ],
)
def test_bad_config_gives_one_clear_line(folder, text, expected):
    path = write(folder, "c.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message, message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- target: a\n  guidance: 3\n", ["entry 1.guidance: unknown key", "guidance_scale"]),
        ("- positive: a\n", ["entry 1.target: required key is missing"]),
        ("- targets: a\n", ["entry 1.targets: unknown key; did you mean 'target'?"]),  # not also "missing"
        ("- target: a\n  action: delete\n", ["entry 1.action:", "'erase'"]),
        ("- target: a\n- target: b\n  batch_size: 0\n", ["entry 2.batch_size:"]),
        ("[]\n", ["non-empty YAML list"]),
        ("- just text\n", ["a list of texts, not of entries", "(- target: just text)"]),
        ("- target: a\n- just text\n", ["entry 2: must be a mapping"]),
        ("a digit seven\na digit three\n", ["holds prompts but no entries", "- target_file: prompts.yaml"]),
        ("- target: a\n  target: b\n", ["'target' appears twice"]),
        ("- target: a\n  resolution: big\n", ["entry 1.resolution: ", "(got 'big')"]),  # one line, two forms
        ("- target: a\n  guidance_scale: .inf\n", ["entry 1.guidance_scale:", "finite"]),
        ("- target: a\n  guidance_scale: 1e30\n", ["entry 1.guidance_scale:", "less than or equal to 100"]),
        ("- target: a\n  weight: .inf\n", ["entry 1.weight:", "finite"]),
        ("- target: a\n  multiplier: .nan\n", ["entry 1.multiplier:", "finite"]),
    ],
)
def test_bad_prompts_give_one_clear_line(folder, text, expected):
    write(folder, "prompts.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(write(folder, "c.yaml", MINIMAL))
    message = str(caught.value)
    assert message.startswith(str(folder / "prompts.yaml")) and "\n" not in message, message
    for part in expected:
        assert part in message, message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.yaml")


def test_optimizer_args_reference_string():
    assert parse_optimizer_args("d_coef=2 decouple=True use_bias_correction=False") == {
        "d_coef": 2,
        "decouple": True,
        "use_bias_correction": False,
    }
    assert parse_optimizer_args("") == {}


def test_config_round_trips_through_json(folder):
    config = load_config(write(folder, "c.yaml", MINIMAL))
    assert LecoConfig.model_validate_json(config.to_json()) == config


KEYS = [
    "prompts_file",
    "pretrained_model",
    "name_or_path",
    "network",
    "train",
    "save",
    "logging",
    "other",
    "type",
    "rank",
    "alpha",
    "precision",
    "iterations",
    "lr",
    "target",
    "prompts",
    "v2",
    "guidance",
]
scalars = (
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(KEYS) | st.text(string.ascii_letters, max_size=6), children, max_size=5
        )
    ),
    max_leaves=20,
)

TRAIN_KEYS = [
    "iterations",
    "lr",
    "precision",
    "optimizer",
    "optimizer_args",
    "lr_scheduler",
    "seed",
    "device",
]
near_valid = st.fixed_dictionaries(
    {
        "prompts_file": st.just("prompts.yaml") | scalars,
        "pretrained_model": st.dictionaries(
            st.sampled_from(["name_or_path", "v2", "v_pred", "clip_skip"]), scalars
        ),
        "train": st.dictionaries(st.sampled_from(TRAIN_KEYS), scalars | documents),
        "network": st.dictionaries(st.sampled_from(["type", "rank", "alpha", "training_method"]), scalars),
    }
)
# Mostly valid: so that the success path (and what it asserts) is reached, not only the errors.
likely_valid = st.fixed_dictionaries(
    {
        "prompts_file": st.just("prompts.yaml"),
        "pretrained_model": st.fixed_dictionaries({"name_or_path": st.text(min_size=1, max_size=12)}),
        "train": st.fixed_dictionaries(
            {},
            optional={
                "iterations": st.integers(1, 10_000),
                "lr": st.floats(1e-7, 1.0) | st.sampled_from(["1e-4", "3e-3"]),
                "precision": st.sampled_from(["fp32", "bf16", "float16", "half"]),
                "optimizer_args": st.sampled_from(["weight_decay=0.01 betas=(0.9,0.99)", {"eps": 1e-8}]),
                "seed": st.none() | st.integers(0, 2**31),
            },
        ),
        "network": st.fixed_dictionaries(
            {}, optional={"rank": st.integers(1, 64), "alpha": st.floats(0, 64), "type": st.just("c3lier")}
        ),
    }
)
valid_prompts = st.lists(
    st.fixed_dictionaries(
        {"target": st.text(min_size=1, max_size=12)},
        optional={"action": st.sampled_from(["erase", "enhance"]), "guidance_scale": st.floats(0, 10)},
    ),
    min_size=1,
    max_size=3,
)
prompt_lists = st.lists(
    st.dictionaries(
        st.sampled_from(["target", "positive", "action", "guidance_scale", "batch_size"]), scalars
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents | near_valid | likely_valid, prompts=documents | prompt_lists | valid_prompts)
def test_any_yaml_document_gives_a_config_or_a_config_error(folder, document, prompts):
    config_path = folder / "fuzz.yaml"
    config_path.write_text(yaml.safe_dump(document))
    (folder / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    try:
        config = load_config(config_path)
    except ConfigError as error:
        assert str(error).startswith(str(folder))
        return
    event("loaded a config")
    assert_usable(config)
    model = document.get("pretrained_model") if isinstance(document, dict) else None
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        assert config.pretrained_model.name_or_path == model["name_or_path"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_any_text_gives_a_config_or_a_config_error(folder, text):
    path = folder / "raw.yaml"
    path.write_text(text)
    try:
        config = load_config(path)
    except ConfigError as error:
        assert str(error).startswith(str(path))
        return
    assert_usable(config)


def assert_usable(config: LecoConfig) -> None:
    """What every loaded config must be: prompts with targets, and a JSON form that is a fixed point
    (a resumed run compares the JSON of its sections with the saved run's)."""
    assert config.prompts and all(prompt.targets for prompt in config.prompts)
    assert LecoConfig.model_validate_json(config.to_json()).to_json() == config.to_json()


def test_the_readme_config_reference_is_a_valid_config(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(# config\.yaml.*?)```", readme, flags=re.S)
    prompts = re.findall(r"```yaml\n(# prompts\.yaml.*?)```", readme, flags=re.S)
    assert len(blocks) == 1 and len(prompts) == 1
    (tmp_path / "config.yaml").write_text(blocks[0])
    (tmp_path / "prompts.yaml").write_text(prompts[0])
    config = load_config(tmp_path / "config.yaml")
    assert config.prompts[0].target == "van gogh" and config.anchors.prompts == ["monet", "a photo of a dog"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_file_loads(path):
    if path.stem.endswith("_eval"):
        spec = load_spec(path)
        assert spec.erase or spec.keep or spec.enhance
    elif path.stem.endswith("_prompts"):
        assert load_prompts(path)
    else:
        config = load_config(path)
        assert config.prompts and config.save.name


def test_an_entry_names_many_prompts_by_list_or_file(folder):
    # A BOM and Windows line ends, as Notepad writes: the comment stays a comment.
    (folder / "sevens.txt").write_bytes(
        "\ufeff# the erased prompts\r\na digit seven\r\n\r\nthe number 7\r\n".encode()
    )
    write(
        folder,
        "prompts.yaml",
        "- target_file: sevens.txt\n"
        "- target: [a cat, a dog]\n  neutral: [an animal, a pet]\n  action: enhance\n",
    )
    config = load_config(write(folder, "c.yaml", MINIMAL))
    files, listed = config.prompts
    assert (
        files.targets == ["a digit seven", "the number 7"]
        and files.role_text("positive", 1) == "the number 7"
    )
    assert [listed.role_text("neutral", i) for i in (0, 1)] == ["an animal", "a pet"]
    assert listed.role_text("unconditional", 1) == ""


@pytest.mark.parametrize(
    ("prompts", "files", "expected"),
    [
        ("- target_file: absent.txt\n", {}, "entry 1.target_file: "),
        ("- target_file: empty.txt\n", {"empty.txt": "# nothing\n\n"}, "holds no prompt"),
        ("- target_file: a.txt\n  target: x\n", {"a.txt": "x\n"}, "entry 1.target_file: target is set too"),
        ("- target: []\n", {}, "entry 1.target: is an empty list"),
        ("- target_file: prompts.yaml\n", {}, "prompts.yaml is a yaml file; name a text file"),
        ("- target_file: .\n", {}, "is a folder; name the text file"),
        ("- target_file: ''\n", {}, "entry 1.target_file: empty; name the text file"),
        ("- target_file:\n", {}, "entry 1.target_file: empty; name the text file"),
        ("- target: [a, b]\n  neutral: [c]\n", {}, "entry 1.neutral: a list of 1 prompts, but target has 2"),
        ("- target: a\n  action: distill\n", {}, "entry 1.guidance_scale: distill needs the CFG scale"),
        (
            "- target: a\n  action: distill\n  guidance_scale: 3\n  multiplier: -1\n",
            {},
            "entry 1.multiplier: -1, but a distilled LoRA is used at strength 1",
        ),
        ("- target: ''\n", {}, "entry 1.target: '': positive reads as unconditional and neutral as target"),
        ("- target: a\n  neutral: a\n  unconditional: a\n", {}, "leaves erase nothing to learn"),
        (
            "- target: [a digit seven, '']\n",
            {},
            "entry 1.target: '' (prompt 2 of the list): positive reads",
        ),
        ("- target: ''\n  action: distill\n  guidance_scale: 3\n", {}, "distill has nothing to learn"),
        (  # CLIP reads both the same: lower case, spaces collapsed
            "- target: a digit three\n  unconditional: 'A Digit  Three '\n"
            "  action: distill\n  guidance_scale: 3\n",
            {},
            "distill has nothing to learn",
        ),
        ("- target: [[a, b]]\n", {}, "entry 1.target.1: Input should be a valid string"),  # each form fails
        ("- target: [a, [b]]\n", {}, 'entry 1.target.2: Input should be a valid string (got ["b"])'),
        (
            "- target: [a, b]\n  unconditional: b\n  action: distill\n  guidance_scale: 3\n",
            {},
            "prompts.yaml: entry 1: target 'b' (prompt 2 of the list): its prompt and unconditional are",
        ),
    ],
)
def test_bad_prompt_lists_are_one_line(folder, prompts, files, expected):
    for name, text in files.items():
        write(folder, name, text)
    write(folder, "prompts.yaml", prompts)
    with pytest.raises(ConfigError) as caught:
        load_config(write(folder, "c.yaml", MINIMAL))
    message = str(caught.value)
    assert message.startswith(str(folder)) and "\n" not in message and expected in message, message


def test_an_entry_written_as_its_text_alone_is_shown_in_its_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("pretrained_model: {name_or_path: ink-digits}\nprompts: [a digit seven]\n")
    with pytest.raises(
        ConfigError, match=r"prompts.1: .*write e.g. prompts.1: \{target: \"a digit seven\"\}$"
    ):
        load_config(config)
    for kind in ("erase", "keep", "enhance"):
        spec = tmp_path / "spec.yaml"
        spec.write_text(f"{kind}: [a digit three]\n")
        expected = rf"{kind}.1: .*write e.g. {kind}.1: \{{prompt: \"a digit three\", concept: "
        with pytest.raises(ConfigError, match=expected):
            load_spec(spec)


def test_distill_between_equal_prompts_learns_only_from_a_teacher():
    entry = {
        "target": "a digit three",
        "unconditional": "a digit three",
        "action": "distill",
        "guidance_scale": 3,
    }
    document = {"pretrained_model": {"name_or_path": "ink-digits"}, "prompts": [entry]}
    with pytest.raises(
        ConfigError, match="prompts entry 1: target 'a digit three': its prompt and unconditional"
    ):
        LecoConfig.model_validate(document).check_combination()
    # with a teacher the target is the teacher's prediction for the prompt, which the student learns
    LecoConfig.model_validate({**document, "teacher": {"name_or_path": "ink-digits-2"}}).check_combination()


def test_imitate_without_a_teacher_is_one_line():
    config = LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": "ink-digits"},
            "prompts": [{"target": "x", "action": "imitate"}],
        }
    )
    with pytest.raises(ConfigError, match=r"^prompts entry 1: action imitate copies a teacher model's"):
        config.check_combination()
    empty = LecoConfig.model_validate({**config.model_dump(exclude_unset=True), "teacher": None})
    with pytest.raises(
        ConfigError, match=r"prediction; teacher: is empty; give teacher.name_or_path \(or use"
    ):
        empty.check_combination()  # `teacher:` written with nothing under it is not a section to add


@pytest.mark.parametrize(
    ("network", "anchors", "expected"),
    [
        (
            {},
            {"prompts": ["a house"], "per_step": 0},
            r"^anchors.per_step: 0 keeps no anchor at all; set anchors.text_weight",
        ),
        (
            {"training_method": "noxattn"},
            {"prompts": ["a house"], "text_weight": 1},
            r"^anchors.text_weight: keeps the cross-attention keys and values, which training_method noxattn",
        ),
        (
            {"type": "embedding", "token": "<no-x>"},
            {"prompts": ["a house"], "text_weight": 1},
            r"^anchors.text_weight: a negative embedding",
        ),
    ],
)
def test_anchor_combinations_that_keep_nothing_are_one_line(network, anchors, expected):
    config = LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": "ink-digits"},
            "prompts": [{"target": "x"}],
            "network": network,
            "anchors": anchors,
        }
    )
    with pytest.raises(ConfigError, match=expected):
        config.check_combination()
    anchors["text_weight"], network = 2.0, {}
    LecoConfig.model_validate(  # with a text weight and a LoRA, both are fine
        {
            "pretrained_model": {"name_or_path": "ink-digits"},
            "prompts": [{"target": "x"}],
            "network": network,
            "anchors": anchors,
        }
    ).check_combination()


def test_yaml_merge_keys_may_still_be_overridden(folder):
    """`<<:` merges are how YAML shares settings; overriding a merged key is not a duplicate."""
    text = MINIMAL + "x_shared: &s {iterations: 7, lr: 0.01}\ntrain:\n  <<: *s\n  iterations: 9\n"
    with pytest.raises(ConfigError, match="x_shared: unknown key"):  # the YAML itself reads fine
        load_config(write(folder, "c.yaml", text))
    # A mapping that merges and overrides, merged again elsewhere (PyYAML rewrites it in place).
    nested = "base: &b {k: 1, z: 0}\na: {x: &m {<<: *b, k: 2}}\nb: {<<: *m}\n"
    assert read_yaml(write(folder, "n.yaml", nested)) == yaml.safe_load(nested)


def test_a_run_whose_every_entry_weighs_0_is_refused():
    entries = [{"target": "x", "weight": 0}, {"target": "y", "weight": 0}]
    config = LecoConfig.model_validate(
        {"pretrained_model": {"name_or_path": "ink-digits"}, "prompts": entries}
    )
    with pytest.raises(ConfigError, match="every entry has weight 0, so the loss is 0"):
        config.check_combination()
    entries[1]["weight"] = 0.5  # one weighing entry is enough, and the other is said to waste steps
    config = LecoConfig.model_validate(
        {"pretrained_model": {"name_or_path": "ink-digits"}, "prompts": entries}
    )
    config.check_combination()
    assert config.unused_settings() == [
        "prompts entry 1: weight 0 adds nothing to the loss, yet the entry still takes its share of the "
        "steps (training nothing); remove it to give them to the others"
    ]


def test_an_eval_spec_given_to_train_and_a_config_given_to_eval_say_so():
    from leco.evaluate import load_spec

    examples = Path(__file__).resolve().parent.parent / "examples" / "ink-digits"
    with pytest.raises(
        ConfigError, match=r"erase_seven_eval.yaml: this is an eval spec \(.*\), not a training config"
    ):
        load_config(examples / "erase_seven_eval.yaml")
    with pytest.raises(ConfigError, match=r"erase_seven.yaml: this is a training config, not an eval spec"):
        load_spec(examples / "erase_seven.yaml")
    for toml in examples.glob("*.toml"):  # kohya's prompt files (one read as a YAML string before)
        with pytest.raises(
            ConfigError, match=rf"{toml.name}: a TOML file .* is for training, not an eval spec"
        ):
            load_spec(toml)


@pytest.mark.parametrize("method", ["leco", "closed_form"])
def test_only_preserve_entries_are_refused_as_changing_nothing(method):
    config = LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": "ink-digits"},
            "prompts": [
                {"target": "a digit seven", "action": "preserve"},
                {"target": "red ink", "action": "preserve"},
            ],
            "network": {"training_method": "xattn-strict"},
            "train": {"method": method},
        }
    )
    with pytest.raises(
        ConfigError, match="prompts: every entry is action preserve, which keeps things as they are"
    ):
        config.check_combination()


def test_steps_per_forward_above_one_for_a_negative_embedding_is_one_line():
    def config(train):
        return LecoConfig.model_validate(
            {
                "pretrained_model": {"name_or_path": "ink-digits"},
                "prompts": [{"target": "x"}],
                "network": {"type": "embedding", "token": "<no-x>"},
                "train": train,
            }
        )

    with pytest.raises(ConfigError, match=r"^train.steps_per_forward: a negative embedding trains one step"):
        config({"steps_per_forward": 4}).check_combination()
    config({}).check_combination()  # the default: one step per forward
    config({"steps_per_forward": 1}).check_combination()


def test_a_negative_embeddings_previews_are_without_and_with_its_token():
    def config(preview):
        return LecoConfig.model_validate(
            {
                "pretrained_model": {"name_or_path": "ink-digits"},
                "prompts": [{"target": "x"}],
                "network": {"type": "embedding", "token": "<no-x>"},
                "preview": preview,
            }
        )

    default = config({"prompts": ["a digit seven"]})
    default.check_combination()
    assert default.preview.strengths == [0.0, 1.0]  # not the LoRA default's -1, which would draw 1 again
    with pytest.raises(ConfigError, match=r"^preview.strengths: a negative embedding is previewed without"):
        config({"prompts": ["a digit seven"], "strengths": [0, 0.5]}).check_combination()
    config({"prompts": ["a digit seven"], "strengths": [1]}).check_combination()


@pytest.mark.parametrize("token", ["<no\tx>", "<no-x>\n", " <no-x>", "<no x>"])
def test_an_embedding_token_with_whitespace_is_one_line(token):
    with pytest.raises(ValidationError, match="network.token: .* must be one word without spaces"):
        NetworkConfig.model_validate({"type": "embedding", "token": token})


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"network": {"type": "embedding", "token": "<x>", "rank": 16}}, "network.rank: a LoRA's settings"),
        (
            {"network": {"token": "<x>", "vectors": 3}},
            "network.token, network.vectors: only for network.type",
        ),
        (
            {"network": {"conv_rank": 8, "conv_alpha": 4}},
            "network.conv_alpha, network.conv_rank: only for c3lier",
        ),
        (
            {"network": {"type": "c3lier", "training_method": "xattn", "conv_rank": 4}},
            "network.type: c3lier adds the convolutions, which training_method xattn never chooses: the "
            "file is what lierla makes, and conv_rank / conv_alpha are ignored",
        ),
        ({"closed_form": {"preserve_scale": 5}}, "closed_form: only for train.method: closed_form"),
        (
            {"anchors": {"prompts": ["a"], "exclude": ["three"]}},
            "anchors.exclude: only for anchors.prompts: auto",
        ),
        ({"preview": {"strengths": [-1, 1]}}, "preview.strengths: preview.prompts is empty"),
        (
            {"train": {"method": "closed_form"}, "network": {"rank": 4, "alpha": 1}},
            "network.alpha: a closed-form edit is solved at scale 1 (alpha = rank)",
        ),
        (
            {
                "train": {"method": "closed_form"},
                "prompts": [{"target": "x", "guidance_scale": 1, "weight": 3}],
            },
            "prompts entry 1: weight: not used by train.method: closed_form",  # guidance 1 is the default
        ),
        (
            {"train": {"method": "closed_form"}, "anchors": {"prompts": ["a"], "text_weight": 1}},
            "anchors.text_weight: not used by train.method: closed_form",
        ),
        (  # one note, not a second one about the constant schedule
            {"train": {"method": "closed_form", "lr_scheduler_args": {"num_cycles": 3}}},
            "train.lr_scheduler_args: not used by train.method: closed_form",
        ),
        (
            {
                "prompts": [
                    {"target": "x"},
                    {"target": "y", "action": "imitate", "guidance_scale": 3, "neutral": "z"},
                ]
            },
            "prompts entry 2: guidance_scale, neutral: action imitate does not use them",
        ),
        (
            {"prompts": [{"target": "x", "action": "distill", "guidance_scale": 3, "neutral": "z"}]},
            "prompts entry 1: neutral: action distill does not use it",
        ),
        (
            {"anchors": {"text_weight": 0.1, "weight": 4, "per_step": 0}},
            "anchors.per_step, anchors.text_weight, anchors.weight: anchors.prompts is empty, so there are "
            "no anchors",
        ),
        (
            {
                "train": {"method": "closed_form"},
                "prompts": [
                    # (with a neutral of its own: without one, unconditional stands in for it)
                    {"target": "x", "positive": "x in red", "unconditional": "x in blue", "neutral": "z"},
                    {"target": "y", "positive": "y"},  # the target itself: what is read anyway
                ],
            },
            "prompts entry 1: positive, unconditional: a closed-form erase maps the target's text onto "
            "neutral and reads no other prompt; ignored (train.method: leco reads them)",
        ),
        (
            {"anchors": {"prompts": ["a"], "rollouts": True, "per_step": 4}},
            "anchors.per_step: with anchors.rollouts: true the anchors have rollouts of their own",
        ),
        (
            {"network": {"type": "embedding", "token": "<x>"}, "anchors": {"prompts": ["a"], "per_step": 2}},
            "anchors.per_step: with a negative embedding the anchors have rollouts of their own",
        ),
        (
            {"anchors": {"prompts": ["a"], "per_step": 0, "text_weight": 0.1, "weight": 5}},
            "anchors.weight: anchors.per_step is 0, so no anchor prompt rides along",
        ),
        (
            {
                "network": {"type": "embedding", "token": "<x>"},
                "prompts": [{"target": "x", "multiplier": -1}],
            },
            "prompts entry 1: multiplier: an embedding has no strength",
        ),
        (
            {"network": {"type": "embedding", "token": "<x>"}, "preview": {"prompts": ["x"], "guidance": 1}},
            "preview.guidance: 1 never reads the negative prompt",
        ),
        ({"preview": {"prompts": ["x"], "guidance": 0.5}}, "preview.guidance: 0.5 samples as guidance 1"),
        (
            {
                "prompts": [{"target": "x", "action": "distill", "guidance_scale": 3}],
                "preview": {"prompts": ["x"], "strengths": [0, 1], "guidance": 7},
            },
            "preview.guidance: 7, but a CFG-distilled LoRA is made for guidance 1",
        ),
        (
            {"logging": {"tensorboard_dir": "tb"}},
            "logging.tensorboard_dir: only with logging.use_tensorboard",
        ),
        (
            {"train": {"lr_scheduler_args": {"num_cycles": 3}}},
            "train.lr_scheduler_args: the constant schedule",
        ),
        (
            {"train": {"iterations": 3, "lr_warmup_steps": 10, "lr_scheduler": "cosine"}},
            "never reaches train.lr",
        ),
        ({"train": {"lr_warmup_steps": 10}}, "train.lr_warmup_steps: the constant schedule has no warmup"),
        ({"teacher": None}, "teacher: empty, so the model teaches itself"),
        (
            {
                "prompts": [{"target": "x", "action": "distill", "guidance_scale": 3}],
                "train": {"rollout_guidance_scale": 7},
            },
            "train.rollout_guidance_scale: every entry is distill",
        ),
        (
            {"prompts": [{"target": "x", "resolution": 512}], "train": {"resolution": 16, "batch_size": 2}},
            # batch_size: the entries leave it; no word of kohya's defaults (no kohya file here)
            "train.resolution: every prompts entry sets its own; ignored",
        ),  # `teacher:` and nothing
    ],
)
def test_settings_the_rest_of_the_config_leaves_without_effect_are_named(sections, expected):
    document = {"pretrained_model": {"name_or_path": "ink-digits"}, "prompts": [{"target": "x"}], **sections}
    notes = LecoConfig.model_validate(document).unused_settings()
    assert len(notes) == 1 and expected in notes[0], notes


@pytest.mark.parametrize(
    "sections",
    [
        {"anchors": {"prompts": ["a house"], "rollouts": True, "per_step": 0}},
        {
            "network": {"type": "embedding", "token": "<no-x>"},
            "anchors": {"prompts": ["a house"], "per_step": 0},
        },
    ],
)
def test_anchors_with_rollouts_of_their_own_need_no_per_step(sections):
    # per_step counts the anchors that ride along; anchors with rollouts of their own are still kept.
    document = {"pretrained_model": {"name_or_path": "ink-digits"}, "prompts": [{"target": "x"}], **sections}
    config = LecoConfig.model_validate(document)
    config.check_combination()
    entries, riding = entries_and_anchors(config, ["a house"])
    assert riding == [] and entries[-1].action == "preserve" and entries[-1].targets == ["a house"]


def test_a_check_across_an_inline_entrys_keys_names_the_entry():
    document = {
        "pretrained_model": {"name_or_path": "ink-digits"},
        "prompts": [{"target": "x"}, {"target": "y", "action": "distill"}],
    }
    with pytest.raises(ValidationError) as error:
        LecoConfig.model_validate(document)
    assert describe_validation_error(error.value, Path("c.yaml"), LecoConfig).startswith(
        "c.yaml: prompts.2.guidance_scale: distill needs the CFG scale"
    )


def test_defaults_filled_into_an_entry_are_not_keys_it_set():
    entry = PromptSettings(target="a fox", action="imitate")
    assert entry.positive == "a fox" and entry.neutral == ""
    assert entry.model_fields_set == {"target", "action"}


def test_the_examples_set_nothing_without_effect():
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        try:
            config = load_config(path)
        except ConfigError:  # prompts files and eval specs
            continue
        config.check_combination()
        assert config.unused_settings() == [], path


def test_an_unreadable_config_says_permission_denied(tmp_path, monkeypatch):
    path = write(tmp_path, "c.yaml", MINIMAL)

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)  # chmod 000 does not stop root, who runs CI here
    with pytest.raises(ConfigError, match=r"c.yaml: cannot be read \(permission denied\); make it readable"):
        load_config(path)


def test_more_latents_a_step_than_a_rollout_gives_is_refused():
    def config(**train):
        return LecoConfig.model_validate(
            {
                "pretrained_model": {"name_or_path": "ink-digits"},
                "prompts": [{"target": "a digit seven"}],
                "train": train,
            }
        )

    with pytest.raises(ConfigError, match=r"train.samples_per_step: 8, but a rollout gives 4 latents"):
        config(samples_per_rollout=4, samples_per_step=8).check_combination()
    config(samples_per_rollout=4, samples_per_step=8, parallel_rollouts=2).check_combination()  # 8 there


@pytest.mark.parametrize("key", ["seeds", "strengths"])
def test_an_empty_preview_list_is_refused_before_training(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(
        "pretrained_model: {name_or_path: ink-digits}\nprompts: [{target: a digit seven}]\n"
        f"preview: {{prompts: [a digit seven], {key}: []}}\n"
    )
    with pytest.raises(ConfigError, match=rf"preview.{key}: List should have at least 1 item"):
        load_config(path)


def test_a_save_name_may_hold_unicode_spaces_and_marks_but_no_control_character():
    from leco.config import SaveConfig

    for name in ("赤\u3000青", "a\u00a0b", "x\u200by", "👨\u200d👩\u200d👧"):  # IME spaces, joiners
        assert SaveConfig(name=name).name == name
    with pytest.raises(ValueError, match="without control characters"):
        SaveConfig(name="a\x1bb")


def test_a_set_change_refused_by_its_sections_own_check_names_the_key_once():
    from leco.config import apply_overrides

    config = load_config(Path(__file__).parents[1] / "examples" / "ink-digits" / "negative_seven.yaml")
    with pytest.raises(ConfigError) as refused:
        apply_overrides(config, ["network.token=<No-Seven>", "train.seed=1"])
    message = str(refused.value)
    assert (
        message.startswith("--set 'network.token=<No-Seven>': network.token: ")
        and "network.network" not in message
    )
    for change, hint in (
        ("train.steps=5", "train.steps: unknown key; leco calls it train.iterations;"),
        ("save.iterations=5", "save.iterations: unknown key; it belongs under train: (train.iterations);"),
    ):  # a section changed alone is still read as a section of the whole config
        with pytest.raises(ConfigError, match=re.escape(hint)):
            apply_overrides(config, [change])
    apply_overrides(config, ["train.seed=0123"])  # as written, not YAML 1.1's octal
    apply_overrides(config, ["train.lr=1e-3", "train.lr=2e-3"])
    assert config.train.lr == 2e-3
    assert config.train.seed == 123
    # One section's changes are checked together: an embedding needs its token, in either order.
    erase = load_config(Path(__file__).parents[1] / "examples" / "ink-digits" / "erase_seven.yaml")
    with pytest.raises(ConfigError) as refused:  # the network section passed; the settings together not
        apply_overrides(erase, ["network.type=embedding", "network.token=<no-seven>"])
    assert "anchors.text_weight: a negative embedding leaves" in str(refused.value)


def test_python_paths_are_taken_where_a_config_asks_for_a_path(tmp_path):
    config = LecoConfig.model_validate(
        {"pretrained_model": {"name_or_path": tmp_path / "model"}, "save": {"path": tmp_path / "out"},
         "prompts": [{"target": "a fox"}]}
    )  # fmt: skip
    assert (config.pretrained_model.name_or_path, config.save.path) == (
        str(tmp_path / "model"),
        str(tmp_path / "out"),
    )
    from leco.config import apply_overrides

    assert apply_overrides(config, ["train.iterations=3"]) is config and config.train.iterations == 3

"""The `leco` command: honest help, one-line errors (exit 2) before anything heavy loads, no tracebacks."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

import leco.cli as cli
import leco.models
from leco.checkpoints import read_state
from leco.cli import build_parser, main
from leco.config import NetworkConfig, PretrainedModelConfig
from leco.errors import LecoError
from leco.lora_files import check_lora_fits, read_lora_header
from leco.models import load_models, pick_device, quiet_library_logs, recommended_sampling
from leco.network import LoRANetwork, read_lora_file
from leco.network.layers import adaptable_layers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "ink-digits"


def run_cli(argv, capsys):
    """main() in this process: (exit code, stdout, stderr); argparse's exits count as codes."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, option):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("leco") and "error:" in lines[0] and option in lines[0], err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model would be read: bad options must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for an invalid command line")

    for name in ("_load_single_file", "_load_folder", "_load_hub_repo"):
        monkeypatch.setattr(leco.models, name, refuse)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_folders):
    """Per family: a LoRA with metadata, the same without metadata, and damaged / foreign files."""
    root = tmp_path_factory.mktemp("cli_loras")
    files = {}
    for name in ("sd1", "sd2-v", "sdxl"):
        models = load_models(str(tiny_folders[name]))
        network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
        files[name] = network.save(root / f"{name}.safetensors", resolution=16)
        save_file(load_file(str(files[name])), str(root / f"{name}_bare.safetensors"))
        files[f"{name}_bare"] = root / f"{name}_bare.safetensors"
    whole = files["sd1"].read_bytes()
    files["truncated"] = root / "truncated.safetensors"
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    files["not_lora"] = root / "unet.safetensors"
    files["not_lora"].write_bytes(
        (tiny_folders["sd1"] / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    return files


# -- help -----------------------------------------------------------------------------------------


def test_bare_leco_prints_usage_and_exits_2():
    result = subprocess.run([sys.executable, "-m", "leco"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: leco") and "error: name a command" in result.stderr
    assert "Traceback" not in result.stderr


def subcommands():
    import argparse

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


@pytest.mark.parametrize("command", ["train", "generate", "eval"])
def test_help_shows_a_runnable_example_on_the_bundled_model(command):
    parser = subcommands()[command]
    text = parser.format_help()
    example = re.search(rf"^  (leco {command} .*?)$(?:\n^      (.*?)$)?", text, flags=re.M)
    assert example, text
    assert "ink-digits" in text and "examples/ink-digits/" in text
    # every example file the help names exists, and the example parses as a command line
    for name in re.findall(r"examples/ink-digits/[\w.]+\.yaml", text):
        assert (ROOT / name).is_file(), name
    if command == "train":
        args = build_parser().parse_args(example[1].split()[1:])
        assert Path(ROOT / args.config).is_file()
    else:  # after the train example, its LoRA exists; without it the --lora check must refuse
        assert "leco train examples/ink-digits/erase_seven.yaml" in text
        assert "output/ink-digits/no_seven_last.safetensors" in example[0]


def test_every_option_of_every_command_has_help():
    for name, parser in subcommands().items():
        for action in parser._actions:
            assert action.help and action.help.strip(), f"leco {name} {action.option_strings or action.dest}"


def test_generate_help_states_the_defaults():
    text = subcommands()["generate"].format_help()
    assert "25 steps, guidance 3" in text and "30 steps at guidance 7" in text
    assert "without one only 0 is drawn" in " ".join(text.split())


# -- one-line errors before loading -----------------------------------------------------------------

BAD_OPTIONS = [
    (["--seeds", "5-1"], "--seeds", "counts down"),
    (["--seeds", "-3"], "--seeds", "whole numbers from 0"),
    (["--seeds", ""], "--seeds", "not a list of seeds"),
    (["--seeds", "0-99999999999"], "--seeds", "more than 10000 seeds"),
    (["--seeds", "1,2,99999999999999999999"], "--seeds", "too large"),
    (["--steps", "0"], "--steps", "at least 1 step"),
    (["--steps", "2.5"], "--steps", "not a whole number"),
    (["--steps", "1001"], "--steps", "at most 1000 steps"),
    (["--steps", "2_5"], "--steps", "not a whole number"),
    (["--guidance", "1_0"], "--guidance", "not a number"),
    (["--guidance", "nan"], "--guidance", "from 0 to 100"),
    (["--guidance", "inf"], "--guidance", "from 0 to 100"),
    (["--guidance", "-1"], "--guidance", "from 0"),
    (["--guidance", "1e30"], "--guidance", "from 0 to 100"),
    (["--height", "20"], "--height", "multiples of 8"),
    (["--width", "0"], "--width", "multiples of 8"),
    (["--width", "-16"], "--width", "multiples of 8"),
    (["--width", "100000"], "--width", "up to 16384"),
    (["--strengths", "1,nan"], "--strengths", "from -100 to 100"),
    (["--strengths", "-1,inf"], "--strengths", "from -100 to 100"),
    (["--strengths", "0,1e9"], "--strengths", "from -100 to 100"),
    (["--strengths", "1,,2"], "--strengths", "not a list of numbers"),
    (["--sampler", "heun++"], "--sampler", "not known"),
]


@pytest.mark.parametrize(
    ("extra", "option", "says"), BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_numbers_are_one_line_errors_before_loading(
    extra, option, says, capsys, no_loading, tiny_folders
):
    base = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat"]
    code, _, err = run_cli(base + extra, capsys)
    assert_one_line_error(code, err, option)
    assert says in err


@pytest.mark.parametrize(("count", "says"), [("0", "give 1 to 10000 images"), ("2.5", "not a whole number")])
def test_bad_image_counts_for_eval_are_one_line_errors_before_loading(count, says, capsys, no_loading):
    argv = ["eval", "--model", "ink-digits", "--spec", str(EXAMPLES / "erase_seven_eval.yaml")]
    code, _, err = run_cli([*argv, "--images-per-prompt", count], capsys)
    assert_one_line_error(code, err, "--images-per-prompt")
    assert says in err


def test_strengths_without_a_lora_are_refused_before_loading(capsys, no_loading, tiny_folders, tmp_path):
    argv = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", "--strengths", "-1,1"]
    code, _, err = run_cli([*argv, "--out", tmp_path], capsys)
    assert_one_line_error(code, err, "--strengths")
    assert "--lora" in err


def test_bad_device_names_the_option_the_user_used(capsys, no_loading, tiny_folders, tmp_path):
    argv = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", "--out", tmp_path]
    code, _, err = run_cli([*argv, "--device", "tpu9"], capsys)
    assert_one_line_error(code, err, "--device")
    assert "train.device" not in err
    with pytest.raises(LecoError, match=r"^train\.device: 'gpu' is not a device"):
        pick_device("gpu")
    with pytest.raises(
        LecoError, match=r"^--device: cpu:1: there is one cpu device, with no number; use cpu"
    ):
        pick_device("cpu:1", option="--device")
    assert pick_device("cpu:0") == torch.device("cpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(LecoError, match=r"^--device: cuda:1 but no CUDA GPU"):
            pick_device("cuda:1", option="--device")


@pytest.mark.parametrize(
    ("command", "option", "layout", "says"),
    [
        ("generate", "--out", "file", "is a file; name a folder"),
        ("generate", "--out", "under_file", "cannot be created"),
        ("eval", "--out", "folder", "is a folder; name the report file"),
        ("eval", "--out", "new_folder/", "names a folder (it ends in a slash); name the report file"),
        ("eval", "--out", "under_file", "cannot be created"),
        ("eval", "--images", "file", "is a file; name a folder"),
        ("eval", "--images", "under_file", "cannot be created"),
    ],
)
def test_unwritable_outputs_are_refused_before_loading(
    command, option, layout, says, capsys, no_loading, tiny_folders, tmp_path
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    places = {"file": a_file, "under_file": a_file / "out" / "x.json", "folder": tmp_path}
    target = places.get(layout, f"{tmp_path}/{layout}")
    if command == "generate":
        argv = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", option, target]
    else:
        argv = [
            "eval",
            "--model",
            tiny_folders["sd1"],
            "--spec",
            EXAMPLES / "erase_seven_eval.yaml",
            option,
            target,
        ]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, option)
    assert says in err
    assert a_file.read_text() == "mine" and sorted(tmp_path.iterdir()) == [a_file]


def test_a_folder_that_takes_no_new_file_is_refused_before_loading(
    capsys, no_loading, tiny_folders, tmp_path, monkeypatch
):
    import tempfile

    def refuse(*args, **kwargs):  # what /sys or a read-only mount answers, even to root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    spec = ["eval", "--model", tiny_folders["sd1"], "--spec", EXAMPLES / "erase_seven_eval.yaml"]
    code, _, err = run_cli([*spec, "--out", tmp_path / "report.json"], capsys)
    assert_one_line_error(code, err, "--out")
    assert f"{tmp_path} takes no new files (Permission denied)" in err


def test_an_eval_report_where_its_images_go_is_refused_before_any_image(
    capsys, tmp_path, tiny_folders, no_loading
):
    spec = ["eval", "--model", tiny_folders["sd1"], "--spec", EXAMPLES / "erase_seven_eval.yaml"]
    for out, images in (("x", "x"), ("y", "y/imgs"), ("z/../y", "y/imgs/"), ("w/a_1_0.png", "w")):
        code, _, err = run_cli([*spec, "--out", tmp_path / out, "--images", tmp_path / images], capsys)
        assert_one_line_error(code, err, "--out")
        assert "--images folder" in err and "name a report file outside it" in err
    assert not list(tmp_path.iterdir())  # nothing made


def test_a_lora_with_a_strength_points_to_where_strengths_are_given(capsys, loras, tiny_folders):
    spec = ["eval", "--model", tiny_folders["sd1"], "--spec", EXAMPLES / "erase_seven_eval.yaml"]
    code, _, err = run_cli([*spec, "--lora", f"{loras['sd1']}:0.5"], capsys)
    assert_one_line_error(code, err, "--lora")
    assert "no strength after the file here; eval judges each LoRA at the spec's strengths" in err
    assert f"(give --lora {loras['sd1']})" in err
    drawn = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", "--lora", f"{loras['sd1']}:-1"]
    code, _, err = run_cli(drawn, capsys)  # A1111's <lora:name:-1>, merge's FILE:-1
    assert_one_line_error(code, err, "--lora")
    assert "no strength after the file here; generate draws each image at --strengths" in err
    drawn[-1] = f"{loras['sd1']}:abc"  # not a strength either: the file is there, not "not found"
    code, _, err = run_cli(drawn, capsys)
    assert_one_line_error(code, err, "--lora")
    assert f"':abc' after {loras['sd1']} is not a strength" in err and f"give --lora {loras['sd1']}" in err


def test_a_missing_model_is_one_line_naming_the_option(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["generate", "--model", tmp_path / "nope", "--prompt", "a cat"], capsys)
    assert_one_line_error(code, err, "--model")
    assert "pretrained_model" not in err


@pytest.mark.parametrize("name", ["prompts.toml", "train.toml", "network.toml"])  # named like a section
def test_a_kohya_prompts_file_given_to_train_is_named_once(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text((EXAMPLES / "slider_red_blue_kohya.toml").read_text())
    code, _, err = run_cli(["train", name], capsys)
    assert code == 2 and err.count(name) == 2, err  # the file, then the prompts_file: line to write
    assert f"error: {name}: a kohya train_leco TOML is a prompts file" in err


# -- LoRA files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("truncated", "is not a readable .safetensors file"),
        ("not_lora", "holds no LoRA weights"),
        ("missing", "not found"),
        ("pickle", "is not a .safetensors file"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_broken_lora_files_are_one_line_errors_naming_the_file(
    command, kind, says, loras, capsys, no_loading, tiny_folders, tmp_path
):
    lora = {"missing": tmp_path / "gone.safetensors", "pickle": tmp_path / "lora.pt"}.get(kind) or loras[kind]
    if kind == "pickle":
        torch.save(load_file(str(loras["sd1"])), lora)
    if command == "generate":
        argv = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", "--out", tmp_path / "images"]
    else:
        argv = ["eval", "--model", tiny_folders["sd1"], "--spec", EXAMPLES / "erase_seven_eval.yaml"]
        argv += ["--out", tmp_path / "report.json"]
    code, _, err = run_cli([*argv, "--lora", lora], capsys)
    assert_one_line_error(code, err, "--lora")
    assert says in err and str(lora) in err


def test_an_embedding_and_a_lora_given_for_each_other_say_which_option(loras, capsys, tiny_folders, tmp_path):
    embedding = tmp_path / "no_fox.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(embedding))
    base = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", "--out", tmp_path / "images"]
    code, _, err = run_cli([*base, "--lora", embedding], capsys)
    assert_one_line_error(code, err, "--lora")
    assert "is a textual-inversion embedding, not a LoRA; give it as --embedding" in err
    code, _, err = run_cli([*base, "--embedding", loras["sd1"]], capsys)
    assert_one_line_error(code, err, "--embedding")
    assert "is a LoRA, not an embedding; give it as --lora" in err
    assert not (tmp_path / "images").exists()

    spec = ["eval", "--model", tiny_folders["sd1"], "--spec", EXAMPLES / "erase_seven_eval.yaml"]
    args = build_parser().parse_args([str(a) for a in [*spec, "--lora", embedding, "--lora", loras["sd1"]]])
    assert args.lora == [str(embedding), str(loras["sd1"])]  # eval judges an embedding as a negative one
    a1111 = tmp_path / "NoFox.pt"  # A1111's own form, as its users have them
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "NoFox"}, a1111)
    assert build_parser().parse_args([str(a) for a in [*spec, "--lora", a1111]]).lora == [str(a1111)]
    code, _, err = run_cli([*base, "--lora", a1111], capsys)
    assert_one_line_error(code, err, "--lora")
    assert "is a textual-inversion embedding, not a LoRA; give it as --embedding" in err
    loha = tmp_path / "loha.pt"  # a LyCORIS .pt of a few tensors is a LoRA, however small
    torch.save({"lora_unet_x.hada_w1_a": torch.randn(4, 2), "lora_unet_x.hada_w1_b": torch.randn(2, 4)}, loha)
    code, _, err = run_cli([*base, "--lora", loha], capsys)
    assert_one_line_error(code, err, "--lora")
    assert "convert a .pt LoRA with leco convert" in err


def test_a_negative_prompt_at_guidance_1_is_pointed_out(capsys, tiny_folders, tmp_path):
    command = ["generate", "--model", str(tiny_folders["sd1"]), "--prompt", "a fox", "--negative", "blurry"]
    for guidance, warned in (("1", True), ("0.5", True), ("3", False)):
        out = ["--out", str(tmp_path / guidance), "--steps", "1", "--no-progress"]
        assert main([*command, "--guidance", guidance, *out]) == 0
        err = capsys.readouterr().err
        assert ("the negative prompt ('blurry') is never read" in err) == warned
        assert ("--guidance: guidance 0.5 samples as guidance 1" in err) == (guidance == "0.5")
        settings = Image.open(next((tmp_path / guidance).glob("a-fox_*.png"))).text["parameters"]
        assert f"CFG scale: {max(float(guidance), 1):g}," in settings  # what the image was made at


def test_an_embedding_token_without_its_file_is_pointed_out(capsys, tiny_folders, tmp_path):
    """<no-fox> in a prompt with no --embedding is read as the pieces of its spelling: said, naming
    the prompt and the fix; with the file loaded (any case) it is a token and nothing is said."""
    embedding = tmp_path / "no_fox.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(embedding))
    base = [
        "generate",
        "--model",
        str(tiny_folders["sd1"]),
        "--steps",
        "1",
        "--no-progress",
        "--guidance",
        "3",
    ]
    runs = [
        (["--prompt", "a fox", "--negative", "blurry, <no-fox>"], "negative prompt 'blurry, <no-fox>'"),
        (["--prompt", "a <No-Fox> fox"], "prompt 'a <No-Fox> fox'"),
        (["--prompt", "a fox", "--negative", "<No-Fox>", "--embedding", f"{embedding}:<no-fox>"], None),
        (["--prompt", "a fox <lora:x:1>"], None),  # a LoRA tag has its own warning
        # a token given on the command line may go on after the brackets: it is one token, loaded
        (["--prompt", "a fox", "--negative", "<no-fox>_1", "--embedding", f"{embedding}:<no-fox>_1"], None),
        (["--prompt", "a <no-fox>-style fox", "--embedding", f"{embedding}:<no-fox>"], None),
    ]
    for number, (options, where) in enumerate(runs):
        assert main([*base, *options, "--out", str(tmp_path / str(number))]) == 0
        err = capsys.readouterr().err
        said = "is no token this model knows and is read as words; if it is an embedding's, load its file"
        assert (f"leco: warning: {where}: " in err and said in err) if where else said not in err


def test_an_embedding_token_inside_a_prompt_word_is_refused(capsys, no_loading, tiny_folders, tmp_path):
    embedding = tmp_path / "no_fox.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(embedding))
    model = str(tiny_folders["sd1"])
    for token, prompt in (("igi", "a digit three"), ("Fox", "a FOXGLOVE")):
        assert (
            main(["generate", "--model", model, "--prompt", prompt, "--embedding", f"{embedding}:{token}"])
            == 2
        )
        error = capsys.readouterr().err
        assert f"its token {token.lower()!r} is inside the word" in error and "Traceback" not in error
    alone = ["--prompt", "a fox", "--negative", "blurry,<no-fox>,EasyNegativeV2"]
    alone += ["--embedding", f"{embedding}:<no-fox>"]
    # inside a longer loaded token it is no word: the tokenizer reads easynegativev2 whole
    other = tmp_path / "EasyNegativeV2.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(other))
    alone += [
        "--embedding",
        f"{embedding}:EasyNegative",
        "--embedding",
        str(other),
    ]
    with pytest.raises(AssertionError, match="a model was loaded"):  # a token standing alone passes
        main(["generate", "--model", model, *alone])


def test_an_embedding_whose_token_no_prompt_uses_is_pointed_out(capsys, no_loading, tiny_folders, tmp_path):
    embedding = tmp_path / "no_fox.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(embedding))
    base = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", "--embedding", embedding]
    for negative, warned in (("<no-fx>", True), ("blurry, no_fox", False)):
        with pytest.raises(AssertionError, match="a model was loaded"):  # the check comes before loading
            main([str(a) for a in [*base, "--negative", negative]])
        out = capsys.readouterr().err
        assert ("its token 'no_fox' is in no prompt; write it in the prompt or the negative" in out) == warned


@pytest.mark.parametrize(
    ("lora", "model", "says"),
    [
        ("sdxl_bare", "sd1", "fits no layer of this sd1 model"),
        ("sd1_bare", "sdxl", "does not fit this sdxl model"),  # some paths are SDXL's, not their widths
        # (sd1_bare on sd2-v and sd2-v_bare on sd1 are read, as merge, A1111 and ComfyUI read them: 1x1
        # tensors in either form fit a layer, and the tiny families share every width; real SD1 and SD2
        # differ in the cross-attention's text width)
    ],
)
def test_a_lora_of_another_family_is_refused_by_its_layers(loras, tiny_folders, lora, model, says):
    models = load_models(str(tiny_folders[model]))
    with pytest.raises(LecoError, match=re.escape(says)):
        check_lora_fits(read_lora_header(loras[lora]), models.unet, models.family)
    # each family's own file, with or without metadata, passes
    own = model
    for name in (own, f"{own}_bare"):
        check_lora_fits(read_lora_header(loras[name]), models.unet, models.family)


def test_an_incomplete_lora_and_a_diffusers_embedding_given_as_lora_say_what_they_are(
    tmp_path, loras, tiny_folders
):
    models = load_models(str(tiny_folders["sd1"]))
    tensors, metadata = read_lora_file(loras["sd1"])
    up = next(key for key in tensors if key.startswith("lora_unet_") and key.endswith("lora_up.weight"))
    save_file({k: v for k, v in tensors.items() if k != up}, str(tmp_path / "noup.safetensors"), metadata)
    with pytest.raises(
        LecoError, match=r"has lora_unet_\w+ without its lora_up.weight; the file is incomplete$"
    ):
        check_lora_fits(read_lora_header(tmp_path / "noup.safetensors"), models.unet, models.family)
    save_file({"<cat-toy>": torch.randn(2, 32)}, str(tmp_path / "cat.safetensors"))
    with pytest.raises(
        LecoError,
        match=r"a textual-inversion embedding \(diffusers' form\), not a LoRA; give it as --embedding",
    ):
        read_lora_header(tmp_path / "cat.safetensors")


def test_a_lora_whose_metadata_its_layers_contradict_is_applied_with_a_word(loras, tiny_folders, capsys):
    """The tiny families share every width: an sd1 file's layers fit sd2-v, and the layers decide
    (A1111 reads ss_base_model_version only to list files); without kohya layers the metadata does."""
    models = load_models(str(tiny_folders["sd2-v"]))
    check_lora_fits(read_lora_header(loras["sd1"]), models.unet, models.family)
    err = capsys.readouterr().err
    assert (
        "its metadata says sd1 (ss_base_model_version), but its layers fit this sd2-v model; applied" in err
    )
    assert "trained on an epsilon-prediction model and this sd2-v model predicts v_prediction" in err


def test_dora_tensors_are_refused_and_layers_this_model_lacks_are_named(
    loras, tiny_folders, tmp_path, capsys
):
    """diffusers drops a kohya file's dora_scale and its keys for layers the model lacks without a
    word; generate and eval must not draw other images than the file means unannounced."""
    models = load_models(str(tiny_folders["sd1"]))
    tensors = load_file(str(loras["sd1_bare"]))
    module = next(key.split(".")[0] for key in tensors if key.endswith("lora_down.weight"))
    dora = tmp_path / "dora.safetensors"
    save_file({**tensors, f"{module}.dora_scale": torch.ones(1, 16)}, str(dora))
    with pytest.raises(LecoError, match=rf"dora.safetensors: {module}.dora_scale is not a plain LoRA tensor"):
        check_lora_fits(read_lora_header(dora), models.unet, models.family)
    extra = tmp_path / "extra.safetensors"
    absent = "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn2_to_k"  # no such block here
    save_file({**tensors, f"{absent}.lora_down.weight": torch.zeros(2, 16)}, str(extra))
    check_lora_fits(read_lora_header(extra), models.unet, models.family)
    warning = capsys.readouterr().err
    assert "extra.safetensors: 1 of its" in warning and f"are not applied ({absent})" in warning
    # the same in diffusers' (PEFT) layout, which diffusers reads and drops the module of in its quiet log
    layer = next(n for n, m in models.unet.named_modules() if n.endswith("attn2.to_k"))
    width = models.unet.get_submodule(layer)
    peft = {f"unet.{layer}.lora_A.weight": torch.zeros(2, width.in_features)}
    peft[f"unet.{layer}.lora_B.weight"] = torch.zeros(width.out_features, 2)
    gone = "down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k"
    peft[f"unet.{gone}.lora_A.weight"] = torch.zeros(2, 16)
    peft[f"unet.{gone}.lora_B.weight"] = torch.zeros(16, 2)
    save_file(peft, str(tmp_path / "peft.safetensors"))
    check_lora_fits(read_lora_header(tmp_path / "peft.safetensors"), models.unet, models.family)
    warning = capsys.readouterr().err
    assert "peft.safetensors: 1 of its 2 UNet modules" in warning and f"are not applied ({gone})" in warning


@pytest.mark.parametrize(
    ("prefix", "says"),
    [
        (
            "diffusion_model.input_blocks.1.1.proj_in",
            "(ComfyUI's diffusion_model. layout) is not a kohya LoRA key",
        ),
        ("lycoris_down_blocks_0_attentions_0_proj_in", "is not a kohya LoRA key (they start with lora_unet_"),
    ],
)
def test_lora_keys_leco_cannot_read_are_one_line_before_diffusers(tmp_path, prefix, says):
    # diffusers answered them with "Invalid LoRA checkpoint ... contain 'lora'", which they do
    other = tmp_path / "other.safetensors"
    down, up = torch.zeros(2, 16), torch.zeros(16, 2)
    save_file({f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}, str(other))
    with pytest.raises(
        LecoError, match=rf"^--lora: .*other.safetensors: {re.escape(prefix)}\.lora_\w+.weight"
    ):
        read_lora_header(other)
    with pytest.raises(LecoError, match=re.escape(says)):
        read_lora_header(other)


def test_a_file_naming_one_layer_the_kohya_and_the_peft_way_is_refused(loras, tiny_folders, tmp_path):
    # Read together, PEFT's lora_B replaced kohya's lora_up under kohya's alpha: the layer applied at
    # alpha/rank twice over, silently
    models = load_models(str(tiny_folders["sd1"]))
    tensors = load_file(str(loras["sd1_bare"]))
    layer = next(n for n, _ in models.unet.named_modules() if n.endswith("attn2.to_k"))
    kohya_name = "lora_unet_" + layer.replace(".", "_")
    assert f"{kohya_name}.lora_down.weight" in tensors
    tensors[f"unet.{layer}.lora_A.weight"] = tensors[f"{kohya_name}.lora_down.weight"].clone()
    tensors[f"unet.{layer}.lora_B.weight"] = tensors[f"{kohya_name}.lora_up.weight"].clone()
    mixed = tmp_path / "mixed.safetensors"
    save_file(tensors, str(mixed))
    with pytest.raises(
        LecoError, match=rf"mixed.safetensors: unet.{layer}.lora_\w.weight names the same layer"
    ):
        read_lora_file(mixed)


def test_an_sdxl_lora_naming_layers_the_diffusers_way_fits(loras, tiny_folders, tmp_path):
    """p1atdev/LECO and sliders write SDXL layers by diffusers paths; kohya and ComfyUI read them."""
    from leco.network.kohya import UNET_PREFIX, kohya_key

    models = load_models(str(tiny_folders["sdxl"]))
    diffusers_key = {
        kohya_key(name, models.family, models.unet.config): UNET_PREFIX + name.replace(".", "_")
        for name in adaptable_layers(models.unet, "c3lier")
    }
    generator = torch.Generator().manual_seed(0)
    tensors = {  # trained-looking: lora_up is no longer zero
        key: torch.randn(value.shape, generator=generator) if "lora_up" in key else value
        for key, value in load_file(str(loras["sdxl_bare"])).items()
    }
    renamed = {}
    for key, value in tensors.items():
        module, part = key.split(".", 1)
        renamed[f"{diffusers_key.get(module, module)}.{part}"] = value
    assert renamed.keys() != tensors.keys()
    files = {"sgm": tmp_path / "sgm_named.safetensors", "diffusers": tmp_path / "diffusers_named.safetensors"}
    save_file(tensors, str(files["sgm"]))
    save_file(renamed, str(files["diffusers"]))
    check_lora_fits(read_lora_header(files["diffusers"]), models.unet, models.family)
    # and it draws what the same weights under SGM names draw
    from leco.generate import SamplingSettings, requests_for, run_generation

    models = load_models(str(tiny_folders["sdxl"]), with_vae=True)
    images = {}
    for name, lora in (("none", None), *files.items()):
        request = requests_for(["x"], [1.0 if lora else 0.0], [0])  # without a LoRA only 0 is drawn
        paths, _ = run_generation(
            models, lora, request, SamplingSettings(steps=2), tmp_path / name, "cpu", False
        )
        images[name] = np.asarray(Image.open(paths[0]))
    assert np.array_equal(images["sgm"], images["diffusers"])
    assert not np.array_equal(images["sgm"], images["none"])


def test_a_wrong_family_lora_never_reaches_diffusers_in_generation(loras, tiny_folders, tmp_path, capfd):
    from leco.generate import SamplingSettings, requests_for, run_generation

    models = load_models(str(tiny_folders["sd1"]), with_vae=True)
    with pytest.raises(LecoError, match="fits no layer of this sd1 model"):
        run_generation(
            models,
            loras["sdxl_bare"],
            requests_for(["x"], [1.0], [0]),
            SamplingSettings(steps=2),
            tmp_path,
            "cpu",
            False,
        )
    assert "size mismatch" not in capfd.readouterr().err


# -- defaults ---------------------------------------------------------------------------------------


def test_recommended_sampling_comes_from_the_model():
    assert recommended_sampling("ink-digits") == leco.models.SamplingDefaults(steps=25, guidance=3.0)


def test_a_model_card_declares_its_sampling_defaults(tmp_path, tiny_folders):
    assert recommended_sampling(str(tiny_folders["sd1"])) == leco.models.SamplingDefaults(30, 7.0)
    card = {"inference": {"parameters": {"num_inference_steps": 12, "guidance_scale": 4.5}}}
    (tmp_path / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n# a model\n")
    assert recommended_sampling(str(tmp_path)) == leco.models.SamplingDefaults(12, 4.5)


def test_generate_without_a_lora_draws_strength_zero_at_the_recommended_settings(
    tmp_path, tiny_folders, capsys, monkeypatch
):
    import shutil

    import leco.generate

    model = tmp_path / "model"
    shutil.copytree(tiny_folders["sd1"], model)
    card = {"inference": {"parameters": {"num_inference_steps": 3, "guidance_scale": 1.5}}}
    (model / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")
    seen = {}
    real = leco.generate.run_generation

    def spy(models, lora, requests, settings, *args, **kwargs):
        seen.update(requests=requests, settings=settings)
        return real(models, lora, requests, settings, *args, **kwargs)

    monkeypatch.setattr(leco.generate, "run_generation", spy)
    argv = ["generate", "--model", model, "--prompt", "a cat", "--seeds", "0-1", "--out", tmp_path / "out"]
    code, out, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 0, err
    assert [r.strength for r in seen["requests"]] == [0.0, 0.0]
    assert (seen["settings"].steps, seen["settings"].guidance) == (3, 1.5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a-cat_0_0.png",
        "a-cat_0_1.png",
        "grid.png",
    ]
    # A second run into the same folder would replace them: refused before loading, unless asked.
    code, out, err = run_cli([*argv, "--no-progress"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "--out" in err and "already holds 3 of the files this run writes" in err and "--overwrite" in err
    code, out, err = run_cli(
        [*argv[:-4], "--seeds", "5", "--out", tmp_path / "out", "--no-progress"], capsys
    )  # other seeds: other files, nothing replaced
    assert code == 2 and "already holds 1 of the files" in err  # the grid is always grid.png
    (tmp_path / "out" / "grid.png").write_bytes(b"the user's")  # not leco's: kept even with --overwrite
    code, out, err = run_cli([*argv, "--no-progress", "--overwrite"], capsys)
    assert code == 2 and "holds 1 file(s) leco did not write" in err and "move them" in err
    assert (tmp_path / "out" / "grid.png").read_bytes() == b"the user's"
    (tmp_path / "out" / "grid.png").unlink()
    code, out, err = run_cli([*argv, "--no-progress", "--overwrite"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "grid.png").is_file()
    one_seed = [*argv[:-4], "--seeds", "0", "--out", tmp_path / "out", "--no-progress", "--overwrite"]
    code, out, err = run_cli(one_seed, capsys)  # the new grid leaves seed 1's image out: said, not deleted
    assert code == 0 and "also holds 1 image(s) this run does not write (e.g. a-cat_0_1.png)" in err
    assert (tmp_path / "out" / "a-cat_0_1.png").is_file()


def test_eval_spec_checks_its_numbers_and_leaves_steps_to_the_model(tmp_path):
    from leco.config import ConfigError
    from leco.evaluate import load_spec

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"erase": [{"prompt": "a digit seven", "concept": "digit:7"}]}))
    spec = load_spec(good)
    assert spec.steps is None and spec.guidance is None
    bad_values = [
        ("steps", 0),
        ("steps", 5000),
        ("guidance", float("nan")),
        ("height", 20),
        ("width", -8),
        ("seed", -1),
    ]
    for key, value in bad_values:
        bad = tmp_path / f"bad_{key}.yaml"
        bad.write_text(yaml.safe_dump({key: value, "erase": [{"prompt": "a", "concept": "digit:7"}]}))
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: {key}: "):
            load_spec(bad)
    bad = tmp_path / "bad_strengths.yaml"
    bad.write_text("strengths: [0, .inf]\nerase: [{prompt: a, concept: 'digit:7'}]\n")
    with pytest.raises(ConfigError, match="strengths.2: .*finite"):
        load_spec(bad)


# -- loading messages -------------------------------------------------------------------------------


def test_offline_repo_id_not_in_the_cache_says_so_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(LecoError) as error:
        load_models("nobody-here/no-such-model")
    message = str(error.value)
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "hf download nobody-here/no-such-model" in message and "\n" not in message


def test_a_partly_cached_repo_offline_names_what_is_missing(tmp_path, monkeypatch, tiny_folders):
    from huggingface_hub import constants

    revision = "1" * 40
    snapshot = tmp_path / "hub" / "models--leco-tests--partial" / "snapshots" / revision
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text((tiny_folders["sd1"] / "unet" / "config.json").read_text())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        LecoError, match="only part of 'leco-tests/partial' is in the local Hugging Face cache"
    ):
        load_models("leco-tests/partial")


def test_an_unreachable_hub_is_one_request_not_a_download(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def no_network(repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    monkeypatch.setattr(leco.models, "_load_diffusers", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(LecoError, match="the Hub cannot be reached .*Name or service not known"):
        load_models(
            PretrainedModelConfig(name_or_path="nobody-here/no-such-model"),
            names=leco.models.CLI_OPTION_NAMES,
        )
    assert calls == ["nobody-here/no-such-model"]


def test_allow_pickle_is_suggested_only_for_readable_pickles(
    tmp_path, tiny_single_files, capsys, monkeypatch
):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(LecoError) as error:
        load_models(str(damaged))
    assert "not a readable PyTorch checkpoint" in str(error.value) and "allow_pickle:" not in str(error.value)
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_single_files["sd1"]))}, pickled)
    with pytest.raises(LecoError, match="set pretrained_model.allow_pickle: true"):
        load_models(str(pickled))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["generate", "--model", pickled, "--prompt", "a cat"], capsys)
    assert_one_line_error(code, err, str(pickled))
    assert "pass --allow-pickle" in err and "pretrained_model" not in err


def test_a_single_file_without_a_vae_says_so(tiny_single_files, tiny_folders):
    spec = PretrainedModelConfig(name_or_path=str(tiny_single_files["sd1"]), config=str(tiny_folders["sd1"]))
    with pytest.raises(LecoError, match="holds no VAE"):
        load_models(spec, with_vae=True)


def test_loading_is_quiet_and_leaves_the_library_settings_as_they_were(
    tiny_folders, tiny_single_files, capfd
):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity(logging.INFO)
        lib.enable_progress_bar()
    try:
        capfd.readouterr()
        load_models(str(tiny_folders["sd1"]), with_vae=True)
        spec = PretrainedModelConfig(  # v_pred as the probe reads the random weights: leco says nothing
            name_or_path=str(tiny_single_files["sd2-v"]), config=str(tiny_folders["sd2-v"]), v_pred=False
        )
        load_models(spec)  # casts an fp32-probed UNet: diffusers warns about that cast
        assert capfd.readouterr().err == ""
        for lib in (diffusers_logging, transformers_logging):
            assert lib.get_verbosity() == logging.INFO and lib.is_progress_bar_enabled()
    finally:
        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity(logging.ERROR)
    with quiet_library_logs():
        assert transformers_logging.get_verbosity() == logging.ERROR
    assert transformers_logging.get_verbosity() == logging.ERROR


def test_a_damaged_resume_state_names_torchs_reason_not_its_boilerplate(tmp_path):
    state = tmp_path / "run_state"
    state.mkdir()
    (state / "training_state.pt").write_bytes(b"\xff\xfe garbage, not a torch file " * 20)  # not text
    try:
        torch.load(state / "training_state.pt", weights_only=True)
    except Exception as error:
        reason = next(line for line in str(error).splitlines() if "Unsupported" in line).strip()
    with pytest.raises(LecoError) as raised:
        read_state(state, "{}")
    message = str(raised.value)
    assert reason in message and "\n" not in message  # the line torch gives its reason on, and only it
    assert "Weights only load failed" not in message and "trusted source" not in message
    torch.save({"step": 3}, state / "training_state.pt")  # a torch file, not a leco state
    with pytest.raises(LecoError, match="is not a leco training state"):
        read_state(state, "{}")


# -- fuzz -------------------------------------------------------------------------------------------


def options_of(command):
    """(option, takes a value) for every option the command has today, so new ones are fuzzed too."""
    parser = subcommands()[command] if command else build_parser()
    return [(o, a.nargs != 0) for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]


OPTIONS = {command: options_of(command) for command in ("train", "generate", "eval", None)}
NUMBERS = st.sampled_from(
    ["0", "-1", "1", "7.5", "nan", "inf", "-inf", "1e400", "16", "20", "5-1", "0-3", "1,,2", ""]
)
# argv cannot carry NUL bytes (C strings), so the fuzz leaves them out
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)


@st.composite
def command_lines(draw, paths):
    command = draw(st.sampled_from(["train", "generate", "eval", None]))
    values = st.one_of(NUMBERS, TEXT, st.sampled_from(paths))
    words = [command] if command else []
    if command in ("generate", "eval") and draw(st.booleans()):  # valid-looking: fails on the model
        words += ["--model", paths[0]]
        words += (
            ["--prompt", "a cat"]
            if command == "generate"
            else ["--spec", str(EXAMPLES / "erase_seven_eval.yaml")]
        )
    for _ in range(draw(st.integers(0, 5))):
        option, takes_value = draw(st.sampled_from([*OPTIONS[command], ("--help-me", True)]))
        if not takes_value:
            words.append(option)
        else:  # --model always names the missing path: no command line may load a model
            words += [option, paths[0] if option == "--model" else draw(values)]
    if command == "train" and draw(st.booleans()):
        words.append(draw(st.sampled_from(paths)))
    return words


@pytest.fixture(scope="module")
def fuzz_paths(tmp_path_factory, loras):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "a_file.txt").write_text("x")
    # a missing model path comes first: valid-looking command lines fail fast on it
    return [
        str(root / "missing_model"),
        str(root / "a_file.txt"),
        str(root),
        str(loras["sd1"]),
        str(loras["truncated"]),
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_command_line_gives_success_or_a_one_line_error(data, fuzz_paths, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("_load_single_file", "_load_folder", "_load_hub_repo"):
        monkeypatch.setattr(leco.models, name, lambda *a, **k: pytest.fail("loaded a model"))
    argv = data.draw(command_lines(fuzz_paths))
    code, out, err = run_cli(argv, capsys)
    assert "Traceback" not in err
    event(f"exit {code}: " + ("argparse" if err.rstrip().endswith("--help)") else "after parsing"))
    if code == 0:  # only --help / --version succeed: nothing here can train or load
        assert out and not err
        return
    assert code == 2, (argv, code, err)
    # Warnings about what was read before the error (a prompt given twice) may come first.
    lines = [line for line in err.strip().splitlines() if not line.startswith("leco: warning:")]
    if lines[0].startswith("usage:"):
        lines = lines[1:]  # bare `leco` shows its usage first
    assert len(lines) >= 1 and lines[0].startswith("leco") and "error:" in lines[0], (argv, err)
    if not any("yaml" in line for line in lines):  # a config file may have several problems, one per line
        assert len(lines) == 1, (argv, err)


def test_the_fuzz_reaches_the_model_loader(fuzz_paths, capsys, monkeypatch, tmp_path):
    """The fuzz's valid-looking command lines get as far as the model path (and fail fast there)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["generate", "--model", fuzz_paths[0], "--prompt", "a cat"], capsys)
    assert_one_line_error(code, err, "--model")
    assert "neither a file, a folder nor a Hugging Face repo id" in err


def test_report_json_is_untouched_by_a_refused_command(tmp_path, capsys, no_loading, tiny_folders):
    report = tmp_path / "eval_report.json"
    earlier = {"rows": [], "summary": {}, "spec": {}, "mine": True}  # an earlier eval's report
    report.write_text(json.dumps(earlier))
    argv = [
        "eval",
        "--model",
        tiny_folders["sd1"],
        "--spec",
        EXAMPLES / "erase_seven_eval.yaml",
        "--out",
        report,
    ]
    code, _, err = run_cli([*argv, "--images", report], capsys)
    assert_one_line_error(code, err, "--images")
    assert json.loads(report.read_text()) == earlier
    code, _, err = run_cli(argv, capsys)  # an earlier report is replaced only when asked
    assert_one_line_error(code, err, "--out")
    assert "holds an earlier eval's report; pass --overwrite" in err
    assert json.loads(report.read_text()) == earlier


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["generate", "--model", "m", "--prompt", "x", "--seeds", "0-1", "--seeds=5"], "--seeds"),
        (["merge", "--model", "m", "--lora", "a", "--out", "o1", "--out", "o2"], "--out"),
        (["eval", "--model", "m", "--spec", "a.yaml", "--spec", "b.yaml"], "--spec"),
    ],
)
def test_an_option_that_takes_one_value_given_twice_is_refused(capsys, argv, option):
    """argparse would keep the last and drop the first without a word."""
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"argument {option}: given twice; give it once")


def test_an_abbreviated_option_is_not_taken_for_another(capsys):
    # argparse's prefix matching read --seed as --seeds: `--seeds 0-1 --seed 5` drew seed 5 alone
    code, _, err = run_cli(
        ["generate", "--model", "m", "--prompt", "x", "--seeds", "0-1", "--seed", "5"], capsys
    )
    assert_one_line_error(code, err, "unrecognized arguments: --seed 5")


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["generate", "--model", "m", "--prompt", "x", "--out", ""], "--out"),
        (["generate", "--model", "m", "--prompt", "x", "--lora", " "], "--lora"),
        (["generate", "--model", "m", "--prompt", "x", "--embedding", ""], "--embedding"),
        (["eval", "--model", "m", "--spec", "", "--images", "x"], "--spec"),
        (["eval", "--model", "m", "--spec", "s.yaml", "--images", ""], "--images"),
        (["merge", "--model", "m", "--lora", "", "--out", "x.safetensors"], "--lora"),
        (["convert", "", "--out", "z.safetensors", "--family", "sd1"], "IN"),
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_working_directory(
    capsys, tmp_path, monkeypatch, argv, option
):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"argument {option}: empty; name a file or folder")
    assert list(tmp_path.iterdir()) == []


def test_train_without_a_config_or_with_two_says_which(capsys, tmp_path):
    code, _, err = run_cli(["train"], capsys)
    assert_one_line_error(code, err, "no config given; run leco train CONFIG.yaml")
    code, _, err = run_cli(["train", "a.yaml", "--config_file", "b.yaml"], capsys)
    assert_one_line_error(code, err, "give the config once")


def test_generate_takes_one_lora_and_train_at_most_a_process_a_core(tmp_path, capsys, tiny_folders, loras):
    lora = str(loras["sd1"])
    argv = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a cat", "--lora", lora, "--lora", lora]
    code, _, err = run_cli([*argv, "--out", tmp_path / "g"], capsys)
    assert_one_line_error(code, err, "--lora")
    assert "given twice" in err
    config = tmp_path / "c.yaml"
    config.write_text((EXAMPLES / "erase_seven.yaml").read_text())
    (tmp_path / "erase_seven_prompts.yaml").write_text((EXAMPLES / "erase_seven_prompts.yaml").read_text())
    code, _, err = run_cli(["train", config, "--num-processes", "100000"], capsys)
    assert_one_line_error(code, err, "--num-processes")
    assert "use at most" in err
    code, _, err = run_cli(["train", tmp_path / "absent.yaml", "--num-processes", "2"], capsys)
    assert_one_line_error(code, err, "absent.yaml")  # checked once, before any process starts
    sets = ["--set", "train.lr=1e-3", "--set", "train.lr = 2e-3", "--set", "train.iterations=0"]
    code, _, err = run_cli(["train", config, *sets], capsys)
    assert code == 2 and "--set train.lr is given more than once; the last, 'train.lr = 2e-3', is used" in err


def test_a_report_whose_out_was_taken_during_the_eval_is_written_beside_it(
    tmp_path, capsys, monkeypatch, tiny_folders, loras
):
    import leco.evaluate

    out = tmp_path / "r.json"

    def evaluate(*args, **kwargs):
        out.write_text("mine")  # e.g. another job writing there meanwhile
        return {"rows": [], "summary": {}, "spec": {}, "notes": []}

    monkeypatch.setattr(leco.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(leco.evaluate, "format_report", lambda report, all_rows: "the table")
    argv = ["eval", "--model", tiny_folders["sd1"], "--lora", loras["sd1"], "--out", out]
    code, printed, err = run_cli([*argv, "--spec", EXAMPLES / "erase_seven_eval.yaml"], capsys)
    assert code == 0 and out.read_text() == "mine"
    assert json.loads((tmp_path / "r.1.json").read_text())["rows"] == []
    assert "the report was written to" in err and "r.1.json" in printed


@pytest.mark.parametrize("victim", ["lora", "spec", "notes"])
def test_eval_replaces_no_file_but_an_earlier_report(
    tmp_path, capsys, no_loading, tiny_folders, loras, victim
):
    files = {
        "lora": tmp_path / "mine.safetensors",
        "spec": tmp_path / "spec.yaml",
        "notes": tmp_path / "n.json",
    }
    files["lora"].write_bytes(Path(loras["sd1"]).read_bytes())
    files["spec"].write_text((EXAMPLES / "erase_seven_eval.yaml").read_text())
    files["notes"].write_text(json.dumps({"rows": "mine"}))
    before = files[victim].read_bytes()
    argv = ["eval", "--model", tiny_folders["sd1"], "--spec", files["spec"], "--lora", files["lora"]]
    code, _, err = run_cli([*argv, "--out", files[victim]], capsys)
    assert_one_line_error(code, err, "--out")
    assert "exists and is not a leco eval report" in err and files[victim].read_bytes() == before


def test_a_default_output_that_cannot_be_written_says_it_was_not_given(
    tmp_path, capsys, no_loading, tiny_folders, loras, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "generated").write_text("mine")  # a file where generate's default folder would go
    (tmp_path / "eval_report.json").write_text("mine")  # no report: never replaced
    code, _, err = run_cli(["generate", "--model", tiny_folders["sd1"], "--prompt", "a fox"], capsys)
    assert_one_line_error(code, err, "--out: (not given: the default, ./generated) generated is a file")
    argv = ["eval", "--model", tiny_folders["sd1"], "--lora", loras["sd1"]]
    code, _, err = run_cli([*argv, "--spec", EXAMPLES / "erase_seven_eval.yaml"], capsys)
    assert_one_line_error(
        code, err, "--out: (not given: the default, ./eval_report.json) eval_report.json exists"
    )


def test_ci_runs_exactly_the_readme_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and test", 1)[1]
    documented = re.search(r"```bash\n(.*?)```", section, flags=re.S)[1].strip().splitlines()
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in script if line.startswith("python ")]
    assert commands == documented
    assert '".[dev,nudenet]"' in documented[0]  # the NudeNet detector's test needs its extra


def test_eval_warns_when_the_model_does_not_draw_what_is_to_be_erased(tmp_path, capsys):
    models = load_models("ink-digits")
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(training_method="xattn"))
    lora = network.save(tmp_path / "zero.safetensors", resolution=models.resolution)
    network.remove()
    spec = tmp_path / "spec.yaml"
    erase = [
        {"prompt": "a digit seven in red ink", "concept": "digit:7"},
        {"prompt": "a digit seven in purple ink", "concept": "digit:7,ink:purple"},  # never drawn
    ]
    keep = [
        {"prompt": "a digit three in red ink", "concept": "digit:3"},
        {"prompt": "a digit three in blue ink", "concept": "ink:purple"},  # never drawn either
    ]
    spec.write_text(
        yaml.safe_dump({"detector": "ink-digits", "images_per_prompt": 16, "erase": erase, "keep": keep})
    )
    argv = ["eval", "--model", "ink-digits", "--lora", lora, "--spec", spec, "--out", tmp_path / "r.json"]
    code, out, err = run_cli([*argv, "--images-per-prompt", "2", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["spec"]["images_per_prompt"] == 2  # the option's count, not the spec's 16
    warnings = [line for line in err.splitlines() if "barely draws it" in line]
    assert len(warnings) == 2 and "erase prompt 'a digit seven in purple ink'" in warnings[0], err
    assert "keep prompt 'a digit three in blue ink' [ink:purple]" in warnings[1]
    assert warnings[0].startswith("leco: warning: ") and "found in only 0%" in warnings[0]
    assert [f"leco: warning: {note}" for note in report["notes"]] == warnings  # the report says so too


@pytest.mark.parametrize(
    "command",
    [
        ["train", "c.yaml"],
        ["generate", "--model", "m", "--prompt", "a", "--out", "o"],
        ["eval", "--model", "m", "--spec", "s.yaml"],
        ["merge", "--model", "m", "--lora", "l.safetensors", "--out", "o"],
        ["convert", "l.safetensors", "--out", "k.safetensors", "--family", "sd1"],
    ],
    ids=lambda words: words[0],
)
def test_an_unknown_option_is_named_by_its_command(tmp_path, monkeypatch, command, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("c.yaml", "s.yaml", "l.safetensors"):
        (tmp_path / name).write_text("")
    code, _, err = run_cli([*command, "--bogus-option"], capsys)
    command = command[0]
    assert_one_line_error(code, err, "--bogus-option")
    assert err.startswith(f"leco {command}: error: unrecognized arguments: --bogus-option"), err
    assert f"(see leco {command} --help)" in err


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                     "you tried to allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        MemoryError(),
    ],
)  # fmt: skip
def test_running_out_of_memory_is_one_line(monkeypatch, capsys, failure):
    def run_generate(args):
        raise failure

    monkeypatch.setattr("leco.cli.run_generate", run_generate)
    code, _, err = run_cli(["generate", "--model", "m", "--prompt", "a", "--out", "o"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("leco generate: error: out of memory") and "smaller images" in err
    if isinstance(failure, RuntimeError) and "40000000000" in str(failure):
        assert "(37.3 GiB asked for at once)" in err


def test_an_output_that_cannot_be_written_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from leco.files import atomic_output

    def run_train(args):  # the save folder remounted read-only while the run trains
        with atomic_output("out/fox_8steps.safetensors") as file:
            raise OSError(errno.EROFS, "Read-only file system", file.name)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("leco.cli.run_train", run_train)
    code, _, err = run_cli(["train", "config.yaml"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("leco train: error: cannot write out/fox_8steps.safetensors (Read-only")
    assert "continues from its last save with --resume" in err
    assert list((tmp_path / "out").iterdir()) == []  # no temp file left

    def run_generate(args):  # an input that cannot be read is not called an output
        raise FileNotFoundError(
            errno.ENOENT, "No such file or directory", "model/scheduler/scheduler_config.json"
        )

    monkeypatch.setattr("leco.cli.run_generate", run_generate)
    with pytest.raises(FileNotFoundError):
        main(["generate", "--model", "m", "--prompt", "a", "--out", "o"])


def test_another_runtime_error_is_not_called_out_of_memory(monkeypatch, capsys):
    def run_generate(args):
        raise RuntimeError("something else broke")

    monkeypatch.setattr("leco.cli.run_generate", run_generate)
    with pytest.raises(RuntimeError, match="something else broke"):  # a bug stays a bug, with its traceback
        main(["generate", "--model", "m", "--prompt", "a", "--out", "o"])


def test_a_prompt_given_twice_is_drawn_once(tmp_path, tiny_folders, capsys):
    out = tmp_path / "images"
    args = ["generate", "--model", tiny_folders["sd1"], "--prompt", "a fox", "--prompt", "a fox", "--prompt"]
    code, printed, err = run_cli([*args, "a cat", "--steps", "2", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    assert "--prompt 'a fox' is given 2 times; it is drawn once" in err
    assert "wrote 2 images" in printed and len(list(out.glob("*_0_0.png"))) == 2


def test_a_full_disk_is_one_line(monkeypatch, capsys):
    import errno

    def run_generate(args):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "out/a.png")
        except OSError as error:  # as torch and safetensors raise it: wrapped in their own error
            raise RuntimeError("unexpected pos 64 vs 0") from error

    monkeypatch.setattr("leco.cli.run_generate", run_generate)
    code, _, err = run_cli(["generate", "--model", "m", "--prompt", "a", "--out", "o"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("leco generate: error: the disk is full (writing out/a.png); free some space")


def test_an_embedding_given_twice_or_also_as_a_lora_is_one_line(tmp_path, capsys):
    embedding = tmp_path / "neg.safetensors"
    save_file({"emb_params": torch.zeros(2, 8)}, str(embedding))
    spec = tmp_path / "spec.yaml"
    spec.write_text("keep: [{prompt: a, concept: 'digit:1'}]\n")
    twice = ["--embedding", f"{embedding}:<n>", "--embedding", f"{embedding}:<n>"]
    code, _, err = run_cli(
        ["generate", "--model", "m", "--prompt", "a <n>", "--out", tmp_path, *twice], capsys
    )
    assert_one_line_error(code, err, "--embedding")
    assert "is given 2 times; give it once" in err and "warning" not in err
    lora_too = ["--lora", embedding, "--embedding", embedding, "--spec", spec]
    code, _, err = run_cli(["eval", "--model", "m", *lora_too, "--out", tmp_path / "r.json"], capsys)
    assert_one_line_error(code, err, "--embedding")
    assert "is also a --lora, where it is judged as a negative embedding" in err
    other = tmp_path / "other.safetensors"  # another file, the judged one's token: both would be "<neg>"
    save_file({"emb_params": torch.ones(1, 8)}, str(other), metadata={"leco.token": "<neg>"})
    same_token = ["--lora", embedding, "--embedding", other, "--spec", spec]
    code, _, err = run_cli(["eval", "--model", "m", *same_token, "--out", tmp_path / "r.json"], capsys)
    assert_one_line_error(code, err, "--embedding")
    assert "its token '<neg>' is also the token of --lora" in err and f"--embedding {other}:NEW_TOKEN" in err
    save_file({"emb_params": torch.ones(1, 8)}, str(other), metadata={"leco.token": "neg"})
    shared = ["--embedding", embedding, "--embedding", other]  # two files, one token, no prompt using it
    code, _, err = run_cli(["generate", "--model", "m", "--prompt", "a", "--out", tmp_path, *shared], capsys)
    assert_one_line_error(code, err, "--embedding")
    assert "both use the token 'neg'" in err and "warning" not in err


@pytest.mark.parametrize(
    ("actions", "guidance", "warned"),
    [
        (["distill"], 3.0, True),
        (["distill", "preserve"], 7.0, True),
        (["distill"], 1.0, False),
        (["erase"], 3.0, False),
    ],
)
def test_generate_tells_a_distilled_lora_is_for_guidance_one(tmp_path, capsys, actions, guidance, warned):
    from leco.lora_files import warn_if_distilled

    lora = tmp_path / "cfg.safetensors"
    entries = [{"action": action, "guidance_scale": 3.0} for action in actions]
    save_file({"x": torch.zeros(1)}, str(lora), metadata={"leco.prompts": json.dumps(entries)})
    warn_if_distilled(str(lora), guidance)
    message = (
        "CFG-distilled (it draws at guidance 1 what the model draws at guidance 3); sample with --guidance 1"
    )
    assert (message in capsys.readouterr().err) == warned


def test_a_partly_distilled_lora_and_a_distilled_negative_prompt_are_said(tmp_path, capsys):
    from leco.lora_files import warn_if_distilled

    lora = tmp_path / "mixed.safetensors"
    entries = [
        {"action": "distill", "guidance_scale": 3.0, "unconditional": "blurry"},
        {"action": "erase", "guidance_scale": 1.0},
    ]
    save_file({"x": torch.zeros(1)}, str(lora), metadata={"leco.prompts": json.dumps(entries)})
    for guidance in (1.0, 3.0):
        warn_if_distilled(str(lora), guidance)
        err = capsys.readouterr().err
        assert "partly CFG-distilled" in err and "guidance 3 with negative prompt 'blurry'" in err


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGHUP"])
def test_a_termination_before_training_ends_with_one_line_like_ctrl_c(tmp_path, tiny_folders, stop_signal):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "leco", "generate", "--model", str(tiny_folders["sd1"]), "--prompt", "a cat",
         "--seeds", "0-9999", "--steps", "200", "--out", str(tmp_path / "images"), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(3)  # loading or drawing (minutes of it): either way before any training handler exists
    assert process.poll() is None
    process.send_signal(getattr(signal, stop_signal))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + getattr(signal, stop_signal) and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] in ("leco generate: aborted", "leco: aborted")


def test_a_ctrl_c_inside_a_lazy_import_aborts_as_any_ctrl_c_does(capsys, monkeypatch):
    # Ctrl-C while a library makes a class (pydantic on its first import, seen under torchrun): Python
    # raises "RuntimeError: Error calling __set_name__" caused by the KeyboardInterrupt.
    def interrupted_import(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("Error calling __set_name__ on 'cached_property' instance") from interrupt

    monkeypatch.setattr(cli, "run_generate", interrupted_import)
    code, _, err = run_cli(["generate", "--model", "ink-digits", "--prompt", "a digit two"], capsys)
    assert (code, err.strip()) == (130, "leco generate: aborted")

    def failing(args):
        raise RuntimeError("a real failure")  # not an interrupt: still raised, not hidden as one

    monkeypatch.setattr(cli, "run_generate", failing)
    with pytest.raises(RuntimeError, match="a real failure"):
        run_cli(["generate", "--model", "ink-digits", "--prompt", "a digit two"], capsys)


def test_an_empty_resume_is_one_line_before_the_config_is_read(capsys):
    code, _, err = run_cli(["train", "missing.yaml", "--resume", " "], capsys)
    assert_one_line_error(code, err, "--resume")
    assert "empty; give the *_state folder" in err


def test_generate_help_lists_every_sampler_it_takes():
    from leco.cli import build_parser
    from leco.samplers import SAMPLERS

    generate = build_parser().parse_args(["generate", "--model", "m", "--prompt", "a", "--out", "o"])
    sampler_help = next(a.help for a in generate.commands["generate"]._actions if a.dest == "sampler")
    listed = {word.strip(" ,()'") for word in sampler_help.split()}
    assert set(SAMPLERS) <= listed, set(SAMPLERS) - listed


def test_embeddings_are_named_by_their_file_as_a1111_and_comfyui_do_or_as_diffusers_does(
    capsys, tiny_folders, tmp_path
):
    from leco.embedding_files import named_as_written, read_embedding

    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    a1111 = tmp_path / "sevB.pt"  # A1111 names it by the file, never by string_to_param's key
    torch.save({"string_to_token": {"<s>": 265}, "string_to_param": {"<s>": vectors}, "name": "other"}, a1111)
    one_key = tmp_path / "learned_embeds.safetensors"  # diffusers' form: {token: vector}
    save_file({"<cat-toy>": vectors[0]}, str(one_key))
    read = read_embedding(a1111), read_embedding(one_key)
    names = [("sevb", ()), ("learned_embeds", ("<cat-toy>",))]
    assert [(e.token, e.other_names) for e in read] == names
    assert named_as_written(read_embedding(one_key), ["a <Cat-Toy> fox"]).token == "<cat-toy>"
    assert named_as_written(read_embedding(one_key), ["a learned_embeds fox"]).token == "learned_embeds"
    assert read_embedding(one_key, "<x>").other_names == ()  # a token given is the token
    renamed = tmp_path / "cat-toy.safetensors"  # a concept file renamed after its key
    save_file({"<cat-toy>": vectors[0]}, str(renamed))
    assert named_as_written(read_embedding(renamed), ["a <cat-toy> fox"]).token == "<cat-toy>"
    assert named_as_written(read_embedding(renamed), ["a cat-toy fox"]).token == "cat-toy"
    style = tmp_path / "my_style.safetensors"
    save_file({"ink": vectors[0]}, str(style))  # the key only inside a word: not adopted
    assert named_as_written(read_embedding(style), ["a pink fox"]).token == "my_style"

    def image(prompt, *embedding):
        out = tmp_path / f"images{len(list(tmp_path.iterdir()))}"
        words = ["generate", "--model", tiny_folders["sd1"], "--prompt", prompt, "--seeds", "3"]
        code, _, err = run_cli([str(w) for w in [*words, *embedding, "--out", out, "--steps", 2]], capsys)
        assert code == 0 and "in no prompt" not in err, err
        (drawn,) = (file for file in out.glob("*.png") if file.name != "grid.png")
        return np.asarray(Image.open(drawn), dtype=np.int16)

    for file, names in ((a1111, ("sevB",)), (one_key, ("learned_embeds", "<cat-toy>"))):
        plain = image("a red fox")
        for name in names:  # each name the other tools give it draws with its vectors, not as words
            given = image(f"a red fox {name}", "--embedding", f"{file}:{name.lower()}")
            assert np.array_equal(image(f"a red fox {name}", "--embedding", file), given)
            assert np.abs(given - plain).mean() > 0.5


def test_a_kohya_config_file_named_without_toml_is_read_as_kohya_reads_it(
    capsys, no_loading, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # kohya's train_util adds ".toml" to a --config_file that lacks it
    (tmp_path / "args.toml").write_text(
        'pretrained_model_name_or_path = "ink-digits"\nprompts_file = "p.toml"\nmixed_precision = "fp8"\n'
    )
    code, _, err = run_cli(["train", "--config_file", "args"], capsys)
    assert code == 2 and "args.toml: mixed_precision: 'fp8' is not one leco trains in" in err, err
    code, _, err = run_cli(["train", "args"], capsys)  # leco's own spelling takes the name as given
    assert code == 2 and "args: file not found" in err, err
    code, _, err = run_cli(["train", "--config_file", "missing.yaml"], capsys)  # no .toml there either
    assert code == 2 and "missing.yaml: file not found" in err, err


def test_a_long_library_error_is_cut_at_a_sentence_not_mid_word():
    from leco.errors import first_line

    said = OSError(
        "Can't load image processor for '/models/text_encoder'. If you were trying to load it from "
        "'https://huggingface.co/models', make sure you don't have a local directory with the same name."
    )
    assert first_line(said, 120) == "Can't load image processor for '/models/text_encoder'."
    assert first_line(ValueError("x" * 200), 50) == "x" * 47 + "..."  # no sentence short enough
    assert (
        first_line(ValueError("short. line"), 50) == "short. line"
        and first_line(ValueError()) == "ValueError"
    )

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from leco.config import PretrainedModelConfig
from leco.errors import LecoError
from leco.models import arch_from_checkpoint, load_models, probe_v_prediction


def tensors_equal(a: torch.nn.Module, b: torch.nn.Module, skip: str = "-") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


@pytest.mark.parametrize(
    ("name", "arch", "v_pred", "encoders"),
    [("sd1", "sd1", False, 1), ("sd2-v", "sd2", True, 1), ("sdxl", "sdxl", False, 2)],
)
def test_diffusers_folder_detects_the_family(tiny_folders, name, arch, v_pred, encoders):
    models = load_models(str(tiny_folders[name]))
    assert (models.family.arch, models.family.v_pred, models.family.name) == (arch, v_pred, name)
    assert len(models.text_encoders) == len(models.tokenizers) == encoders
    assert models.vae is None  # training never needs the VAE
    assert models.scheduler_config["prediction_type"] == ("v_prediction" if v_pred else "epsilon")
    assert models.resolution == 16
    assert not any(p.requires_grad for p in models.unet.parameters())


@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl"])
def test_single_file_loads_the_same_weights_offline(tmp_path, tiny_folders, tiny_single_files, name):
    reference = load_models(str(tiny_folders[name]))
    path, skip = tiny_single_files[name], "-"
    if name == "sd2-v":
        # SD2 single files are probed; a tiny random UNet answers at random, so give it a v-model's answer.
        path, skip = with_v_behaviour(path, tmp_path / "v.safetensors"), "conv_out"
    spec = PretrainedModelConfig(name_or_path=str(path), config=str(tiny_folders[name]))
    loaded = load_models(spec)
    assert loaded.family == reference.family
    assert tensors_equal(loaded.unet, reference.unet, skip=skip)
    for ours, theirs in zip(loaded.text_encoders, reference.text_encoders, strict=True):
        assert tensors_equal(ours, theirs)
    prompt = ["a watercolor of a fox"]
    for ours, theirs in zip(loaded.tokenizers, reference.tokenizers, strict=True):
        assert ours(prompt).input_ids == theirs(prompt).input_ids and ours.pad_token == theirs.pad_token


def with_v_behaviour(path: Path, out: Path) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["model.diffusion_model.out.2.bias"].fill_(-4.0)
    state["model.diffusion_model.out.2.weight"].zero_()
    save_file(state, str(out))
    return out


def test_probe_tells_v_from_epsilon(tiny_folders):
    unet = load_models(str(tiny_folders["sd1"])).unet
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(0.5)  # output = input: what an epsilon model does at t=999
        assert probe_v_prediction(unet) is False
        unet.conv_out.bias.fill_(-3.0)
        assert probe_v_prediction(unet) is True


def test_single_file_of_unknown_shape_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(LecoError, match="no Stable Diffusion UNet"):
        load_models(str(path))


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",  # kohya
        "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight",  # diffusers
        "base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight",  # peft
    ],
)
def test_a_lora_given_as_a_model_is_named_as_such(key):
    with pytest.raises(LecoError, match=r"^x.safetensors: is a LoRA, not a model"):
        arch_from_checkpoint({key: torch.zeros(2, 2)}, "x.safetensors")


@pytest.mark.parametrize("keys", [["emb_params"], ["clip_l", "clip_g"], ["string_to_param", "name"]])
def test_an_embedding_given_as_a_model_is_named_as_such(keys):
    with pytest.raises(LecoError, match=r"^x.pt: is a textual-inversion embedding, not a model; .*"):
        arch_from_checkpoint(dict.fromkeys(keys, torch.zeros(2, 8)), "x.pt")


def test_single_file_needs_matching_configs(tiny_single_files):
    # Without `config`, the shipped full-size SD1 architecture is used: a tiny file does not fit it.
    with pytest.raises(LecoError, match="do not match the sd1 architecture"):
        load_models(str(tiny_single_files["sd1"]))


@pytest.mark.parametrize("said", ["sample", "v-prediction"])
def test_a_scheduler_predicting_anything_but_noise_or_v_is_one_line(tmp_path, tiny_folders, said):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folders["sd1"], folder)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": said}))
    with pytest.raises(
        LecoError, match=rf"scheduler_config.json: prediction_type '{said}': leco trains models"
    ):
        load_models(PretrainedModelConfig(name_or_path=str(folder)))


def test_only_leco_merges_prediction_type_overrides_the_probe(tmp_path, tiny_folders, tiny_single_files):
    """kohya's merge labels every SD2 model "v"; a file leco merged states what it knows."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_single_files["sd2-v"]))  # random weights: the probe says epsilon
    said = {"modelspec.prediction_type": "v"}
    for name, metadata, v_pred in (("other", said, False), ("leco", {**said, "leco.merge": "[]"}, True)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        spec = PretrainedModelConfig(
            name_or_path=str(tmp_path / f"{name}.safetensors"), config=str(tiny_folders["sd2-v"])
        )
        assert load_models(spec).family.v_pred is v_pred, name


def test_what_a_file_says_it_predicts_is_read_and_a_probes_guess_gives_way(
    tmp_path, tiny_folders, tiny_single_files, capsys
):
    """SDXL has no probe: a file's v_pred / ztsnr keys (as ComfyUI reads them) or its config folder's
    scheduler say what it predicts; SD2's probe guess yields to an explicit v_pred, with a word."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_single_files["sdxl"]))
    marked = tmp_path / "vpred.safetensors"
    save_file({**tensors, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, str(marked))
    layout = str(tiny_folders["sdxl"])  # the tiny models' layout (its scheduler says epsilon)
    loaded = load_models(PretrainedModelConfig(name_or_path=str(marked), config=layout))
    assert loaded.family.v_pred and loaded.scheduler_config["rescale_betas_zero_snr"] is True
    plain = load_models(PretrainedModelConfig(name_or_path=str(tiny_single_files["sdxl"]), config=layout))
    assert not plain.family.v_pred and not plain.scheduler_config.get("rescale_betas_zero_snr")
    v_folder = tmp_path / "sdxl-v"
    shutil.copytree(tiny_folders["sdxl"], v_folder)
    scheduler = v_folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    spec = PretrainedModelConfig(name_or_path=str(tiny_single_files["sdxl"]), config=str(v_folder))
    assert load_models(spec).family.v_pred
    sd2 = load_file(str(tiny_single_files["sd2-v"]))  # random weights: the probe guesses epsilon
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    # the folder's scheduler (v_prediction) is not taken for SD2 (512 and 768-v share a layout), but
    # where the probe says otherwise, the user is told, with the key that takes the folder's word
    folder_says = PretrainedModelConfig(
        name_or_path=str(tmp_path / "sd2.safetensors"), config=str(tiny_folders["sd2-v"])
    )
    assert not load_models(folder_says).family.v_pred
    assert "reads it as epsilon-prediction, though its config folder" in capsys.readouterr().err
    spec = PretrainedModelConfig(
        name_or_path=str(tmp_path / "sd2.safetensors"), v_pred=True, config=str(tiny_folders["sd2-v"])
    )
    assert load_models(spec).family.v_pred
    assert (
        "pretrained_model.v_pred: true, as set (the UNet probe guessed epsilon-prediction)"
        in capsys.readouterr().err
    )


def test_checkpoint_structure_detection(tiny_single_files):
    from safetensors.torch import load_file

    for name, arch in (("sd1", "sd1"), ("sd2-v", "sd2"), ("sdxl", "sdxl")):
        assert arch_from_checkpoint(load_file(str(tiny_single_files[name]))) == arch


def test_pickle_checkpoints_need_opt_in_and_load_weights_only(tmp_path, tiny_folders, tiny_single_files):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_single_files["sd1"]))}, ckpt)
    with pytest.raises(LecoError, match="allow_pickle: true"):
        load_models(str(ckpt))
    spec = PretrainedModelConfig(name_or_path=str(ckpt), allow_pickle=True, config=str(tiny_folders["sd1"]))
    assert tensors_equal(load_models(spec).unet, load_models(str(tiny_folders["sd1"])).unet)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(LecoError, match="cannot be read safely"):
        load_models(PretrainedModelConfig(name_or_path=str(evil), allow_pickle=True))


def test_contradicting_flags_are_errors(tiny_folders):
    with pytest.raises(LecoError, match="pretrained_model.v2: is true but .* is an sd1 model"):
        load_models(PretrainedModelConfig(name_or_path=str(tiny_folders["sd1"]), v2=True))
    with pytest.raises(LecoError, match="pretrained_model.v2: is false .* sd2"):
        load_models(PretrainedModelConfig(name_or_path=str(tiny_folders["sd2-v"]), v2=False))
    with pytest.raises(LecoError, match="v_pred: is false but .*scheduler_config.json says v-prediction"):
        load_models(PretrainedModelConfig(name_or_path=str(tiny_folders["sd2-v"]), v_pred=False))
    agreed = load_models(PretrainedModelConfig(name_or_path=str(tiny_folders["sd2-v"]), v2=True, v_pred=True))
    assert agreed.family.name == "sd2-v"


def test_vae_is_loaded_only_on_request(tiny_folders):
    assert load_models(str(tiny_folders["sd1"])).vae is None  # training needs no VAE: not loaded
    assert load_models(str(tiny_folders["sd1"]), with_vae=True).vae is not None


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(LecoError, match="neither a file, a folder nor a Hugging Face repo id"):
        load_models(str(tmp_path / "missing" / "model.safetensors"))
    for relative in ("./missing-model", "../missing-model", "-x/model", "x/model."):  # the Hub allows none
        with pytest.raises(LecoError, match="neither a file, a folder nor a Hugging Face repo id"):
            load_models(relative)
    with pytest.raises(LecoError, match="not a complete diffusers model folder"):
        load_models(str(tmp_path))
    with pytest.raises(LecoError, match=r"\(relative paths are read from .*\); fix the path"):
        load_models("./missing-model")
    for misspelt, shipped in (("ink_digits", "ink-digits"), ("Ink Digits 2", "ink-digits-2")):
        with pytest.raises(LecoError, match=f"; did you mean {shipped} \\(a model leco ships\\)\\?$"):
            load_models(misspelt)


@pytest.mark.parametrize("part", ["unet", "tokenizer"])
def test_a_damaged_part_of_a_model_folder_is_named(tmp_path, tiny_folders, part):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folders["sd1"], folder)
    if part == "unet":
        damaged = folder / "unet" / "diffusion_pytorch_model.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:100])  # a download cut short
    else:
        for file in (folder / "tokenizer").iterdir():  # a copy cut short
            file.write_text("{")
    with pytest.raises(
        LecoError, match=rf"is a damaged or incomplete diffusers model folder \(its {part}/ cannot"
    ):
        load_models(str(folder))


def test_a_revision_of_a_model_on_disk_is_said_to_be_ignored(tiny_folders, capsys):
    load_models(PretrainedModelConfig(name_or_path=str(tiny_folders["sd1"]), revision="v1.0"))
    assert "pretrained_model.revision: " in capsys.readouterr().err
    load_models(PretrainedModelConfig(name_or_path=str(tiny_folders["sd1"])))
    assert "revision" not in capsys.readouterr().err


@pytest.mark.parametrize("part", ["unet", "text_encoder", "vae"])
def test_a_part_of_a_model_folder_without_weights_is_named_in_one_line(tmp_path, tiny_folders, part, capfd):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_folders["sd1"], folder)
    for weights in (folder / part).glob("*.safetensors"):
        weights.unlink()  # a copy that left the large files behind
    with pytest.raises(LecoError, match=rf"incomplete diffusers model folder: its {part}/ holds no weights"):
        load_models(str(folder), with_vae=True)
    assert capfd.readouterr().err == ""  # no library's log line before leco's error


def test_a_part_of_a_model_folder_is_named_not_fetched_as_a_hub_repo(tiny_folders, monkeypatch):
    """`model/unet` exists here and looks like owner/name: it must not reach for the Hub."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    part = Path(tiny_folders["sd1"]) / "unet"
    with pytest.raises(
        LecoError, match=r"unet is not a complete diffusers model folder \(no unet/, text_encoder/"
    ):
        load_models(str(part))
    with pytest.raises(
        LecoError, match=rf"; {re.escape(str(Path(tiny_folders['sd1']).resolve()))} is one: give"
    ):
        load_models(str(part))
    # the tests run with HF_HUB_OFFLINE=1 (conftest): the answer comes at once, from the cache
    with pytest.raises(LecoError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_models("nobody-here/no-such-model")


def test_hub_repo_id_loads_from_the_local_cache_offline(tmp_path, tiny_folders):
    # Lay the folder out the way huggingface_hub caches a download, then resolve the repo id offline.
    import shutil

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--leco-tests--tiny-sd1"
    shutil.copytree(tiny_folders["sd1"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = "from leco.models import load_models; print(load_models('leco-tests/tiny-sd1').family.name)"
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "sd1"


def test_a_models_name_for_metadata_and_infotext(tmp_path, monkeypatch):
    from leco.ink_digits import model_path
    from leco.models import model_name, recorded_model_name

    assert (
        model_name("C:\\models\\dream.ckpt") == "dream"
        and recorded_model_name("C:\\models\\dream.ckpt") == "dream.ckpt"
    )
    assert model_name(str(model_path("ink-digits"))) == "ink-digits"  # the bundled model's folder
    assert model_name("x" * 300) == "x" * 300  # too long for a path: a name, not an OSError
    assert model_name("ink-digits/..", on_disk=False) == ".."  # metadata is never looked up on disk
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    assert model_name(".") == recorded_model_name(".") == recorded_model_name("./") == "my-model"
    assert recorded_model_name("..") == tmp_path.name

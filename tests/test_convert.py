"""`leco convert`: p1atdev/LECO and sliders files -> kohya files that leco and diffusers load alike."""

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from leco import __version__
from leco.cli import main
from leco.conditioning import Conditioning, predict, sdxl_time_ids
from leco.config import NetworkConfig
from leco.errors import LecoError
from leco.interop.convert import convert
from leco.interop.merge import LoraStrength, bake
from leco.lora_files import check_lora_fits, lora_strengths, read_lora_header
from leco.models import CONFIG_ROOT, ModelFamily, load_models
from leco.network import LoRANetwork, adaptable_layers, read_lora_file
from leco.network.kohya import ModuleWeights, delta_weight, kohya_key


def foreign_state_dict(unet, block_class: str, rank: int, alpha: float, seed: int, dtype=torch.float32):
    """A LoRA as p1atdev/LECO (block_class Transformer2DModel) or sliders (Attention) write it.

    Both wrap every Linear/Conv2d inside blocks of that class; the key is `lora_unet` + the
    diffusers module path, dots turned into underscores; alpha is a buffer saved in the weights' dtype.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, block in unet.named_modules():
        if block.__class__.__name__ != block_class:
            continue
        for child_name, child in block.named_modules():
            if child.__class__.__name__ == "Linear":
                down_shape, up_shape = (rank, child.in_features), (child.out_features, rank)
            elif child.__class__.__name__ == "Conv2d":
                down_shape = (rank, child.in_channels, *child.kernel_size)
                up_shape = (child.out_channels, rank, 1, 1)
            else:
                continue
            key = f"lora_unet.{name}.{child_name}".replace(".", "_")
            state[f"{key}.lora_down.weight"] = (torch.randn(down_shape, generator=generator) * 0.3).to(dtype)
            state[f"{key}.lora_up.weight"] = (torch.randn(up_shape, generator=generator) * 0.3).to(dtype)
            state[f"{key}.alpha"] = torch.tensor(alpha).to(dtype)
    return state


def full_size_unet(family: str, **changes) -> UNet2DConditionModel:
    with init_empty_weights():
        config = UNet2DConditionModel.load_config(CONFIG_ROOT / family, subfolder="unet")
        return UNet2DConditionModel.from_config({**config, **changes})


def kohya_module_shape_mismatches(tensors: dict[str, torch.Tensor], unet: UNet2DConditionModel) -> int:
    """How many tensors kohya's LoRAModule would refuse: it builds lora_down/up from the layer's type
    (Conv2d: [r, in, kh, kw] / [out, r, 1, 1]; Linear: [r, in] / [out, r]) and loads without reshaping."""
    layers = {"lora_unet_" + n.replace(".", "_"): unet.get_submodule(n) for n in adaptable_layers(unet)}
    mismatches = 0
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        if part == "alpha":
            continue
        layer, rank = layers[module], tensors[f"{module}.lora_down.weight"].shape[0]
        if isinstance(layer, torch.nn.Conv2d):
            down, up = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
        else:
            down, up = (rank, layer.in_features), (layer.out_features, rank)
        mismatches += tuple(value.shape) != (down if part.startswith("lora_down") else up)
    return mismatches


def unet_prediction(unet, sdxl: bool, pooled_dim: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, unet.config.sample_size, unet.config.sample_size, generator=generator)
    cond = Conditioning(torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator))
    if sdxl:
        pooled = torch.randn(2, pooled_dim, generator=generator)
        cond = Conditioning(cond.hidden_states, pooled=pooled).with_time_ids(sdxl_time_ids(16, 16))
    with torch.no_grad():
        return predict(unet, latents, torch.tensor([500, 20]), cond)


@pytest.mark.parametrize(
    ("name", "writer", "suffix"),
    [
        ("sdxl", "Transformer2DModel", ".safetensors"),
        ("sdxl", "Attention", ".pt"),
        ("sd1", "Attention", ".pt"),
    ],
    ids=["p1atdev-sdxl", "sliders-sdxl", "sliders-sd1"],
)
def test_foreign_file_converts_and_loads_alike_in_leco_and_diffusers(
    tmp_path, tiny_folders, name, writer, suffix
):
    folder = str(tiny_folders[name])
    pipe = DiffusionPipeline.from_pretrained(folder)
    foreign = foreign_state_dict(pipe.unet, writer, rank=2, alpha=1.0, seed=0, dtype=torch.bfloat16)
    source = tmp_path / f"slider{suffix}"
    if suffix == ".pt":
        torch.save(foreign, source)
    else:
        save_file(foreign, str(source))
    out = convert(source, tmp_path / "converted.safetensors", model=folder)

    tensors, metadata = read_lora_file(out)
    family = ModelFamily(name.split("-")[0])
    expected = {}
    for key, value in foreign.items():
        module, _, part = key.partition(".")
        path = next(n for n in adaptable_layers(pipe.unet) if "lora_unet_" + n.replace(".", "_") == module)
        new_key = f"{kohya_key(path, family, pipe.unet.config)}.{part}"
        expected[new_key] = value.float() if part == "alpha" else value
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in expected.items())
    if name == "sdxl":
        assert all(
            k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
            for k in tensors
        )

    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "1")
    assert metadata["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[name]
    assert metadata["modelspec.implementation_version"] == f"leco/{__version__}"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    raw = out.read_bytes()  # of the bytes after the JSON header, which the new metadata changed
    assert (
        metadata["sshs_model_hash"]
        == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    )
    assert metadata["leco.converted_from"] == source.name and metadata["modelspec.title"] == "converted"

    models = load_models(folder)
    pooled = getattr(models.text_encoders[-1].config, "projection_dim", 0)
    base = unet_prediction(models.unet, family.is_sdxl, pooled)
    network = LoRANetwork.from_file(models.unet, models.family, out)
    ours = unet_prediction(models.unet, family.is_sdxl, pooled)
    pipe.load_lora_weights(str(out))
    theirs = unet_prediction(pipe.unet, family.is_sdxl, pooled)
    assert len(network) == len(foreign) // 3
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


def test_family_option_needs_no_weights_and_maps_full_size_sdxl(tmp_path):
    unet = full_size_unet("sdxl")
    foreign = foreign_state_dict(unet, "Attention", rank=1, alpha=1.0, seed=1)
    torch.save(foreign, tmp_path / "slider.pt")
    out = convert(tmp_path / "slider.pt", tmp_path / "slider.safetensors", family="sdxl")
    tensors, metadata = read_lora_file(out)
    assert len(tensors) == len(foreign) == 3 * 560  # 70 transformer blocks x 2 attentions x q, k, v, out
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k.lora_up.weight" in tensors
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.resolution"] == "1024x1024"


def test_metadata_naming_another_model_is_told_where_conversion_rewrites_it(tmp_path, capsys):
    foreign = foreign_state_dict(full_size_unet("sd1"), "Attention", rank=1, alpha=1.0, seed=2)
    said = {"ss_base_model_version": "sd_v2", "modelspec.prediction_type": "v"}
    save_file(foreign, str(tmp_path / "v2.safetensors"), said)
    out = convert(tmp_path / "v2.safetensors", tmp_path / "out.safetensors", family="sd1")
    warning = capsys.readouterr().err
    assert (
        "its metadata says sd2 (ss_base_model_version), but its layers fit this sd1 model; written as sd1"
        in warning
    )
    assert "trained on a v-prediction model and this sd1 model predicts epsilon" in warning
    assert read_lora_file(out)[1]["modelspec.prediction_type"] == "epsilon"


def test_unmappable_keys_are_errors_naming_the_first(tmp_path):
    unet = full_size_unet("sd1")
    foreign = foreign_state_dict(unet, "Attention", rank=1, alpha=1.0, seed=2)
    foreign["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(1, 320)
    foreign["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(320, 1)
    save_file(foreign, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        LecoError, match="lora_unet_down_blocks_9_attentions_0_proj_in matches no layer of this sd1"
    ) as refused:
        convert(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", family="sd1")
    # every other module fits sd1: a model of another layout, or a damaged file; both are named
    assert re.search(
        r"though \d+ of its other modules do; it was made for a model of another layout", str(refused.value)
    )
    assert "another model" not in str(refused.value)

    sd1_file = foreign_state_dict(unet, "Attention", rank=1, alpha=1.0, seed=2)
    save_file(sd1_file, str(tmp_path / "sd1.safetensors"))
    # SD2 has the same module names but a wider text condition: the shapes tell them apart.
    with pytest.raises(
        LecoError, match=r"attn2_to_k.lora_down.weight has shape \[1, 768\] but the layer needs \[1, 1024\]"
    ):
        convert(tmp_path / "sd1.safetensors", tmp_path / "out.safetensors", family="sd2")
    assert not (tmp_path / "out.safetensors").exists()


def test_pickled_code_is_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    for protocol in (2, 4):  # torch's warning about protocol 4 stays out of the one line
        torch.save({"lora_unet_x.alpha": Payload()}, tmp_path / "evil.pt", pickle_protocol=protocol)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(LecoError, match=r"cannot be read safely .*torch's safe reader refused it \("):
                convert(tmp_path / "evil.pt", tmp_path / "out.safetensors", family="sd1")
    assert not (tmp_path / "pwned").exists()
    torch.save({"lora_unet_x.alpha": print}, tmp_path / "print.pt")
    # torch's reason (the global it refused), not its advice to pass weights_only=False
    with pytest.raises(LecoError, match=r"refused it \(Unsupported global: GLOBAL print was not"):
        convert(tmp_path / "print.pt", tmp_path / "out.safetensors", family="sd1")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(LecoError, match="not a LoRA state dict"):
        convert(tmp_path / "list.pt", tmp_path / "out.safetensors", family="sd1")


def test_sd2_projections_in_the_form_each_tool_needs(tmp_path, tiny_folders):
    # kohya's scripts build SD2 checkpoints' proj_in/proj_out as 1x1 convs; diffusers as Linear.
    sd2 = full_size_unet("sd2")
    foreign = foreign_state_dict(sd2, "Transformer2DModel", rank=1, alpha=1.0, seed=3)
    save_file(foreign, str(tmp_path / "sd2.safetensors"))
    linear = convert(tmp_path / "sd2.safetensors", tmp_path / "2d.safetensors", family="sd2")
    conv = convert(tmp_path / "sd2.safetensors", tmp_path / "4d.safetensors", family="sd2", sd2_proj="4d")
    kohya_unet = full_size_unet("sd2", use_linear_projection=False)
    assert kohya_module_shape_mismatches(read_lora_file(linear)[0], kohya_unet) == 64
    assert kohya_module_shape_mismatches(read_lora_file(conv)[0], kohya_unet) == 0
    assert read_lora_file(conv)[1]["leco.sd2_proj"] == "4d"
    back = convert(conv, tmp_path / "back.safetensors", family="sd2")  # 4-D in, 2-D out
    assert all(torch.equal(v, read_lora_file(linear)[0][k]) for k, v in read_lora_file(back)[0].items())
    assert "leco.sd2_proj" not in read_lora_file(back)[1]  # the input's form is not copied onto the output
    cross_attention = {k: v for k, v in foreign.items() if "proj_in" not in k and "proj_out" not in k}
    save_file(cross_attention, str(tmp_path / "xattn.safetensors"))
    unchanged = convert(
        tmp_path / "xattn.safetensors", tmp_path / "x4d.safetensors", family="sd2", sd2_proj="4d"
    )
    assert "leco.sd2_proj" not in read_lora_file(unchanged)[1]  # not stamped 4d: there is nothing 4-D in it

    # On a real (tiny) SD2 model: leco reads both forms the same, diffusers only the 2-D one.
    folder = str(tiny_folders["sd2-v"])
    models = load_models(folder)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_()
    ours = network.save(tmp_path / "ours.safetensors", resolution=16)
    network.remove()
    conv = convert(ours, tmp_path / "ours4d.safetensors", model=folder, sd2_proj="4d")
    assert read_lora_file(conv)[0]["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].ndim == 4
    predictions = []
    for path in (ours, conv):
        loaded = LoRANetwork.from_file(models.unet, models.family, path)
        predictions.append(unet_prediction(models.unet, False))
        loaded.remove()
    torch.testing.assert_close(predictions[0], predictions[1])
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(ours))
    torch.testing.assert_close(unet_prediction(pipe.unet, False), predictions[0], rtol=1e-4, atol=2e-5)
    pipe.unload_lora_weights()
    with pytest.raises(RuntimeError, match="size mismatch"):
        pipe.load_lora_weights(str(conv))
    pipe.unload_lora_weights()
    with lora_strengths(pipe, conv, models.family) as set_strength:  # generate and eval read it anyway
        set_strength(1.0)
        torch.testing.assert_close(unet_prediction(pipe.unet, False), predictions[0], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_generate_applies_each_modules_own_alpha_as_kohya_does(tmp_path, tiny_folders, name):
    # diffusers files the attention layers' alphas under names no layer has; with alphas that differ
    # (resized LoRAs) those layers got the most common alpha. generate and eval must apply kohya's formula.
    folder = str(tiny_folders[name])
    models = load_models(folder)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(std=0.3)  # small: the tiny models amplify rounding at large weights
    plain = network.save(tmp_path / "plain.safetensors", resolution=16)
    network.remove()
    tensors, metadata = read_lora_file(plain)
    for index, key in enumerate(sorted(k for k in tensors if k.endswith(".alpha"))):
        tensors[key] = torch.tensor(float(1 + index % 4))  # alphas 1, 2, 3, 4 in turn
    save_file(tensors, str(tmp_path / "alphas.safetensors"), metadata)
    loaded = LoRANetwork.from_file(models.unet, models.family, tmp_path / "alphas.safetensors")
    sdxl, pooled = name == "sdxl", models.text_encoders[-1].config.projection_dim if name == "sdxl" else 0
    expected = unet_prediction(models.unet, sdxl, pooled)
    loaded.remove()
    base = unet_prediction(models.unet, sdxl, pooled)
    pipe = DiffusionPipeline.from_pretrained(folder)
    with lora_strengths(pipe, tmp_path / "alphas.safetensors", models.family) as set_strength:
        set_strength(1.0)
        got = unet_prediction(pipe.unet, sdxl, pooled)
    assert (expected - base).abs().max() > 1e-2  # the LoRA does something to compare
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)  # alpha/rank folded in: rounding


def test_generate_reads_1x1_tensors_in_either_form_as_merge_and_comfyui_do(tmp_path, tiny_folders):
    # Some tools write SD1's 1x1-conv proj_in/proj_out, or a 3x3 conv's lora_up, as 2-D tensors; merge,
    # convert, A1111 and ComfyUI reshape them, diffusers refuses them ("size mismatch").
    folder = str(tiny_folders["sd1"])
    models = load_models(folder)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(type="c3lier", rank=2))
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(std=0.3)
    saved = network.save(tmp_path / "4d.safetensors", resolution=16)
    expected = unet_prediction(models.unet, False)
    network.remove()
    tensors, metadata = read_lora_file(saved)
    flattened = {
        key: value.flatten(1) if ("proj_in" in key or "conv1.lora_up" in key) and value.ndim == 4 else value
        for key, value in tensors.items()
    }
    assert sum(a.ndim != b.ndim for a, b in zip(tensors.values(), flattened.values(), strict=True)) >= 4
    save_file(flattened, str(tmp_path / "2d.safetensors"), {**metadata, "ss_sd_model_name": folder})
    pipe = DiffusionPipeline.from_pretrained(folder)
    with lora_strengths(pipe, tmp_path / "2d.safetensors", models.family, folder) as set_strength:
        set_strength(1.0)
        torch.testing.assert_close(unet_prediction(pipe.unet, False), expected, rtol=1e-3, atol=1e-4)

    # A file that fits no form is refused naming its layer, and not sent back to the model it names.
    flattened["lora_unet_mid_block_resnets_0_conv1.lora_down.weight"] = torch.zeros(2, 5)
    save_file(flattened, str(tmp_path / "bad.safetensors"), {**metadata, "ss_sd_model_name": folder})
    with (
        pytest.raises(LecoError) as error,
        lora_strengths(pipe, tmp_path / "bad.safetensors", models.family, folder),
    ):
        pass
    message = str(error.value)
    assert "lora_unet_mid_block_resnets_0_conv1.lora_down.weight has shape [2, 5]" in message, message
    assert f"its metadata names this very model ({folder!r})" in message and "give --model" not in message


def test_each_tensor_of_a_module_takes_its_layers_form_on_its_own():
    from leco.network.kohya import fit_to_layer

    linear, conv = torch.nn.Linear(8, 16), torch.nn.Conv2d(8, 16, 1)
    for down, up in (((4, 8, 1, 1), (16, 4)), ((4, 8), (16, 4, 1, 1)), ((4, 8, 1, 1), (16, 4, 1, 1))):
        fitted = fit_to_layer(ModuleWeights(torch.ones(down), torch.ones(up), 1.0), linear, "m")
        assert (fitted.down.shape, fitted.up.shape) == ((4, 8), (16, 4))
        fitted = fit_to_layer(ModuleWeights(torch.ones(down), torch.ones(up), 1.0), conv, "m")
        assert (fitted.down.shape, fitted.up.shape) == ((4, 8, 1, 1), (16, 4, 1, 1))


def test_a_tensor_that_fits_no_form_is_named_by_its_shape_in_the_file():
    from leco.network.kohya import LoraDoesNotFit, fit_to_layer

    conv = torch.nn.Conv2d(8, 16, 1)
    with pytest.raises(
        LoraDoesNotFit, match=r"m.lora_down.weight has shape \[4, 5\] but the layer needs \[4, 8, 1, 1\]"
    ):
        fit_to_layer(ModuleWeights(torch.ones(4, 5), torch.ones(16, 4), 1.0), conv, "m")


def test_a_partly_fitting_file_that_names_this_very_model_is_said_to_be_changed(tmp_path, tiny_folders):
    folder = str(tiny_folders["sd1"])
    models = load_models(folder)
    tensors = foreign_state_dict(models.unet, "Attention", rank=1, alpha=1.0, seed=2)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(1, 32)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 1)
    save_file(tensors, str(tmp_path / "bad.safetensors"), {"ss_sd_model_name": Path(folder).name})
    with pytest.raises(LecoError) as refused:
        convert(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", model=folder)
    message = str(refused.value)
    assert "though" in message and f"its metadata names this very model ({Path(folder).name!r})" in message
    assert "as --model" not in message and "give --model" not in message  # it is the model given


def test_cli_convert(tmp_path, capsys):
    foreign = foreign_state_dict(full_size_unet("sd1"), "Attention", rank=1, alpha=1.0, seed=4)
    torch.save(foreign, tmp_path / "s.pt")
    out = tmp_path / "s.safetensors"
    assert main(["convert", str(tmp_path / "s.pt"), "--out", str(out), "--family", "sd1"]) == 0
    assert json.loads(read_lora_file(out)[1]["ss_network_args"]) == {}
    assert main(["convert", str(tmp_path / "s.pt"), "--out", str(out), "--family", "sd1"]) == 2
    assert "exists; choose another path or pass --overwrite" in capsys.readouterr().err
    again = ["convert", str(tmp_path / "s.pt"), "--out", str(out), "--family", "sd1", "--overwrite"]
    again.append("--no-progress")  # as a script may give every command
    assert main(again) == 0  # an earlier conversion is a LoRA: replaced
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    assert main([*again[:3], str(notes), *again[4:]]) == 2
    assert "is not a LoRA" in capsys.readouterr().err and notes.read_text() == "my notes"
    assert main(["convert", str(tmp_path / "s.pt"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "either --model M or --family" in capsys.readouterr().err
    both = ["--out", str(tmp_path / "x.safetensors"), "--family", "sd1", "--model", "ink-digits"]
    assert main(["convert", str(tmp_path / "s.pt"), *both]) == 2
    assert "give --model or --family, not both" in capsys.readouterr().err
    code = main(
        [
            "convert",
            str(tmp_path / "s.pt"),
            "--out",
            str(tmp_path / "y.safetensors"),
            "--family",
            "sd1",
            "--sd2-proj",
            "4d",
        ]
    )
    assert code == 2 and "--sd2-proj 4d: only for SD2, whose Linear proj_in" in capsys.readouterr().err
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["notes.safetensors", "s.pt", "s.safetensors"]


def test_every_lora_file_names_its_writer(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig())
    _, metadata = read_lora_file(network.save(tmp_path / "a.safetensors", resolution=16))
    assert metadata["modelspec.implementation_version"] == f"leco/{__version__}"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"


def test_convert_keeps_the_files_rank_alpha_title_and_date_where_the_tensors_allow(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2, alpha=1.0))
    saved = network.save(tmp_path / "mine.safetensors", resolution=16)
    network.remove()
    tensors, metadata = read_lora_file(saved)
    alphas = sorted(k for k in tensors if k.endswith(".alpha"))
    for key in alphas[: len(alphas) // 2]:  # as many modules at alpha 2 as at alpha 1: a tie
        tensors[key] = torch.tensor(2.0)
    for said in ("1", "2.0"):
        metadata = {**metadata, "ss_network_alpha": said, "modelspec.title": "My LoRA"}
        metadata["modelspec.date"] = "2024-01-02T03:04:05+00:00"
        save_file(tensors, str(tmp_path / "tie.safetensors"), metadata)
        out = convert(
            tmp_path / "tie.safetensors", tmp_path / f"o{said}.safetensors", model=str(tiny_folders["sd1"])
        )
        written = read_lora_file(out)[1]
        assert float(written["ss_network_alpha"]) == float(said)  # of two pairs as common, the one it said
        assert written["modelspec.title"] == "My LoRA" and written["modelspec.date"].startswith("2024-01-02")


@pytest.mark.parametrize("varied_alphas", [False, True])
def test_generate_hands_diffusers_the_layers_leco_does_not_train(
    tmp_path, tiny_folders, varied_alphas, capsys
):
    # a LyCORIS-style module on conv_in: outside leco's layer list, diffusers' to read as before
    folder = str(tiny_folders["sd1"])
    models = load_models(folder)
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(type="c3lier", rank=2))
    saved = network.save(tmp_path / "mine.safetensors", resolution=16)
    network.remove()
    tensors, metadata = read_lora_file(saved)
    conv_in = models.unet.conv_in
    tensors["lora_unet_conv_in.lora_down.weight"] = torch.randn(2, conv_in.in_channels, 3, 3) * 0.1
    tensors["lora_unet_conv_in.lora_up.weight"] = torch.randn(conv_in.out_channels, 2, 1, 1) * 0.1
    tensors["lora_unet_conv_in.alpha"] = torch.tensor(3.0 if varied_alphas else 1.0)
    save_file(tensors, str(tmp_path / "more.safetensors"), metadata)
    pipe = DiffusionPipeline.from_pretrained(folder)
    with lora_strengths(pipe, tmp_path / "more.safetensors", models.family) as set_strength:
        set_strength(1.0)
        assert hasattr(pipe.unet.conv_in, "lora_A")  # adapted, not refused as another family's file
    # ... and what diffusers applies, leco's checks call applied and merge bakes (as A1111 and ComfyUI)
    check_lora_fits(read_lora_header(tmp_path / "more.safetensors"), models.unet, models.family)
    assert "not applied" not in capsys.readouterr().err
    before = models.unet.conv_in.weight.clone()
    bake(models, LoraStrength(tmp_path / "more.safetensors", 0.5))
    delta = delta_weight(
        ModuleWeights(
            tensors["lora_unet_conv_in.lora_down.weight"],
            tensors["lora_unet_conv_in.lora_up.weight"],
            tensors["lora_unet_conv_in.alpha"],
        ),
        before.shape,
    )
    torch.testing.assert_close(models.unet.conv_in.weight, before + 0.5 * delta)


def test_a_lora_of_whole_numbers_is_refused_in_one_line_everywhere(tmp_path, tiny_folders):
    from leco.lora_files import read_lora_header

    models = load_models(str(tiny_folders["sd1"]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(rank=2))
    lora = network.save(tmp_path / "lora.safetensors", resolution=models.resolution)
    tensors, metadata = read_lora_file(lora)
    damaged = tmp_path / "ints.safetensors"
    save_file({k: v.to(torch.int32) for k, v in tensors.items()}, str(damaged), metadata)
    with pytest.raises(LecoError, match=r"lora_down.weight holds int32 values, not floating-point weights"):
        convert(damaged, tmp_path / "out.safetensors", model=str(tiny_folders["sd1"]))
    with pytest.raises(LecoError, match=r"lora_down.weight holds int32 values, not floating-point weights"):
        read_lora_header(damaged)
    assert not (tmp_path / "out.safetensors").exists()
    torch.save({k: v.to(torch.int32) for k, v in tensors.items()}, tmp_path / "ints.pt")  # a sliders .pt
    with pytest.raises(LecoError, match=r"lora_down.weight holds int32 values"):
        read_lora_file(tmp_path / "ints.pt")
    torch.save({k: v.to(torch.int32) for k, v in tensors.items()}, tmp_path / "ints.pt")  # a sliders .pt
    with pytest.raises(LecoError, match=r"lora_down.weight holds int32 values"):
        read_lora_file(tmp_path / "ints.pt")
    whole_alpha = {k: (v.to(torch.int64) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    save_file(whole_alpha, str(tmp_path / "alpha.safetensors"), metadata)
    assert read_lora_file(tmp_path / "alpha.safetensors")[0].keys() == tensors.keys()  # an alpha may be whole

import hashlib
import json
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from leco.conditioning import Conditioning, predict, sdxl_time_ids
from leco.config import NetworkConfig
from leco.errors import LecoError
from leco.models import CONFIG_ROOT, ModelFamily, load_models
from leco.network import LoRANetwork, adaptable_layers, read_lora_file, select_layers
from leco.network.kohya import kohya_key, legacy_hash
from leco.network.sgm_names import to_sgm_name


def full_size_unet(family: str) -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(CONFIG_ROOT / family, subfolder="unet")
        )


@pytest.fixture(scope="module")
def full_size():
    return {name: full_size_unet(name) for name in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize(
    ("family", "lierla", "conv3x3", "linear_in_resnets"),
    [("sd1", 192, 50, 36), ("sd2", 192, 50, 36), ("sdxl", 722, 38, 28)],
)
def test_full_size_module_counts(full_size, family, lierla, conv3x3, linear_in_resnets):
    unet = full_size[family]
    assert len(select_layers(unet, "lierla", "full")) == lierla
    extra = [
        n
        for n in select_layers(unet, "c3lier", "full")
        if n not in set(select_layers(unet, "lierla", "full"))
    ]
    kernels = [
        tuple(unet.get_submodule(n).kernel_size) if hasattr(unet.get_submodule(n), "kernel_size") else None
        for n in extra
    ]
    assert sum(k == (3, 3) for k in kernels) == conv3x3
    assert sum(k != (3, 3) for k in kernels) == linear_in_resnets
    # ai-toolkit's lora: every Linear and 1x1 conv of the UNet (230 on SD1, as its own network counts),
    # the timestep embedding (and SDXL's size embedding) included; with conv every 3x3 conv too
    outside = 4 if family == "sdxl" else 2
    every_linear = select_layers(unet, "all-linear", "full")
    assert len(every_linear) == lierla + linear_in_resnets + outside
    assert len(select_layers(unet, "all", "full")) == len(every_linear) + conv3x3 + 2  # conv_in, conv_out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_presets_select_what_they_say(full_size, family):
    unet = full_size[family]
    for network_type in ("lierla", "c3lier"):
        full = select_layers(unet, network_type, "full")
        xattn = select_layers(unet, network_type, "xattn")
        strict = select_layers(unet, network_type, "xattn-strict")
        noxattn = select_layers(unet, network_type, "noxattn")
        selfattn = select_layers(unet, network_type, "selfattn")
        assert xattn and all(".attn2." in n for n in xattn)
        assert {n.rsplit(".", 1)[-1] for n in xattn} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
        assert strict and {n.rsplit(".", 1)[-1] for n in strict} == {"to_k", "to_v"}
        assert selfattn and all(".attn1." in n for n in selfattn)
        assert sorted(noxattn + xattn) == sorted(full)  # ESD-u and ESD-x split the network
        assert len(xattn) == len(selfattn)  # one cross- and one self-attention per transformer block
        assert select_layers(unet, network_type, "innoxattn") == noxattn


def test_a_preset_that_selects_nothing_is_an_error():
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        norm_num_groups=8,
        sample_size=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=8,
    )
    with pytest.raises(LecoError, match="selects no layer"):
        select_layers(unet, "lierla", "xattn")
    assert select_layers(unet, "c3lier", "noxattn")  # resnets exist


GOLDEN = {
    "sd1": [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_up_blocks_3_attentions_2_proj_out",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_resnets_1_time_emb_proj",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ],
    "sdxl": [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
        "lora_unet_output_blocks_0_1_proj_out",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
    ],
}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_golden_key_names(full_size, family):
    unet = full_size[family]
    keys = {kohya_key(n, ModelFamily(family), unet.config) for n in adaptable_layers(unet, "c3lier")}
    assert set(GOLDEN[family]) <= keys
    assert "lora_unet_output_blocks_2_1_conv" not in keys  # diffusers-style index: dropped by A1111 on SDXL
    # network.type all: the layers outside the blocks, by the names A1111 and ComfyUI look them up
    every = {kohya_key(n, ModelFamily(family), unet.config) for n in adaptable_layers(unet, "all")}
    outside = {
        "sd1": ["conv_in", "time_embedding_linear_1", "time_embedding_linear_2", "conv_out"],
        "sdxl": [
            "input_blocks_0_0",
            "time_embed_0",
            "time_embed_2",
            "label_emb_0_0",
            "label_emb_0_2",
            "out_2",
        ],
    }[family]
    assert every - keys == {f"lora_unet_{name}" for name in outside}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_sgm_names_round_trip_through_diffusers_converter(full_size, family):
    state = full_size[family].state_dict()
    ldm = {"model.diffusion_model." + to_sgm_name(k, full_size[family].config): v for k, v in state.items()}
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint(ldm, dict(full_size[family].config))
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


def randomise(network: LoRANetwork, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def unet_inputs(models, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = models.unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, generator=generator)
    dim = models.unet.config.cross_attention_dim
    cond = Conditioning(torch.randn(batch, 5, dim, generator=generator))
    if models.family.is_sdxl:
        pooled = torch.randn(batch, models.text_encoders[1].config.projection_dim, generator=generator)
        cond = Conditioning(cond.hidden_states, pooled=pooled).with_time_ids(sdxl_time_ids(16, 16))
    return latents, torch.tensor([500, 20]), cond


NETWORKS = [
    NetworkConfig(type="lierla", rank=4, alpha=2.0),
    NetworkConfig(type="c3lier", rank=3, alpha=1.5, conv_rank=2, conv_alpha=4.0),
    # the layers outside the blocks too (ai-toolkit's lora without and with conv)
    NetworkConfig(type="all-linear", rank=3, alpha=1.5),
    NetworkConfig(type="all", rank=3, alpha=1.5, conv_rank=2, conv_alpha=4.0),
]


@pytest.mark.parametrize("network_config", NETWORKS, ids=["lierla", "c3lier", "all-linear", "all"])
@pytest.mark.parametrize("name", ["sd1", "sd2-v", "sdxl"])
def test_diffusers_loads_our_file_exactly(tmp_path, tiny_folders, name, network_config):
    models = load_models(str(tiny_folders[name]))
    network = LoRANetwork.create(models.unet, models.family, network_config)
    randomise(network)
    path = network.save(tmp_path / "lora.safetensors", resolution=models.resolution)
    tensors, _ = read_lora_file(path)

    pipe = DiffusionPipeline.from_pretrained(tiny_folders[name])
    pipe.load_lora_weights(str(path))
    injected = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(injected) == len(network) == len({k.split(".")[0] for k in tensors})
    for module_name, layer in injected.items():
        key = kohya_key(module_name, models.family, pipe.unet.config)
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        scale = tensors[f"{key}.alpha"].item() / down.shape[0]
        (adapter,) = layer.scaling
        assert layer.scaling[adapter] == pytest.approx(scale)
        if down.ndim == 2:
            expected = up @ down * scale
        else:  # conv: up is 1x1, down carries the kernel
            expected = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * scale
        torch.testing.assert_close(layer.get_delta_weight(adapter), expected, rtol=1e-5, atol=1e-6)

    latents, timesteps, cond = unet_inputs(models)
    with torch.no_grad():
        theirs = predict(pipe.unet, latents, timesteps, cond)
        ours = predict(models.unet, latents, timesteps, cond)
        with network.strength(0.0):
            base = predict(models.unet, latents, timesteps, cond)
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_multiplier_zero_is_the_original_model_exactly(tiny_folders, name):
    models = load_models(str(tiny_folders[name]))
    latents, timesteps, cond = unet_inputs(models)
    with torch.no_grad():
        original = predict(models.unet, latents, timesteps, cond)
        network = LoRANetwork.create(models.unet, models.family, NetworkConfig(type="c3lier"))
        fresh = predict(models.unet, latents, timesteps, cond)
        randomise(network)
        network.multiplier = 0.0
        off = predict(models.unet, latents, timesteps, cond)
        network.multiplier = -1.0
        negative = predict(models.unet, latents, timesteps, cond)
    assert torch.equal(off, original)
    torch.testing.assert_close(fresh, original)  # up is zero-initialised: a new LoRA is the identity
    assert not torch.allclose(negative, original)


def test_saved_file_round_trips_and_carries_metadata(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sdxl"]))
    network = LoRANetwork.create(models.unet, models.family, NETWORKS[1])
    randomise(network)
    path = network.save(
        tmp_path / "x.safetensors", resolution=1024, title="no fox", extra_metadata={"leco.config": {"a": 1}}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp file left behind

    other = load_models(str(tiny_folders["sdxl"]))
    loaded = LoRANetwork.from_file(other.unet, other.family, path)
    assert loaded.ranks == network.ranks and loaded.network_type == "c3lier"
    ours, theirs = network.kohya_state_dict(), loaded.kohya_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        assert all(k.startswith("lora_unet_") for k in file.keys())  # noqa: SIM118
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("3", "1.5")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "4"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert (
        metadata["modelspec.resolution"] == "1024x1024" and metadata["modelspec.prediction_type"] == "epsilon"
    )
    assert metadata["modelspec.title"] == metadata["ss_output_name"] == "no fox"
    assert json.loads(metadata["leco.config"]) == {"a": 1}
    assert "lora_adapter_metadata" not in metadata
    raw = path.read_bytes()  # the additional-networks hash: of the bytes after the JSON header
    data_hash = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    assert metadata["sshs_model_hash"] == data_hash and metadata["modelspec.hash_sha256"] == "0x" + data_hash
    assert metadata["sshs_legacy_hash"] == legacy_hash(raw)
    blob = bytes(range(256)) * 5000  # past 1 MiB: the legacy hash reads bytes 0x100000 to 0x110000
    assert legacy_hash(blob) == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize(
    ("name", "base", "v2", "arch", "prediction"),
    [
        ("sd1", "sd_v1", "False", "stable-diffusion-v1/lora", "epsilon"),
        ("sd2-v", "sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v"),
    ],
)
def test_family_metadata(tmp_path, tiny_folders, name, base, v2, arch, prediction):
    models = load_models(str(tiny_folders[name]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig())
    _, metadata = read_lora_file(network.save(tmp_path / "a.safetensors", resolution=models.resolution))
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == (base, v2)
    assert metadata["modelspec.architecture"] == arch and metadata["modelspec.prediction_type"] == prediction
    assert metadata["modelspec.implementation"] == "diffusers"


def test_conv_tensors_are_4d_and_linear_2d(tmp_path, tiny_folders):
    models = load_models(str(tiny_folders["sd1"]))  # SD1's proj_in/proj_out are 1x1 convs
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig(type="c3lier"))
    tensors = network.kohya_state_dict()
    for name, layer in network.layers.items():
        key = kohya_key(name, models.family, models.unet.config)
        expected = 4 if isinstance(layer.get_base_layer(), torch.nn.Conv2d) else 2
        assert tensors[f"{key}.lora_down.weight"].ndim == tensors[f"{key}.lora_up.weight"].ndim == expected
        assert tensors[f"{key}.alpha"].ndim == 0
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision(tmp_path, tiny_folders, precision, dtype):
    models = load_models(str(tiny_folders["sd1"]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig())
    randomise(network)
    tensors, _ = read_lora_file(network.save(tmp_path / "p.safetensors", dtype=dtype, resolution=16))
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {dtype}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}


def test_lora_of_another_family_is_refused(tmp_path, tiny_folders):
    sdxl = load_models(str(tiny_folders["sdxl"]))
    path = LoRANetwork.create(sdxl.unet, sdxl.family, NetworkConfig()).save(
        tmp_path / "xl.safetensors", resolution=16
    )
    sd1 = load_models(str(tiny_folders["sd1"]))
    with pytest.raises(LecoError, match="matches no layer of this sd1 UNet"):
        LoRANetwork.from_file(sd1.unet, sd1.family, path)


def test_failed_save_keeps_the_previous_file(tmp_path, tiny_folders, monkeypatch):
    models = load_models(str(tiny_folders["sd1"]))
    network = LoRANetwork.create(models.unet, models.family, NetworkConfig())
    path = network.save(tmp_path / "keep.safetensors", resolution=16)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError):
        network.save(path, resolution=16)
    assert path.read_bytes() == before
    assert [p.name for p in Path(tmp_path).iterdir()] == ["keep.safetensors"]


@pytest.mark.parametrize("network_config", NETWORKS, ids=["lierla", "c3lier", "all-linear", "all"])
def test_a_file_read_back_names_the_network_type_it_was_saved_as(tmp_path, tiny_folders, network_config):
    models = load_models(str(tiny_folders["sdxl"]))
    network = LoRANetwork.create(models.unet, models.family, network_config)
    path = network.save(tmp_path / "lora.safetensors", resolution=16)
    network.remove()
    loaded = LoRANetwork.from_file(models.unet, models.family, path)
    assert loaded.network_type == network_config.type and loaded.ranks == network.ranks

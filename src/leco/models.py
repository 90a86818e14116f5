"""Load what training needs from a Hub repo id, a diffusers folder or a single checkpoint file.

Single files (`.safetensors`, opt-in `.ckpt`) load offline: the architecture configs and the CLIP
tokenizer of the four standard families ship in `leco/model_configs/` and are handed to
diffusers' own single-file converters, so no hub call is made.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from leco.config import PretrainedModelConfig
from leco.errors import LecoError

CONFIG_ROOT = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
Arch = Literal["sd1", "sd2", "sdxl"]
BUNDLED_MODEL = "ink-digits"


@dataclass(frozen=True)
class ModelFamily:
    """The architecture (sd1, sd2, sdxl) and what the UNet predicts."""

    arch: Arch
    v_pred: bool = False

    @property
    def name(self) -> str:
        return self.arch + ("-v" if self.v_pred else "")

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def prediction_type(self) -> str:
        return "v_prediction" if self.v_pred else "epsilon"


@dataclass
class LoadedModels:
    """Everything training or sampling needs; the VAE only when images are wanted."""

    family: ModelFamily
    unet: UNet2DConditionModel
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer]
    scheduler_config: dict[str, Any]
    vae_scale_factor: int
    source: str
    vae: AutoencoderKL | None = None

    @property
    def resolution(self) -> int:
        """The model's native image size in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def pick_device(name: str) -> torch.device:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise LecoError(f"train.device: {name} but no CUDA GPU is available; use auto or cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_models(
    spec: PretrainedModelConfig | str,
    *,
    dtype: torch.dtype = torch.float32,
    with_vae: bool = False,
) -> LoadedModels:
    """Load tokenizer(s), text encoder(s), UNet and scheduler config (and optionally the VAE)."""
    if isinstance(spec, str):
        spec = PretrainedModelConfig(name_or_path=spec)
    path = resolve_bundled(spec.name_or_path)
    if path.is_file():
        loaded = _load_single_file(path, spec, dtype, with_vae)
    elif path.is_dir():
        loaded = _load_diffusers(str(path), spec, dtype, with_vae)
    elif _looks_like_repo_id(spec.name_or_path):
        loaded = _load_diffusers(spec.name_or_path, spec, dtype, with_vae)
    else:
        raise LecoError(
            f"pretrained_model.name_or_path: {spec.name_or_path!r} is neither a file, a folder nor a "
            "Hugging Face repo id (owner/name); fix the path"
        )
    for module in [loaded.unet, *loaded.text_encoders, loaded.vae]:
        if module is not None:
            module.requires_grad_(False).eval()
    return loaded


def resolve_bundled(name: str) -> Path:
    """`ink-digits` names the small model leco ships; anything else is a path (or a repo id)."""
    if name == BUNDLED_MODEL:
        from leco.ink_digits import default_model_path

        return default_model_path()
    return Path(name).expanduser()


def _looks_like_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.endswith(CHECKPOINT_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# diffusers folders and Hub repos


def _load_diffusers(
    source: str, spec: PretrainedModelConfig, dtype: torch.dtype, with_vae: bool
) -> LoadedModels:
    common = {"revision": spec.revision} if spec.revision else {}
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
        scheduler_config = dict(_load_json_config(source, "scheduler", "scheduler_config.json", common))
    except (OSError, ValueError) as error:
        raise LecoError(_unreachable(source, error)) from None
    arch = arch_from_unet_config(unet_config)
    declared_v = scheduler_config.get("prediction_type", "epsilon") == "v_prediction"
    family = _reconcile(spec, arch, declared_v, evidence=f"{source}/scheduler/scheduler_config.json")
    scheduler_config["prediction_type"] = family.prediction_type
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **common)
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)]
        text_encoders: list[torch.nn.Module] = [
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **common)
        ]
        if family.is_sdxl:
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common))
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", torch_dtype=dtype, **common
                )
            )
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", **common)
        vae = (
            AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common)
            if with_vae
            else None
        )
    except (OSError, ValueError) as error:
        raise LecoError(_unreachable(source, error)) from None
    return LoadedModels(
        family=family,
        unet=unet,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        source=source,
        vae=vae,
    )


def _load_json_config(source: str, subfolder: str, name: str, common: dict[str, Any]) -> dict[str, Any]:
    local = Path(source) / subfolder / name
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, name, subfolder=subfolder, **common)).read_text())


def _unreachable(source: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if Path(source).is_dir():
        return (
            f"{source}: not a complete diffusers model folder ({first_line}); "
            "it needs unet/, text_encoder/, tokenizer/, scheduler/"
        )
    return (
        f"pretrained_model.name_or_path: {source!r} could not be loaded from the Hugging Face Hub or its "
        f"cache ({first_line}); check the repo id, download it once online, or use a local folder or file"
    )


def arch_from_unet_config(config: dict[str, Any]) -> Arch:
    """SDXL conditions on pooled text and size ids; SD2 replaced SD1's 1x1-conv projections by Linear."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"


# ---------------------------------------------------------------------------------------------
# single checkpoint files in the original LDM / SGM layout


def _load_single_file(
    path: Path, spec: PretrainedModelConfig, dtype: torch.dtype, with_vae: bool
) -> LoadedModels:
    checkpoint = read_checkpoint(path, allow_pickle=spec.allow_pickle)
    arch = arch_from_checkpoint(checkpoint, path)
    config_dir = str(Path(spec.config).expanduser()) if spec.config else str(CONFIG_ROOT / arch)
    quiet = {"config": config_dir, "local_files_only": True}
    # SD2 is probed for v-prediction in fp32 first; the other families load straight in `dtype`.
    unet_dtype = torch.float32 if arch == "sd2" else dtype
    try:
        unet = UNet2DConditionModel.from_single_file(
            checkpoint, subfolder="unet", torch_dtype=unet_dtype, **quiet
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise LecoError(
            f"{path}: the UNet weights do not match the {arch} architecture ({_first_line(error)})"
        ) from None
    probed_v = probe_v_prediction(unet) if arch == "sd2" else None
    family = _reconcile(spec, arch, probed_v, evidence=f"{path} (probed the UNet)")
    if family.arch == "sd2" and family.v_pred and not spec.config:
        _use_sd2_v_defaults(unet)
    unet.to(dtype)
    text_encoders = _single_file_text_encoders(checkpoint, family, config_dir, dtype, path)
    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae")
    vae = None
    if with_vae:
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", torch_dtype=dtype, **quiet)
    scheduler_config = json.loads((Path(config_dir) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config["prediction_type"] = family.prediction_type
    return LoadedModels(
        family=family,
        unet=unet,
        text_encoders=text_encoders,
        tokenizers=clip_tokenizers(family),
        scheduler_config=scheduler_config,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        source=str(path),
        vae=vae,
    )


def read_checkpoint(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a single-file checkpoint; pickles only when the user opted in, and then weights-only."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise LecoError(f"{path}: not a readable .safetensors file ({_first_line(error)})") from None
    if suffix not in PICKLE_SUFFIXES:
        raise LecoError(
            f"{path}: unsupported file type {suffix!r}; use a .safetensors file or a diffusers folder"
        )
    if not allow_pickle:
        raise LecoError(
            f"{path}: {suffix} files are Python pickles that can run code when opened; convert it to "
            ".safetensors, or set pretrained_model.allow_pickle: true if you trust its source"
        )
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError and friends; we never fall back to unsafe loading
        raise LecoError(
            f"{path}: cannot be read safely (weights_only) ({_first_line(error)}); convert it to .safetensors"
        ) from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def arch_from_checkpoint(checkpoint: dict[str, torch.Tensor], path: Path | str = "checkpoint") -> Arch:
    """Tell SD1, SD2 and SDXL apart by structure, as the original repos lay their weights out."""
    if any(
        k.startswith(("model.diffusion_model.label_emb.", "conditioner.embedders.1.")) for k in checkpoint
    ):
        return "sdxl"
    proj_in = next(
        (v for k, v in checkpoint.items() if re.match(r"model\.diffusion_model\..*\.proj_in\.weight$", k)),
        None,
    )
    if proj_in is not None:
        return "sd2" if proj_in.ndim == 2 else "sd1"
    raise LecoError(
        f"{path}: no Stable Diffusion UNet inside (no model.diffusion_model.*proj_in weights); "
        "expected an SD 1.x, 2.x or SDXL checkpoint"
    )


@torch.no_grad()
def probe_v_prediction(unet: UNet2DConditionModel) -> bool:
    """Whether an SD2 UNet predicts v rather than noise, from its output on a constant input.

    SD2 512-base and 768-v checkpoints have the same shapes, so only behaviour tells them apart:
    at t=999 an epsilon model returns roughly its (noise-like) input, a v model a strongly negative
    multiple of it. A1111 uses the same test on the same input.
    """
    dtype = next(unet.parameters()).dtype
    sample = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=dtype)
    out = unet(sample, torch.tensor([999]), encoder_hidden_states=context).sample
    return (out.float() - sample.float()).mean().item() < -1.0


def _use_sd2_v_defaults(unet: UNet2DConditionModel) -> None:
    # The 768-v models are native at 768 px and need fp32 attention scores in half precision.
    from diffusers.models.attention_processor import Attention

    for module in unet.modules():
        if isinstance(module, Attention):
            module.upcast_attention = True
    unet.register_to_config(sample_size=96, upcast_attention=True)


def _single_file_text_encoders(
    checkpoint: dict[str, torch.Tensor], family: ModelFamily, config_dir: str, dtype: torch.dtype, path: Path
) -> list[torch.nn.Module]:
    classes = [("text_encoder", CLIPTextModel)]
    if family.is_sdxl:
        classes.append(("text_encoder_2", CLIPTextModelWithProjection))
    encoders = []
    for subfolder, cls in classes:
        try:
            encoders.append(
                create_diffusers_clip_model_from_ldm(
                    cls,
                    checkpoint,
                    subfolder=subfolder,
                    config=config_dir,
                    torch_dtype=dtype,
                    local_files_only=True,
                )
            )
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise LecoError(
                f"{path}: its text encoder ({subfolder}) cannot be read ({_first_line(error)}); "
                "is this a full checkpoint and not a UNet-only file?"
            ) from None
    return encoders


def clip_tokenizers(family: ModelFamily) -> list[CLIPTokenizer]:
    """The CLIP BPE tokenizer every SD family uses; OpenCLIP encoders pad with '!' (id 0)."""
    folder = CONFIG_ROOT / "clip_tokenizer"
    if family.arch == "sd1":
        return [CLIPTokenizer.from_pretrained(folder)]
    if family.arch == "sd2":
        return [CLIPTokenizer.from_pretrained(folder, pad_token="!")]
    return [CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder, pad_token="!")]


def _reconcile(
    spec: PretrainedModelConfig, arch: Arch, detected_v: bool | None, evidence: str
) -> ModelFamily:
    """Combine what the weights say with the user's v2 / v_pred flags; contradictions are errors."""
    if spec.v2 is not None and spec.v2 != (arch == "sd2"):
        raise LecoError(
            f"pretrained_model.v2: is {str(spec.v2).lower()} but {spec.name_or_path} is an {arch} model; "
            f"set v2: {str(arch == 'sd2').lower()} or remove the key (it is detected)"
        )
    if spec.v_pred is not None and detected_v is not None and spec.v_pred != detected_v:
        said = "v-prediction" if detected_v else "epsilon-prediction"
        raise LecoError(
            f"pretrained_model.v_pred: is {str(spec.v_pred).lower()} but {evidence} says {said}; "
            f"set v_pred: {str(detected_v).lower()} or remove the key (it is detected)"
        )
    v_pred = detected_v if detected_v is not None else bool(spec.v_pred)
    return ModelFamily(arch=arch, v_pred=v_pred)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__

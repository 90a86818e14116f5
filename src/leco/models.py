"""Load what training needs from a Hub repo id, a diffusers folder or a single checkpoint file.

Single files (`.safetensors`, opt-in `.ckpt`) load offline: the architecture configs and the CLIP
tokenizer of the four standard families ship in `leco/model_configs/` and are handed to
diffusers' own single-file converters, so no hub call is made.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import textwrap
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from leco.config import PretrainedModelConfig
from leco.errors import LecoError, first_line, warn
from leco.files import load_torch_file, path_exists, safetensors_metadata

CONFIG_ROOT = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
Arch = Literal["sd1", "sd2", "sdxl"]
MODEL_CARD = "README.md"  # a model folder's card: its recommended steps and guidance
# The same for a single-file checkpoint, which has no card (leco merge writes it for a distilled model).
SAMPLING_METADATA = "leco.sampling"
# What a model recommended before a CFG-distilled LoRA was merged into it: in a single file's
# metadata, and in a folder's card front matter.
SAMPLING_BEFORE_DISTILLATION = "leco.sampling_before_distillation"
# In the card: {recommended: {num_inference_steps, guidance_scale}, inference: the card's own block}.
CARD_BEFORE_DISTILLATION = "leco_before_distillation"
BUNDLED_MODELS = ("ink-digits", "ink-digits-2")  # = leco.ink_digits.MODEL_NAMES (a test checks)


@dataclass(frozen=True)
class OptionNames:
    """How the caller's user spells the model settings, so that messages name what they can change."""

    model: str = "pretrained_model.name_or_path"
    allow_pickle: str = "set pretrained_model.allow_pickle: true"
    section: str = "pretrained_model"  # where revision, v2 and v_pred are set
    config: str | None = "pretrained_model.config"  # None: the caller has no such option


CONFIG_OPTION_NAMES = OptionNames()
CLI_OPTION_NAMES = OptionNames(model="--model", allow_pickle="pass --allow-pickle", config=None)
TEACHER_OPTION_NAMES = OptionNames(
    "teacher.name_or_path", "set teacher.allow_pickle: true", "teacher", "teacher.config"
)


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling settings a model recommends (or SD's usual ones), for options the user left unset."""

    steps: int = 30
    guidance: float = 7.0

    def as_card_parameters(self) -> dict[str, int | float]:
        """As a model card's front matter (and a merged single file's leco.sampling) write them."""
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance}

    def fill(self, steps: int | None, guidance: float | None) -> tuple[int, float]:
        """The user's steps and guidance, these where unset (None; steps 0 too)."""
        return steps or self.steps, guidance if guidance is not None else self.guidance


@contextmanager
def quiet_library_logs(errors: bool = True) -> Iterator[None]:
    """diffusers' and transformers' loading chatter off (warnings, loading bars), for leco's own calls.

    Their verbosity and progress bars are process-wide settings that a Python user may have chosen;
    they are restored on exit, so only leco's loading calls are quieted. Errors still print, unless
    not `errors` (where leco says what failed itself, and the library's log would repeat it).
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [
        (lib, lib.get_verbosity(), lib.is_progress_bar_enabled())
        for lib in (diffusers_logging, transformers_logging)
    ]
    for lib, _, _ in saved:
        lib.set_verbosity(lib.ERROR if errors else lib.CRITICAL)
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # e.g. hub arguments diffusers still passes, now deprecated
            warnings.filterwarnings("ignore", module=r"(huggingface_hub|diffusers|transformers|peft)\b")
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


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
    latent_scaling: float = 0.18215  # the VAE's scaling_factor: latents = scaling x encoder output
    # For a single file built with a config folder (a bundled model's merge): that folder, which
    # holds what a model folder holds beside the weights (model card, judge, prompt list).
    config_folder: str | None = None

    @property
    def folder(self) -> str:
        """Where the model's own files are: its folder, or a single file's config folder."""
        return self.config_folder or self.source

    @property
    def resolution(self) -> int:
        """The model's native image size in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """The device `name` means (auto: cuda, then mps, then cpu); `option` is how the user set it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LecoError(f"{option}: {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LecoError(f"{option}: {name} but no CUDA GPU is available; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise LecoError(f"{option}: {name} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type in ("cpu", "mps") and device.index:  # torch would use the one there is, silently
        raise LecoError(
            f"{option}: {name}: there is one {device.type} device, with no number; use {device.type}"
        )
    if device.type == "mps" and not _mps_available():
        raise LecoError(f"{option}: mps but no Apple GPU (MPS) is available; use auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LecoError(
            f"{option}: {name!r}: leco runs on cpu, cuda or mps; use auto, cpu, cuda, cuda:N or mps"
        )
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def load_models(
    spec: PretrainedModelConfig | str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    with_vae: bool = False,
    names: OptionNames = CONFIG_OPTION_NAMES,
) -> LoadedModels:
    """Load tokenizer(s), text encoder(s), UNet and scheduler config (and optionally the VAE)."""
    if isinstance(spec, (str, Path)):
        spec = PretrainedModelConfig(name_or_path=str(spec))
    if not spec.name_or_path.strip():  # Path("") is the working directory: never what was meant
        raise LecoError(
            f"{names.model}: empty; name a repo id, a diffusers folder, a .safetensors file or ink-digits"
        )
    path = resolve_bundled(spec.name_or_path)
    exists = path_exists(path)  # False for a name the system refuses (too long), which is_file raises on
    if exists and spec.revision:
        kind = "file" if path.is_file() else "folder"
        warn(f"{names.section}.revision: {spec.name_or_path} is a {kind} here, not a Hub repo; ignored")
    with quiet_library_logs():
        if exists and path.is_file():
            loaded = _load_single_file(path, spec, dtype, with_vae, names)
        elif exists and path.is_dir():
            loaded = _load_folder(str(path), spec, dtype, with_vae, names)
        elif looks_like_repo_id(spec.name_or_path):
            loaded = _load_hub_repo(spec.name_or_path, spec, dtype, with_vae, names)
        else:
            where = "" if path.is_absolute() else f" (relative paths are read from {Path.cwd()})"
            bundled = close_bundled_name(spec.name_or_path)
            fix = f"did you mean {bundled} (a model leco ships)?" if bundled else "fix the path"
            raise LecoError(
                f"{names.model}: {spec.name_or_path!r} is neither a file, a folder nor a "
                f"Hugging Face repo id (owner/name){where}; {fix}"
            )
    for module in [loaded.unet, *loaded.text_encoders, loaded.vae]:
        if module is not None:
            module.requires_grad_(False).eval()
    return loaded


def close_bundled_name(name: str) -> str | None:
    """The shipped model `name` misspells (ink_digits, Ink Digits, inkdigits2), if one."""
    squeezed = re.sub(r"[\W_]", "", name.lower())
    return next((known for known in BUNDLED_MODELS if known.replace("-", "") == squeezed), None)


def model_name(model: str, *, on_disk: bool = True) -> str:
    """The model as A1111's infotext names it: a bundled model's name (also for its folder), a
    checkpoint's file stem, a folder's or repo's last name. `on_disk=False`: a name read from a
    file's metadata, never looked up on this machine."""
    given = model.strip().rstrip("/\\")
    for known in BUNDLED_MODELS:
        if given == known or (on_disk and _is_folder_of(given, known)):
            return known
    last = recorded_model_name(given) if on_disk else re.split(r"[\\/]", given)[-1]
    stem, dot, suffix = last.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in CHECKPOINT_SUFFIXES else last


def recorded_model_name(name_or_path: str) -> str:
    """The model's last name as kohya records it in ss_sd_model_name (a checkpoint's with its suffix);
    `.` or `..` name the folder they stand for."""
    last = re.split(r"[\\/]", name_or_path.strip().rstrip("/\\"))[-1]  # a Windows path splits too
    if last in ("", ".", ".."):  # `--model .` from inside the model's folder
        with contextlib.suppress(OSError, ValueError):  # as written, not where a symlink leads
            last = Path(os.path.abspath(Path(name_or_path).expanduser())).name
    return last


def _is_folder_of(given: str, bundled: str) -> bool:
    """Whether `given` is the bundled model's folder (a name too long or odd for a path is not)."""
    with contextlib.suppress(OSError, ValueError):
        return Path(given).is_dir() and Path(given).resolve() == resolve_bundled(bundled).resolve()
    return False


def resolve_bundled(name: str) -> Path:
    """`ink-digits`, `ink-digits-2` name the small models leco ships; anything else is a path (or repo id)."""
    if name in BUNDLED_MODELS:
        from leco.ink_digits import model_path

        return model_path(name)
    return Path(name).expanduser()


def sampling_for(models: LoadedModels) -> SamplingDefaults:
    """What the loaded model recommends: a single file's own word first (leco merge of a distilled
    LoRA), else its folder's card (a single file's config folder's)."""
    return single_file_sampling(models) or recommended_sampling(models.folder)


def single_file_sampling(models: LoadedModels) -> SamplingDefaults | None:
    """What a single-file checkpoint itself declares (its leco.sampling metadata), if anything."""
    return _declared(_single_file_word(models, SAMPLING_METADATA))


def sampling_before_distillation(models: LoadedModels) -> SamplingDefaults | None:
    """What the model recommended before `leco merge` baked a CFG-distilled LoRA into it (it says
    guidance 1 since), which baking that LoRA out again restores; None for a model without one (or
    merged by a release that did not record it)."""
    if Path(models.source).is_file():
        return _declared(_single_file_word(models, SAMPLING_BEFORE_DISTILLATION))
    record = _card_front_matter(resolve_bundled(models.folder)).get(CARD_BEFORE_DISTILLATION)
    return _declared(record.get("recommended")) if isinstance(record, dict) else None


def _single_file_word(models: LoadedModels, key: str) -> Any:
    """A JSON value in a single-file checkpoint's metadata; None where it is not one or has none."""
    source = Path(models.source)
    if not (source.is_file() and source.suffix.lower() == ".safetensors"):
        return None
    try:
        return json.loads(safetensors_metadata(source).get(key, "null"))
    except (OSError, ValueError):
        return None


def _card_front_matter(folder: Path) -> dict[str, Any]:
    """A model folder's card front matter; empty where it has no card or the card no YAML."""
    card = folder / MODEL_CARD
    if not card.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        front_matter = metadata_load(card) or {}
    except Exception:  # a card whose front matter is not YAML declares nothing
        return {}
    return front_matter if isinstance(front_matter, dict) else {}


def recommended_sampling(name_or_path: str) -> SamplingDefaults:
    """The steps and guidance a model folder recommends, else SD's usual 30 steps at guidance 7.

    A folder declares them in its model card (README.md front matter `inference: parameters:
    {num_inference_steps, guidance_scale}`, the Hugging Face widget's convention); the bundled
    models' own settings come from their quality measurement.
    """
    folder = resolve_bundled(name_or_path)
    inference = _card_front_matter(folder).get("inference")
    declared = _declared(inference.get("parameters") if isinstance(inference, dict) else None)
    if declared is not None:
        return declared
    from leco import ink_digits

    if folder.resolve().is_relative_to(Path(ink_digits.__file__).parent.resolve()):
        return SamplingDefaults(ink_digits.STEPS, ink_digits.GUIDANCE)
    return SamplingDefaults()


def _declared(parameters: Any) -> SamplingDefaults | None:
    """The card's (or file's) inference parameters, where both are given and make sense."""
    if not isinstance(parameters, dict):
        return None
    steps, guidance = parameters.get("num_inference_steps"), parameters.get("guidance_scale")
    if (
        isinstance(steps, int)
        and not isinstance(steps, bool)
        and steps >= 1
        and isinstance(guidance, (int, float))
    ):
        return SamplingDefaults(steps, float(guidance))
    return None


# The Hub's rule for each half of owner/name: word characters, '-' and '.', neither first nor last,
# never doubled; "./model" and "../model" are paths.
_REPO_PART = r"\w(?:[\w.-]*\w)?"


def looks_like_repo_id(name: str) -> bool:
    """owner/name as the Hub spells repo ids (and no checkpoint file's name)."""
    return (
        re.fullmatch(rf"{_REPO_PART}/{_REPO_PART}", name) is not None
        and "--" not in name
        and ".." not in name
        and not name.endswith(CHECKPOINT_SUFFIXES)
    )


# ---------------------------------------------------------------------------------------------
# diffusers folders and Hub repos


class _Unreadable(Exception):
    """diffusers or transformers could not read a part of a diffusers model (missing or damaged)."""


def _load_folder(
    folder: str, spec: PretrainedModelConfig, dtype: torch.dtype, with_vae: bool, names: OptionNames
) -> LoadedModels:
    parts = ("unet", "text_encoder", "tokenizer", "scheduler")
    missing = [part for part in parts if not (Path(folder) / part).is_dir()]
    if missing:
        parent = Path(folder).resolve().parent
        hint = f"; {parent} is one: give that" if all((parent / part).is_dir() for part in parts) else ""
        absent = ", ".join(f"{part}/" for part in missing)
        raise LecoError(
            f"{names.model}: {folder} is not a complete diffusers model folder (no {absent}); it needs "
            f"unet/, text_encoder/, tokenizer/, scheduler/{hint}"
        )
    scheduler_config = Path(folder) / "scheduler" / "scheduler_config.json"
    if not scheduler_config.is_file():  # else diffusers would ask the Hub for it
        raise LecoError(
            f"{names.model}: {folder} has no {scheduler_config.relative_to(folder)}; the folder is incomplete"
        )
    weightless = [
        part for part in _weight_parts(Path(folder), with_vae) if not _holds_weights(Path(folder) / part)
    ]
    if weightless:  # diffusers would log one error and raise another, naming a .bin file
        raise LecoError(
            f"{names.model}: {folder} is an incomplete diffusers model folder: its {weightless[0]}/ holds no "
            "weights (.safetensors or .bin); copy or download the model again"
        )
    try:  # local files only: a folder must never be fetched as a Hub repo of the same name
        return _load_diffusers(folder, spec, dtype, with_vae, {"local_files_only": True}, names)
    except _Unreadable as error:
        raise LecoError(
            f"{names.model}: {folder} is a damaged or incomplete diffusers model folder ({error}); copy or "
            "download the model again"
        ) from None


def _weight_parts(folder: Path, with_vae: bool) -> list[str]:
    """The parts of a diffusers folder whose weights a load reads."""
    optional = ["text_encoder_2", *(["vae"] if with_vae else [])]
    return ["unet", "text_encoder", *(part for part in optional if (folder / part).is_dir())]


def _holds_weights(part: Path) -> bool:
    """Any weights file, whole or sharded, in any of the names diffusers and transformers read."""
    return any(part.glob("*.safetensors")) or any(part.glob("*.bin")) or any(part.glob("*.index.json"))


def _load_hub_repo(
    repo_id: str, spec: PretrainedModelConfig, dtype: torch.dtype, with_vae: bool, names: OptionNames
) -> LoadedModels:
    """The local cache first; the Hub only when it is allowed and needed, checked with one request.

    Without a network huggingface_hub retries each download for about 40 s before giving up, and
    then diffusers reports a missing config.json: an offline user learns nothing useful that way.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    revision = {"revision": spec.revision} if spec.revision else {}
    get_it = (
        f"download it where there is network (hf download {repo_id}; older huggingface_hub: "
        f"huggingface-cli download {repo_id}), or point {names.model} at a diffusers folder or a "
        ".safetensors file"
    )
    cached = isinstance(try_to_load_from_cache(repo_id, "unet/config.json", revision=spec.revision), str)
    if cached:
        try:
            return _load_diffusers(
                repo_id, spec, dtype, with_vae, {**revision, "local_files_only": True}, names
            )
        except _Unreadable as error:
            if constants.HF_HUB_OFFLINE:
                raise LecoError(
                    f"{names.model}: only part of {repo_id!r} is in the local Hugging Face cache ({error}) "
                    f"and HF_HUB_OFFLINE is set; {get_it}"
                ) from None
    elif constants.HF_HUB_OFFLINE:
        raise LecoError(
            f"{names.model}: {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            f"set; {get_it}"
        )
    _check_hub_answers(repo_id, spec.revision, names, get_it)
    try:
        return _load_diffusers(repo_id, spec, dtype, with_vae, revision, names)
    except _Unreadable as error:
        raise LecoError(
            f"{names.model}: {repo_id!r} could not be loaded from the Hugging Face Hub ({error}); "
            "is it a diffusers Stable Diffusion repo? Or use a local folder or .safetensors file"
        ) from None


def check_hub_repo_available(repo_id: str, option: str, probe_file: str) -> None:
    """A repo id that is neither a folder nor cached: refuse at once where the Hub cannot deliver it
    (offline, unreachable, unknown), instead of a library's half minute of retries."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if path_exists(Path(repo_id).expanduser()):
        return
    try:
        if isinstance(try_to_load_from_cache(repo_id, probe_file), str):
            return
    except HFValidationError:
        raise LecoError(
            f"{option}: {repo_id} is neither a folder nor a Hugging Face repo id (owner/name); check the path"
        ) from None
    get_it = (
        f"download it where there is network (hf download {repo_id}), or point {option} at a local folder"
    )
    if constants.HF_HUB_OFFLINE:
        raise LecoError(
            f"{option}: {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"{get_it}"
        )
    _check_hub_answers(repo_id, None, OptionNames(option, "", option), get_it)


def _check_hub_answers(repo_id: str, revision: str | None, names: OptionNames, get_it: str) -> None:
    from huggingface_hub import model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        model_info(repo_id, revision=revision, timeout=10)
    except GatedRepoError:
        raise LecoError(
            f"{names.model}: {repo_id!r} is gated on the Hugging Face Hub; accept its terms on its page "
            "and log in (hf auth login), or use a local copy"
        ) from None
    except RepositoryNotFoundError:
        raise LecoError(
            f"{names.model}: the Hugging Face Hub has no repo {repo_id!r} (or it is private and you are "
            "not logged in); check the id"
        ) from None
    except RevisionNotFoundError:
        raise LecoError(
            f"{names.section}.revision: {repo_id!r} has no revision {revision!r} on the Hub; fix it"
        ) from None
    except HfHubHTTPError:
        return  # the Hub answered; the download itself reports anything else
    except Exception as error:  # connection errors are httpx's or requests' types, by hub version
        raise LecoError(
            f"{names.model}: {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
            f"reached ({_first_sentence(error)}); {get_it}"
        ) from None


def _load_diffusers(
    source: str,
    spec: PretrainedModelConfig,
    dtype: torch.dtype,
    with_vae: bool,
    common: dict[str, Any],
    names: OptionNames,
) -> LoadedModels:
    """Load from a diffusers folder or repo; `common`: revision / local_files_only for the Hub."""
    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **common)
        scheduler_config = dict(_load_json_config(source, "scheduler", "scheduler_config.json", common))
    except (OSError, ValueError) as error:
        raise _Unreadable(_first_sentence(error)) from None
    arch = arch_from_unet_config(unet_config)
    scheduler_file = f"{source}/scheduler/scheduler_config.json"
    declared_v = says_v_prediction(scheduler_config, scheduler_file)
    family = _reconcile(spec, arch, declared_v, scheduler_file, names)
    scheduler_config["prediction_type"] = family.prediction_type
    part = "unet"  # named in the error: which part of the folder is damaged
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **common)
        part = "tokenizer"
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)]
        part = "text_encoder"
        text_encoders: list[torch.nn.Module] = [
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype, **common)
        ]
        if family.is_sdxl:
            part = "tokenizer_2 or text_encoder_2"
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common))
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", torch_dtype=dtype, **common
                )
            )
        part = "vae"
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", **common)
        vae = (
            AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **common)
            if with_vae
            else None
        )
    except (OSError, ValueError) as error:
        raise _Unreadable(f"its {part}/ cannot be read: {_first_sentence(error)}") from None
    return LoadedModels(
        family=family,
        unet=unet,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        latent_scaling=float(vae_config.get("scaling_factor", 0.18215)),
        source=source,
        vae=vae,
    )


def _load_json_config(source: str, subfolder: str, name: str, common: dict[str, Any]) -> dict[str, Any]:
    local = Path(source) / subfolder / name
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, name, subfolder=subfolder, **common)).read_text())


def arch_from_unet_config(config: dict[str, Any]) -> Arch:
    """SDXL conditions on pooled text and size ids; SD2 replaced SD1's 1x1-conv projections by Linear."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("use_linear_projection") else "sd1"


# ---------------------------------------------------------------------------------------------
# single checkpoint files in the original LDM / SGM layout


def _load_single_file(
    path: Path,
    spec: PretrainedModelConfig,
    dtype: torch.dtype,
    with_vae: bool,
    names: OptionNames,
    checkpoint: dict[str, torch.Tensor] | None = None,  # already read (a bundled layout's second try)
) -> LoadedModels:
    if checkpoint is None:
        checkpoint = read_checkpoint(path, allow_pickle=spec.allow_pickle, names=names)
    arch = arch_from_checkpoint(checkpoint, path)
    config_dir = str(resolve_bundled(spec.config)) if spec.config else str(CONFIG_ROOT / arch)
    quiet = {"config": config_dir, "local_files_only": True}
    # SD2 is probed for v-prediction in fp32 first; the other families load straight in `dtype`.
    unet_dtype = torch.float32 if arch == "sd2" else dtype
    try:
        unet = UNet2DConditionModel.from_single_file(
            checkpoint, subfolder="unet", torch_dtype=unet_dtype, **quiet
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        bundled = None if spec.config else _bundled_layout(checkpoint, unet_dtype)
        if bundled is not None:  # a checkpoint `leco merge` wrote from a bundled model
            spec = spec.model_copy(update={"config": bundled})
            return _load_single_file(path, spec, dtype, with_vae, names, checkpoint)
        with_config = f" (or with {names.config})" if names.config else ""
        raise LecoError(
            f"{path}: the UNet weights do not match the {arch} architecture ({_first_sentence(error)}); a "
            f"model of its own layout loads from its diffusers folder{with_config}"
        ) from None
    detected_v, evidence = _prediction_evidence(path, checkpoint, arch, spec, Path(config_dir), unet, names)
    family = _reconcile(spec, arch, detected_v, evidence, names)
    if family.arch == "sd2" and family.v_pred and not spec.config:
        _use_sd2_v_defaults(unet)
    unet.to(dtype)
    text_encoders = _single_file_text_encoders(checkpoint, family, config_dir, dtype, path)
    vae_config = AutoencoderKL.load_config(config_dir, subfolder="vae")
    vae = None
    if with_vae:
        if not any(key.startswith("first_stage_model.") for key in checkpoint):
            raise LecoError(
                f"{path}: holds no VAE (no first_stage_model.* weights), and images need one; "
                "use a full checkpoint or a diffusers folder"
            )
        try:
            vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", torch_dtype=dtype, **quiet)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise LecoError(
                f"{path}: the VAE weights do not match the {arch} architecture ({_first_sentence(error)})"
            ) from None
    scheduler_config = json.loads((Path(config_dir) / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config["prediction_type"] = family.prediction_type
    if ZERO_SNR_MARKER in checkpoint:  # as ComfyUI reads the key: a zero-terminal-SNR schedule
        scheduler_config |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return LoadedModels(
        family=family,
        unet=unet,
        text_encoders=text_encoders,
        tokenizers=_config_tokenizers(Path(config_dir), family) if spec.config else clip_tokenizers(family),
        scheduler_config=scheduler_config,
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        latent_scaling=float(vae_config.get("scaling_factor", 0.18215)),
        source=str(path),
        vae=vae,
        config_folder=config_dir if spec.config else None,
    )


# Keys a single-file checkpoint carries to say what it predicts: ComfyUI reads them (NoobAI-style
# SDXL v-prediction files carry both), and `leco merge` writes them.
V_PREDICTION_MARKER = "v_pred"
ZERO_SNR_MARKER = "ztsnr"


def _prediction_evidence(
    path: Path,
    checkpoint: dict[str, torch.Tensor],
    arch: Arch,
    spec: PretrainedModelConfig,
    config_dir: Path,
    unet: UNet2DConditionModel,
    names: OptionNames = CONFIG_OPTION_NAMES,
) -> tuple[bool | None, str]:
    """(v-prediction or not, what says so), firmest first; (None, ...) where nothing does."""
    said_v = _stated_v_prediction(path)
    if said_v is not None:
        return said_v, f"{path} (its modelspec.prediction_type)"
    if V_PREDICTION_MARKER in checkpoint:
        return True, f"{path} (its {V_PREDICTION_MARKER} key)"
    # A config folder's word: for SD2 only a bundled model's (SD2's 512 and 768-v models share one
    # layout, so a folder given for the layout may be the other one's; the probe tells them apart).
    trusted = spec.config and (arch != "sd2" or spec.config in BUNDLED_MODELS)
    declared_v = _declared_v_prediction(config_dir) if trusted else None
    if declared_v is not None:  # the layout's own folder, whatever the file lost
        return declared_v, f"{config_dir} (its scheduler's prediction_type)"
    if arch == "sd2":  # the probe reads real SD2 models right; a file's own word is firmer
        probed = probe_v_prediction(unet)
        try:  # the folder's word only decides whether to warn: a value it cannot have is left unread
            folder_says = _declared_v_prediction(config_dir) if spec.config else None
        except LecoError:
            folder_says = None
        if folder_says is not None and folder_says != probed and spec.v_pred is None:
            kinds = ("epsilon-prediction", "v-prediction")
            warn(
                f"{path}: the UNet probe reads it as {kinds[probed]}, though its config folder {spec.config} "
                f"says {kinds[folder_says]} (SD2's 512 and 768-v models share one layout, so a folder may "
                f"be the other one's); if the folder is right, set {names.section}.v_pred: "
                f"{str(folder_says).lower()}"
            )
        return probed, PROBED
    return None, f"{path}"


PROBED = "the UNet probe"  # evidence an explicit v_pred overrides


def _stated_v_prediction(path: Path) -> bool | None:
    """What a checkpoint `leco merge` wrote says of v-prediction (its ModelSpec metadata), if it
    says. Other writers' word is not taken: kohya's merge labels every SD2 model "v"."""
    if path.suffix.lower() != ".safetensors":
        return None
    metadata = safetensors_metadata(path)
    if "leco.merge" not in metadata:
        return None
    return modelspec_v_prediction(metadata)


def modelspec_v_prediction(metadata: dict[str, str]) -> bool | None:
    """What a file's ModelSpec metadata says of v-prediction ("v" or "epsilon"), if it says."""
    return {"v": True, "epsilon": False}.get(metadata.get("modelspec.prediction_type", ""))


def _declared_v_prediction(config_dir: Path) -> bool | None:
    """What a model config folder's scheduler says of v-prediction, if it says."""
    try:
        config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    if "prediction_type" not in config:
        return None
    return says_v_prediction(config, config_dir / "scheduler" / "scheduler_config.json")


def says_v_prediction(scheduler_config: dict[str, Any], where: str | Path) -> bool:
    """A scheduler config's prediction_type (unset: epsilon) as v-prediction or not; one line for
    any other value: a model predicting the clean latents ("sample"), or a typo, would otherwise be
    trained as a noise predictor."""
    value = scheduler_config.get("prediction_type") or "epsilon"  # null: unset
    if value not in ("epsilon", "v_prediction"):
        raise LecoError(
            f"{where}: prediction_type {value!r}: leco trains models that predict the noise "
            '("epsilon") or v ("v_prediction"), as every SD 1.x, 2.x and SDXL model does; edit '
            "prediction_type in that file to the one this model was trained with"
        )
    return value == "v_prediction"


def _bundled_layout(checkpoint: dict[str, torch.Tensor], dtype: torch.dtype) -> str | None:
    """The bundled model whose UNet layout `checkpoint` has, if any."""
    for name in BUNDLED_MODELS:
        with contextlib.suppress(OSError, ValueError, KeyError, RuntimeError):
            config = str(resolve_bundled(name))
            UNet2DConditionModel.from_single_file(
                checkpoint, subfolder="unet", config=config, torch_dtype=dtype, local_files_only=True
            )
            return name
    return None


def read_checkpoint(
    path: Path,
    *,
    allow_pickle: bool = False,
    names: OptionNames = CONFIG_OPTION_NAMES,
) -> dict[str, torch.Tensor]:
    """Read a single-file checkpoint; pickles only when the user opted in, and then weights-only."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise LecoError(f"{path}: not a readable .safetensors file ({_first_sentence(error)})") from None
    if suffix not in PICKLE_SUFFIXES:
        raise LecoError(
            f"{path}: unsupported file type {suffix!r}; use a .safetensors file or a diffusers folder"
        )
    if not _is_torch_save_file(path):
        raise LecoError(
            f"{path}: not a readable PyTorch checkpoint (neither a complete zip archive nor a pickle); "
            "it may be truncated or damaged: download it again"
        )
    if not allow_pickle:
        raise LecoError(
            f"{path}: {suffix} files are Python pickles that can run code when opened; convert it to "
            f".safetensors, or {names.allow_pickle} if you trust its source"
        )
    try:
        checkpoint = load_torch_file(path)  # we never fall back to unsafe loading
    except LecoError as reason:
        raise LecoError(f"{path}: cannot be read safely ({reason}); convert it to .safetensors") from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _is_torch_save_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol 2+ starts with 0x80)."""
    import zipfile

    with path.open("rb") as file:
        first = file.read(1)
    return zipfile.is_zipfile(path) or first == b"\x80"


def is_embedding(keys: Iterable[str]) -> bool:
    """Whether a file's keys are a textual-inversion embedding's (A1111/kohya SD1/2, SDXL, A1111 .pt)."""
    keys = set(keys)
    return keys in ({"emb_params"}, {"clip_l", "clip_g"}) or "string_to_param" in keys


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
    # kohya's keys, or diffusers' / peft's (unet.…lora.down.weight, …lora_A.weight)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora" in k or "lora_A" in k for k in checkpoint):
        raise LecoError(
            f"{path}: is a LoRA, not a model; name the model (a folder, checkpoint or ink-digits) here, "
            "and give the LoRA where LoRAs go (--lora, or bake it in with leco merge)"
        )
    if is_embedding(checkpoint):
        raise LecoError(
            f"{path}: is a textual-inversion embedding, not a model; name the model (a folder, checkpoint "
            "or ink-digits) here, and give the embedding to leco generate or eval with --embedding"
        )
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
                f"{path}: its text encoder ({subfolder}) cannot be read ({_first_sentence(error)}); "
                "is this a full checkpoint and not a UNet-only file?"
            ) from None
    return encoders


def _config_tokenizers(config_dir: Path, family: ModelFamily) -> list[CLIPTokenizer]:
    """A config folder's own tokenizers (its prompt length, its vocabulary), else the family's."""
    subfolders = ["tokenizer", "tokenizer_2"][: 2 if family.is_sdxl else 1]
    if not all((config_dir / sub / "vocab.json").is_file() for sub in subfolders):
        return clip_tokenizers(family)
    return [CLIPTokenizer.from_pretrained(config_dir, subfolder=sub) for sub in subfolders]


def clip_tokenizers(family: ModelFamily) -> list[CLIPTokenizer]:
    """The CLIP BPE tokenizer every SD family uses; OpenCLIP encoders pad with '!' (id 0)."""
    folder = CONFIG_ROOT / "clip_tokenizer"
    if family.arch == "sd1":
        return [CLIPTokenizer.from_pretrained(folder)]
    if family.arch == "sd2":
        return [CLIPTokenizer.from_pretrained(folder, pad_token="!")]
    return [CLIPTokenizer.from_pretrained(folder), CLIPTokenizer.from_pretrained(folder, pad_token="!")]


def _reconcile(
    spec: PretrainedModelConfig, arch: Arch, detected_v: bool | None, evidence: str, names: OptionNames
) -> ModelFamily:
    """Combine what the weights say with the user's v2 / v_pred flags; contradictions are errors."""
    for key, declared, family in (("v2", spec.v2, "sd2"), ("sdxl", spec.sdxl, "sdxl")):
        if declared is not None and declared != (arch == family):
            raise LecoError(
                f"{names.section}.{key}: is {str(declared).lower()} but {spec.name_or_path} is an {arch} "
                f"model; set {key}: {str(arch == family).lower()} or remove the key (it is detected)"
            )
    if spec.v_pred is not None and detected_v is not None and spec.v_pred != detected_v:
        said = "v-prediction" if detected_v else "epsilon-prediction"
        if evidence == PROBED:  # a heuristic: the user's word wins, said
            warn(
                f"{names.section}.v_pred: {str(spec.v_pred).lower()}, as set (the UNet probe guessed {said})"
            )
            return ModelFamily(arch=arch, v_pred=spec.v_pred)
        raise LecoError(
            f"{names.section}.v_pred: is {str(spec.v_pred).lower()} but {evidence} says {said}; "
            f"set v_pred: {str(detected_v).lower()} or remove the key (it is detected)"
        )
    v_pred = detected_v if detected_v is not None else bool(spec.v_pred)
    return ModelFamily(arch=arch, v_pred=v_pred)


def sampler_from_config(cls: type, scheduler_config: dict[str, Any], **settings: Any) -> Any:
    """A diffusers scheduler of class `cls` built from a model's scheduler config. Where the config
    says nothing of them, clip_sample and set_alpha_to_one are off, as in every SD config: diffusers'
    DDIM/DDPM default to clipping x0 to [-1, 1], which is for pixels, not latents (an SDXL folder
    written with an Euler config would otherwise sample and train on clipped latents)."""
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    accepted = inspect.signature(cls.__init__).parameters
    for key in ("clip_sample", "set_alpha_to_one"):
        if key in accepted and key not in config:
            config[key] = False
    return cls.from_config(config, **settings)


def _first_sentence(error: BaseException) -> str:
    """The library's first sentence: what is wrong (its advice after it is about its own API)."""
    return first_line(error, None).split(". ")[0][:200]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def training_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The UNet's dtype for training; fp16 on the CPU falls back to fp32 (CPUs have no fast fp16)."""
    if device.type == "cpu" and precision == "fp16":
        warn("fp16 is not supported well on the CPU; training in fp32")
        return torch.float32
    return DTYPES[precision]


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the UNet calls of a training dtype (none for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_for_training(
    unet: UNet2DConditionModel, device: torch.device, config: Any
) -> UNet2DConditionModel:
    """Move the UNet to the device and switch on the memory savers a LecoConfig asks for."""
    unet.to(device)
    if config.other.use_xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ModuleNotFoundError, ValueError) as error:
            reason = textwrap.shorten(first_line(error, None), 120, placeholder="...")
            warn(f"xformers unavailable ({reason}); using PyTorch SDPA")
    if config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet

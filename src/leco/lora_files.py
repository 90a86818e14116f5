"""LoRA files as sampling reads them: their header, whether they fit the model, and applied to a
diffusers pipeline at a settable strength (the way diffusers users load them, with the fixes A1111
and ComfyUI make)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from leco.embedding_files import has_lora_keys, is_embedding_file, text_encoder_pairs
from leco.errors import LecoError, first_line, warn
from leco.files import safetensors_metadata
from leco.models import ModelFamily, quiet_library_logs
from leco.network import kohya
from leco.network.peft_format import diffusers_pipeline_reads, is_diffusers_layout, unet_module_paths
from leco.network.text_encoders import AppliedTextEncoderLoRA, TextEncoderLoRA

ADAPTER = "lora"


@contextmanager
def lora_strengths(
    pipe: DiffusionPipeline,
    lora: str | Path | None,
    family: ModelFamily,
    model: str | None = None,
    checked: bool = False,
) -> Iterator[Callable[[float], None]]:
    """Load a LoRA the way diffusers users do; yields a function that sets its strength.

    The LoRA is unloaded on exit: the pipeline shares its UNet with the caller's loaded models,
    which must come back unchanged (a second evaluation on them would otherwise find it there).
    `checked`: the caller already ran check_lora_fits and check_lora_finite (their warnings said once).
    """
    if lora is None:
        yield lambda strength: None
        return
    path = Path(lora)
    header = read_lora_header(path, family)
    if not checked:
        check_lora_fits(header, pipe.unet, family, model)
        check_lora_finite(path)
    unet_part, text_part = _as_diffusers_loads_it(header, pipe.unet, family)
    # diffusers 0.42 with transformers 5 keeps a kohya file's text-encoder MLP modules but drops its
    # attention ones (q/k/v/out, "unexpected keys" it logs and goes on), where A1111, ComfyUI and
    # `leco merge` apply them all: leco applies every text-encoder module itself.
    encoders = [encoder for _, encoder in text_encoder_pairs(pipe)]
    text_lora = TextEncoderLoRA(text_part, f"--lora: {path}") if text_part else None
    text_deltas = AppliedTextEncoderLoRA(text_lora, encoders, family)
    if unet_part is not None:
        try:
            with quiet_library_logs(errors=False):  # diffusers logs the error it raises, and more
                pipe.load_lora_weights(unet_part, adapter_name=ADAPTER)
        except KeyError as error:
            raise LecoError(_unread_settings(path, header, error)) from None
        except (OSError, ValueError, RuntimeError) as error:
            raise LecoError(f"--lora: {path} cannot be applied to this model ({first_line(error)})") from None

    def set_strength(strength: float) -> None:
        if unet_part is not None:
            pipe.set_adapters([ADAPTER], adapter_weights=[float(strength)])
        text_deltas.apply(strength)

    try:
        yield set_strength
    finally:
        text_deltas.apply(0.0)
        if unet_part is not None:
            pipe.unload_lora_weights()


def _unread_settings(path: Path, header: LoraHeader, error: KeyError) -> str:
    """What to say when diffusers finds a key missing: in a PEFT file, its adapter settings."""
    if "lora_adapter_metadata" in header.metadata:
        return (
            f"--lora: {path}: its lora_adapter_metadata (the adapter settings diffusers reads) lacks "
            f"{error}; save the file again with diffusers' save_lora_weights, or remove that metadata"
        )
    return f"--lora: {path} cannot be applied to this model (no {error} where diffusers looks for it)"


def _as_diffusers_loads_it(
    header: LoraHeader, unet: torch.nn.Module, family: ModelFamily
) -> tuple[str | dict | None, dict[str, torch.Tensor]]:
    """(what diffusers loads: the file's path, or its UNet tensors, None if it has none; the
    text-encoder tensors, which leco applies itself: see lora_strengths).

    The UNet tensors are changed where diffusers would apply them otherwise than kohya's formula
    does (every other tensor handed over as it is, for diffusers to read):

    - kohya's SD2 trainers (and `leco convert --sd2-proj 4d`) write the Linear proj_in/proj_out as
      1x1 convs, and some tools write a conv's 1x1 tensors as 2-D, which diffusers refuses where
      A1111 and ComfyUI reshape them: reshaped to the layer's form;
    - where the modules' alphas differ (resized or merged LoRAs), diffusers files the attention
      layers' alphas under names no layer has, so those layers get the most common alpha: each
      module's alpha/rank is folded into its lora_up and the alphas left out (scale 1 each);
    - SDXL modules named by diffusers paths (p1atdev/LECO, sliders) take their SGM names, the ones
      diffusers' kohya reader knows (it has no rule for add_embedding and drops it without a word);
      SD1/SD2 modules named by LDM paths (input_blocks_...) take their diffusers paths.
    """
    by_key = kohya.unet_layer_keys_of_file(header.shapes, unet, family)
    reshaped = _modules_in_another_form(header, unet, by_key)
    renamed = _renamed_modules(header, unet, family, by_key)
    alphas = _module_alphas(header)
    plain = all(
        key.partition(".")[2] in ("lora_down.weight", "lora_up.weight", "alpha") for key in header.shapes
    )
    fold = len(set(alphas.values())) > 1 and plain  # DoRA and other kinds: diffusers' reading stands
    has_text = any(key.startswith(kohya.TEXT_ENCODER_PREFIXES) for key in header.shapes)
    if not reshaped and not fold and not has_text and not renamed and header.tensors is None:
        return str(header.path), {}
    from safetensors.torch import load_file

    tensors = dict(header.tensors) if header.tensors is not None else load_file(str(header.path))
    text = {key: tensors.pop(key) for key in list(tensors) if key.startswith(kohya.TEXT_ENCODER_PREFIXES)}
    for module, shapes in reshaped.items():
        for part, shape in zip(("lora_down.weight", "lora_up.weight"), shapes, strict=True):
            tensors[f"{module}.{part}"] = tensors[f"{module}.{part}"].reshape(shape)
    if fold:
        for module, alpha in alphas.items():
            if f"{module}.lora_up.weight" not in tensors:
                continue  # a text-encoder module, applied by leco
            up = tensors[f"{module}.lora_up.weight"]
            tensors[f"{module}.lora_up.weight"] = up * (
                alpha / header.shapes[f"{module}.lora_down.weight"][0]
            )
            tensors.pop(f"{module}.alpha", None)
    for key in list(tensors):
        module, _, part = key.partition(".")
        if module in renamed:
            tensors[f"{renamed[module]}.{part}"] = tensors.pop(key)
    return (tensors or None), text


def _renamed_modules(
    header: LoraHeader, unet: torch.nn.Module, family: ModelFamily, by_key: dict[str, str]
) -> dict[str, str]:
    """The file's modules named otherwise than diffusers' kohya reader expects -> the names it
    reads: an SDXL file's diffusers paths -> SGM names, an SD1/SD2 file's LDM paths -> diffusers
    paths (a file naming one layer both ways is refused, as `leco merge` refuses it)."""
    modules = dict.fromkeys(key.partition(".")[0] for key in header.shapes)  # text encoders: in no by_key
    canonical = kohya.canonical_keys(modules, by_key, family, unet.config, f"--lora: {header.path}")
    return {module: sgm for module, sgm in canonical.items() if sgm != module}


def _modules_in_another_form(
    header: LoraHeader, unet: torch.nn.Module, by_key: dict[str, str]
) -> dict[str, tuple[list[int], list[int]]]:
    """The file's modules whose 1x1 tensors are in the other form than their layer's (Linear layers
    given as 1x1 convs, kohya's SD2 form; 1x1 convs or a conv's lora_up given as 2-D), with the
    shapes diffusers needs for them (it refuses either form where A1111 and ComfyUI reshape)."""
    reshaped = {}
    for key, down in header.shapes.items():
        module, _, part = key.partition(".")
        up = header.shapes.get(f"{module}.lora_up.weight")
        if part != "lora_down.weight" or module not in by_key or up is None:
            continue
        shapes = kohya.fitted_shapes(down, up, unet.get_submodule(by_key[module]))
        if shapes != (down, up):
            reshaped[module] = shapes
    return reshaped


def _module_alphas(header: LoraHeader) -> dict[str, float]:
    """Each kohya module's alpha (its rank where the file gives none, as every tool reads it)."""
    from safetensors import safe_open

    ranks = {k.partition(".")[0]: s[0] for k, s in header.shapes.items() if k.endswith(".lora_down.weight")}
    alphas: dict[str, float] = {module: float(rank) for module, rank in ranks.items()}
    if header.tensors is not None:
        given = {module: header.tensors.get(f"{module}.alpha") for module in ranks}
        return {module: alphas[module] if alpha is None else float(alpha) for module, alpha in given.items()}
    with safe_open(str(header.path), framework="pt") as file:
        for module in ranks:
            if f"{module}.alpha" in header.shapes:
                alphas[module] = float(file.get_tensor(f"{module}.alpha").item())
    return alphas


def check_lora_finite(path: Path) -> None:
    """A LoRA holding NaN draws black images without a word from diffusers; name it instead."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        kohya.check_values(((key, file.get_tensor(key)) for key in file.keys()), f"--lora: {path}")  # noqa: SIM118


@dataclass(frozen=True)
class LoraHeader:
    """What a LoRA file's safetensors header says: enough to refuse it before diffusers reads it."""

    path: Path
    shapes: dict[str, list[int]]
    metadata: dict[str, str]
    # A file diffusers' pipeline loader would read wrongly (leco.network.peft_format), read by leco under
    # kohya's names: `shapes` are theirs, and these tensors are what diffusers loads.
    tensors: dict[str, torch.Tensor] | None = None


# safetensors' names of the whole-number dtypes, as torch spells them (messages say "int32" either way).
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
}


def read_lora_header(path: str | Path, family: ModelFamily | None = None) -> LoraHeader:
    """Read and check a LoRA file's header; missing, damaged and non-LoRA files are one-line errors.

    diffusers answers each of these with a long traceback (or a vague "Invalid LoRA checkpoint"),
    so the file is checked with safetensors first; the header holds every name and shape.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        inside = kohya.file_in_folder(path) if path.is_dir() else ""
        raise LecoError(f"--lora: {path} {what}; give the LoRA's .safetensors file{inside}")
    if path.suffix.lower() != ".safetensors":
        if is_embedding_file(path):  # A1111's .pt embeddings
            raise LecoError(
                f"--lora: {path} is a textual-inversion embedding, not a LoRA; give it as --embedding "
                "and put its token in --prompt or --negative"
            )
        raise LecoError(
            f"--lora: {path} is not a .safetensors file; LoRAs load from .safetensors "
            "(convert a .pt LoRA with leco convert)"
        )
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            shapes = {key: list(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118
            dtypes = {key: file.get_slice(key).get_dtype() for key in shapes}
    except (SafetensorError, OSError) as error:
        raise LecoError(
            f"--lora: {path} is not a readable .safetensors file ({first_line(error)}); it may be "
            "truncated or damaged: download it or train it again"
        ) from None
    whole = {key: _SAFETENSORS_DTYPES.get(t, t) for key, t in dtypes.items() if not t.startswith(("F", "BF"))}
    kohya.refuse_whole_numbers(whole, f"--lora: {path}")
    for key, shape in shapes.items():
        module, _, part = key.partition(".")
        if part == "lora_down.weight" and f"{module}.lora_up.weight" in shapes:
            kohya.check_ranks(module, shape, shapes[f"{module}.lora_up.weight"], f"--lora: {path}")
        elif part == "alpha":
            kohya.check_alpha(module, shape, f"--lora: {path}")
    if kohya.is_embedding(shapes):
        raise LecoError(
            f"--lora: {path} is a textual-inversion embedding, not a LoRA; give it as --embedding "
            "and put its token in --prompt or --negative"
        )
    if not shapes:
        raise LecoError(f"--lora: {path} holds no tensors, so it is no LoRA (an empty or unfinished file?)")
    if kohya.is_one_token_embedding(shapes):
        raise LecoError(
            f"--lora: {path} holds one [vectors, width] tensor, a textual-inversion embedding (diffusers' "
            "form), not a LoRA; give it as --embedding and put its token in --prompt or --negative"
        )
    # LoHa/LoKr modules in kohya's naming: named as such, not as "no LoRA weights"
    kohya.refuse_lycoris((k for k in shapes if k.startswith(kohya.KOHYA_PREFIXES)), f"--lora: {path}")
    if not has_lora_keys(shapes):
        example = next(iter(shapes))
        raise LecoError(
            f"--lora: {path} holds no LoRA weights (keys like {example}); if it is a model checkpoint, "
            "give it as --model"
        )
    if is_diffusers_layout(list(shapes)):
        if diffusers_pipeline_reads(list(shapes)):
            return LoraHeader(path, shapes, metadata)
        tensors, _ = kohya.read_lora_file(path, family)  # the family: which SDXL encoder text keys are
        return LoraHeader(path, {key: list(t.shape) for key, t in tensors.items()}, metadata, tensors)
    kohya.refuse_other_keys(shapes, f"--lora: {path}")  # diffusers' vague "Invalid LoRA checkpoint" else
    return LoraHeader(path, shapes, metadata)


def check_lora_fits(
    header: LoraHeader, unet: torch.nn.Module, family: ModelFamily, model: str | None = None
) -> None:
    """Refuse a LoRA made for another model family, by its UNet layers (kohya-format files: leco's,
    A1111's, ComfyUI's; other layouts are left to diffusers), else by its metadata. Metadata that
    its layers contradict, and a prediction type other than the model's, are said. `model`: the
    --model given, which the advice names as not the one (rather than "give --model")."""
    lora_arch = kohya.arch_from_metadata(header.metadata)
    mislabelled = lora_arch is not None and lora_arch != family.arch
    modules = _kohya_modules(header)
    by_key = kohya.unet_layer_keys_of_file(header.shapes, unet, family) if modules else {}
    misfit = _layer_misfit(header, modules, by_key, unet, family)
    if mislabelled and (misfit is not None or not modules):  # the layers agree, or cannot be checked
        why = f"--lora: {header.path} was trained for {lora_arch} but the model is {family.name}"
        raise LecoError(kohya.does_not_fit(why, header.metadata, model))
    if misfit is not None:
        raise LecoError(kohya.does_not_fit(f"--lora: {header.path} {misfit}", header.metadata, model))
    if mislabelled:  # every layer fits: the metadata is wrong
        warn(f"--lora: {header.path}: {kohya.mislabelled_family(header.metadata, family)}")
    other = kohya.other_prediction(header.metadata, family)
    if other:
        warn(f"--lora: {header.path} {other}")
    unknown = [module for module in modules if module not in by_key]
    unknown = unknown or _unknown_diffusers_modules(header, unet)
    if unknown:  # as A1111 and ComfyUI do: the modules this model has are applied, the others said
        modules = modules or unet_module_paths(header.shapes)
        more = ", ..." if len(unknown) > 1 else ""
        warn(
            f"--lora: {header.path}: {len(unknown)} of its {len(modules)} UNet modules match no layer of "
            f"this {family.name} model and are not applied ({unknown[0]}{more})"
        )


def _unknown_diffusers_modules(header: LoraHeader, unet: torch.nn.Module) -> list[str]:
    # diffusers leaves out the modules its UNet lacks and says so only in a log leco keeps quiet
    layers = dict(unet.named_modules())
    return [path for path in unet_module_paths(header.shapes) if path not in layers]


def _kohya_modules(header: LoraHeader) -> list[str]:
    """The file's UNet modules, in kohya's naming (none for other layouts)."""
    from leco.network.kohya import UNET_PREFIX

    kohya_keys = [key for key in header.shapes if key.startswith((UNET_PREFIX, *kohya.TEXT_ENCODER_PREFIXES))]
    stray = sorted(set(header.shapes) - set(kohya_keys))
    if kohya_keys and stray:  # diffusers' own message would not name the key
        raise LecoError(
            f"--lora: {header.path}: {stray[0]} is not a kohya LoRA key (they start with {UNET_PREFIX} or "
            "lora_te); this file is not a LoRA leco can read"
        )
    kohya.refuse_lycoris(kohya_keys, f"--lora: {header.path}")  # diffusers would drop them silently
    return sorted({key.split(".", 1)[0] for key in kohya_keys if key.startswith(UNET_PREFIX)})


def _layer_misfit(
    header: LoraHeader,
    modules: list[str],
    by_key: dict[str, str],
    unet: torch.nn.Module,
    family: ModelFamily,
) -> str | None:
    """Why the file's kohya-named UNet `modules` cannot be applied to this UNet, if they cannot
    (`by_key`: its layers by every key a file may use; SDXL files use SGM or diffusers paths)."""
    if not modules:
        return None
    known = [module for module in modules if module in by_key]
    if not known:
        return (
            f"fits no layer of this {family.name} model ({modules[0]} and {len(modules) - 1} more); it was "
            "made for another model family"
        )
    for module in known:
        layer = unet.get_submodule(by_key[module])
        down = header.shapes.get(f"{module}.lora_down.weight")
        if f"{module}.lora_up.weight" not in header.shapes or down is None:
            missing = "lora_down" if down is None else "lora_up"
            raise LecoError(
                f"--lora: {header.path} has {module} without its {missing}.weight; the file is incomplete"
            )
        up = header.shapes[f"{module}.lora_up.weight"]
        try:  # the shapes `leco merge`, A1111 and ComfyUI read: 1x1 tensors in Linear or conv form
            kohya.fitted_shapes(down, up, layer, module)
        except kohya.LoraDoesNotFit as error:
            why = str(error).removesuffix(f"; {kohya.ANOTHER_MODEL}")
            return f"does not fit this {family.name} model: {why}"
    return None


@dataclass(frozen=True)
class Distillation:
    """What a LoRA's run distilled (its `leco.prompts`): the guidance scales its distill entries
    reproduce at guidance 1, their negative prompts, and whether other actions trained it too."""

    scales: tuple[float, ...]
    negatives: tuple[str, ...]
    mixed: bool

    def reproduces(self) -> str:
        """'guidance 3' or 'guidance 3 with negative prompt "blurry"'."""
        said = f"guidance {', '.join(f'{scale:g}' for scale in self.scales)}"
        negatives = [n for n in self.negatives if n]
        return said + (f" with negative prompt {', '.join(map(repr, negatives))}" if negatives else "")


def distillation_of(lora: str | Path) -> Distillation | None:
    """The CFG distillation a leco file was trained for, or None (no distill entry, or no leco file)."""
    try:
        entries = json.loads(safetensors_metadata(Path(lora)).get("leco.prompts", "[]"))
    except (OSError, ValueError):
        return None
    entries = [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []
    distilled = [entry for entry in entries if entry.get("action") == "distill"]
    if not distilled:
        return None
    scales = sorted(
        {
            entry.get("guidance_scale")
            for entry in distilled
            if isinstance(entry.get("guidance_scale"), (int, float))
        }
    )
    negatives = sorted({str(entry.get("unconditional") or "") for entry in distilled})
    mixed = any(entry.get("action") not in ("distill", "preserve") for entry in entries)
    return Distillation(tuple(scales), tuple(negatives), mixed)


def warn_if_distilled(lora: str | None, guidance: float, fix: str = "--guidance 1") -> None:
    """A CFG-distilled LoRA is made for guidance 1; at the usual guidance it guides twice."""
    distillation = distillation_of(lora) if lora is not None else None
    if distillation is None:
        return
    if distillation.mixed:
        warn(
            f"--lora {lora}: partly CFG-distilled (its distill entries draw at guidance 1 what the model "
            f"draws at {distillation.reproduces()}; its other entries were trained for guided sampling): "
            f"at guidance {guidance:g} only the {'other' if guidance != 1 else 'distill'} entries work "
            "as trained"
        )
    elif guidance != 1:
        warn(
            f"--lora {lora}: CFG-distilled (it draws at guidance 1 what the model draws at "
            f"{distillation.reproduces()}); sample with {fix}, not {guidance:g}"
        )


def trained_clip_skip(path: str | Path) -> int | None:
    """The clip skip a LoRA or embedding was trained with, where its file says (kohya's and leco's
    `ss_clip_skip`; "None" where the run left it unset)."""
    try:
        value = safetensors_metadata(Path(path)).get("ss_clip_skip", "")
    except (OSError, ValueError):
        return None
    if value == "None":  # the run left it unset: the model's own layer, clip skip 1
        return 1
    return int(value) if value.isdigit() and int(value) >= 1 else None

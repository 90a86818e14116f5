"""A LoRA on a diffusers UNet (injected with peft) with a strength that can be switched.

The strength (multiplier) scales every LoRA branch: 0 is the original model, 1 the trained edit,
negative values invert it. Switching it touches no weights, so the teacher (LoRA off) and the
student (LoRA on) share one UNet in memory.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from leco._version import __version__
from leco.conditioning import Conditioning
from leco.config import NetworkConfig
from leco.errors import LecoError
from leco.models import ModelFamily
from leco.network import kohya
from leco.network.layers import NETWORK_TYPES, PRESETS, adaptable_layers, is_conv3x3, select_layers
from leco.network.text_encoders import TextEncoderLoRA
from leco.objectives import Predictions

ADAPTER = "leco"


class SwitchableLoRA:
    """peft LoRA layers whose branches share one strength (multiplier): what a UNet LoRA and a
    text-encoder LoRA have in common."""

    layers: dict[str, LoraLayer]
    _multiplier: float = 1.0

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        for layer in self.layers.values():
            layer.set_scale(ADAPTER, float(value))
        self._multiplier = float(value)

    @contextmanager
    def strength(self, value: float) -> Iterator[SwitchableLoRA]:
        """Temporarily apply the LoRA at `value` (0 = the original model)."""
        previous = self.multiplier
        self.multiplier = value
        try:
            yield self
        finally:
            self.multiplier = previous

    # A LoRA edits the model itself: the prompt's own prediction is trained, and sampling is as usual.
    def student_condition(self, target: Conditioning) -> Conditioning:
        return target

    def negative_condition(self, unconditional: Conditioning) -> Conditioning:
        return unconditional

    def training_target(self, conditional_target: Tensor, frozen: Predictions) -> Tensor:
        return conditional_target

    def negative_prompt(self, strength: float, negative: str = "") -> str:
        return negative

    def parameters(self) -> list[nn.Parameter]:
        return [
            p
            for layer in self.layers.values()
            for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
        ]


class LoRANetwork(SwitchableLoRA):
    """LoRA modules on selected UNet layers, each with its own rank and alpha (scale = alpha/rank).

    Implements `leco.trainable.Trainable`: the edited model is the UNet with the LoRA on, for every
    prompt, so the trained prediction is the target prompt's own and sampling needs no change.
    """

    extra_roles: tuple[str, ...] = ()
    text_encoder_lora: TextEncoderLoRA | None = None  # other trainers' text-encoder modules (from_file)
    # SD2 proj_in/proj_out saved as 1x1-conv (4-D) tensors, the form kohya's own scripts load
    # (save.sd2_proj_4d); diffusers needs the default 2-D form, A1111 and ComfyUI read both.
    proj_4d: bool = False

    def __init__(
        self,
        unet: nn.Module,
        family: ModelFamily,
        ranks: dict[str, tuple[int, float]],
        network_type: str = "lierla",
        training_method: str = "full",
    ) -> None:
        self.unet = unet
        self.family = family
        self.network_type = network_type
        self.training_method = training_method
        self.ranks = dict(ranks)
        (rank, alpha), _ = Counter(self.ranks.values()).most_common(1)[0]
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=list(self.ranks),
            rank_pattern={_exact(n): r for n, (r, _) in self.ranks.items() if r != rank},
            alpha_pattern={_exact(n): a for n, (_, a) in self.ranks.items() if a != alpha},
            lora_dropout=0.0,
            init_lora_weights=True,  # down: kaiming-uniform(a=sqrt 5), up: zeros, as kohya
        )
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
        self.layers: dict[str, LoraLayer] = {name: unet.get_submodule(name) for name in self.ranks}
        for parameter in self.parameters():
            # Trainable weights stay fp32 whatever the UNet's dtype (autocast handles the matmuls).
            parameter.data = parameter.data.float()
            parameter.requires_grad_(True)
        self._multiplier = 1.0
        self._text_sizes: tuple[Tensor, dict[str, Tensor]] | None = None

    @classmethod
    def create(cls, unet: nn.Module, family: ModelFamily, config: NetworkConfig) -> LoRANetwork:
        """A fresh (identity) LoRA on the layers the config's type and preset select."""
        ranks, sizes = {}, []
        for name in select_layers(unet, config.type, config.training_method):
            rank, alpha, layer = config.rank, config.alpha, unet.get_submodule(name)
            if is_conv3x3(layer):
                rank = config.conv_rank or rank
                alpha = config.conv_alpha if config.conv_alpha is not None else alpha
            ranks[name] = (rank, float(alpha or rank))  # kohya: alpha 0 means alpha = rank
            sizes.append(min(layer.weight.shape[0], layer.weight[0].numel()))
        largest = max(sizes, default=0)
        if ranks and max(rank for rank, _ in ranks.values()) > largest:
            # Caught before peft allocates it: rank 100000 would ask for gigabytes and fail with a traceback.
            key = "network.conv_rank" if config.conv_rank and config.conv_rank > largest else "network.rank"
            raise LecoError(
                f"{key}: above the size of every layer it trains (the largest allows {largest}); a LoRA "
                f"cannot have more directions than its layer: use at most {largest}"
            )
        return cls(unet, family, ranks, config.type, config.training_method)

    @classmethod
    def from_file(
        cls,
        unet: nn.Module,
        family: ModelFamily,
        path: str | Path,
        text_encoders: Sequence[nn.Module] | None = None,
    ) -> LoRANetwork:
        """Load a kohya-format LoRA (ours or another trainer's) onto a UNet of its family.

        SDXL files may name layers the diffusers way (p1atdev/LECO, sliders) and SD2 files may hold
        kohya's 4-D proj_in/proj_out: both are read. Text-encoder modules stay as tensors in
        `network.text_encoder_lora` (None without any), checked against `text_encoders` if given.
        """
        tensors, metadata = kohya.read_lora_file(path, family)
        unet_tensors, text_tensors = kohya.split_by_model(tensors, str(path))
        with kohya.naming_its_model(metadata):  # which model to use instead, or that the file changed
            modules = kohya.canonical_unet_modules(unet_tensors, unet, family, source=str(path))
        if not modules:
            raise LecoError(
                f"{path}: holds no UNet layer (text-encoder layers only); apply it with leco generate, "
                "eval or merge (leco.lora_files.lora_strengths in Python)"
            )
        by_key = kohya.unet_layer_keys(unet, family)
        ranks = {by_key[key]: (weights.rank, weights.alpha) for key, weights in modules.items()}
        network = cls(
            unet,
            family,
            ranks,
            network_type=_network_type(unet, ranks),
            training_method=metadata.get("leco.training_method", "full"),
        )
        network.load_kohya_state_dict(kohya.flatten_modules(modules), source=str(path))
        network.text_encoder_lora = TextEncoderLoRA(text_tensors, str(path)) if text_tensors else None
        if network.text_encoder_lora is not None and text_encoders is not None:
            network.text_encoder_lora.fitted(text_encoders, family)
        return network

    # -- how the trainer uses it ----------------------------------------------------------------

    def edited_conditions(
        self, texts: list[str], cached: Mapping[str, Conditioning]
    ) -> dict[str, Conditioning]:
        return {text: cached[text] for text in texts}  # the encoders are not trained

    def text_state_change(self, moments: Tensor, texts: list[str]) -> Tensor:
        """How much the LoRA moves cross-attention keys and values, relative to their size, for text
        states whose second moments (mean of x xᵀ over tokens) are `moments`; mean over the layers
        that read text. sum ‖ΔW x‖² = trace(ΔW M ΔWᵀ), so no text state goes through a layer."""
        if self._text_sizes is None or self._text_sizes[0] is not moments:
            sizes = {}
            for name, layer in self._text_layers():
                base = layer.base_layer.weight.float()
                sizes[name] = torch.einsum("oi,ij,oj->", base, moments.to(base), base).detach()
            self._text_sizes = (moments, sizes)
        sizes = self._text_sizes[1]
        if not sizes:
            return moments.new_zeros(())
        changes = []
        for name, layer in self._text_layers():
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            rank, alpha = self.ranks[name]
            inner = down @ moments.to(down) @ down.T
            changes.append((alpha / rank) ** 2 * torch.trace(up.T @ up @ inner) / sizes[name])
        return torch.stack(changes).mean()

    def _text_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, layer in self.layers.items():
            if PRESETS["xattn-strict"](name):  # the layers that read text: cross-attention keys, values
                yield name, layer

    def state_dict(self) -> dict[str, Tensor]:
        return self.kohya_state_dict(torch.float32)

    def load_state_dict(self, tensors: dict[str, Tensor], source: str = "state dict") -> None:
        self.load_kohya_state_dict(tensors, source)

    # -- weights --------------------------------------------------------------------------------

    def weight_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = []
        for layer in self.layers.values():
            modules += [layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]]
        return modules

    def __len__(self) -> int:
        return len(self.layers)

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Tensors under kohya keys: down/up in `dtype`, alpha as fp32 scalars."""
        return lora_tensors(self._by_key(), dtype)

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "state dict") -> None:
        load_lora_tensors(self._by_key(), tensors, source)

    def _by_key(self) -> dict[str, tuple[LoraLayer, float]]:
        return {
            kohya.kohya_key(name, self.family, self.unet.config): (layer, self.ranks[name][1])
            for name, layer in self.layers.items()
        }

    def metadata(self, resolution: int, title: str) -> dict[str, str]:
        """kohya/A1111 (ss_*), ModelSpec and leco metadata; hashes are added when saving."""
        args: dict[str, str] = {}
        conv = [value for name, value in self.ranks.items() if is_conv3x3(self.layers[name].get_base_layer())]
        if conv:
            args = {"conv_dim": str(conv[0][0]), "conv_alpha": _number(conv[0][1])}
        ranks = list(self.ranks.values())
        return network_metadata(
            ranks, self.family, resolution, title, self.network_type, self.training_method, args
        )

    def save(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        resolution: int,
        title: str | None = None,
        extra_metadata: dict[str, Any] | None = None,
    ) -> Path:
        path = Path(path)
        metadata = with_extra_metadata(self.metadata(resolution, title or path.stem), extra_metadata)
        tensors = self.kohya_state_dict(dtype)
        if self.proj_4d and self.family.arch == "sd2":
            metadata["leco.sd2_proj"] = "4d"
            for key, value in tensors.items():
                if value.ndim == 2 and key.split(".")[0].endswith(("_proj_in", "_proj_out")):
                    tensors[key] = value[:, :, None, None].contiguous()
        return kohya.save_lora_file(path, tensors, metadata)

    def remove(self) -> None:
        """Take the LoRA out of the UNet again, restoring the original layers."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.unet.get_submodule(parent_name), child, layer.get_base_layer())
        self.layers = {}
        forget_adapter(self.unet)


def forget_adapter(model: nn.Module) -> None:
    """Drop the adapter's record peft keeps on the model once its layers are taken out: left there,
    the next injection (ours or a diffusers load_lora_weights) warns about, or trips over, an
    adapter that is gone."""
    configs = getattr(model, "peft_config", None)
    if configs is not None:
        configs.pop(ADAPTER, None)
        if not configs:
            del model.peft_config


def lora_tensors(modules: dict[str, tuple[LoraLayer, float]], dtype: torch.dtype) -> dict[str, Tensor]:
    """kohya key -> (layer, alpha) as a file's tensors: down/up in `dtype`, alpha as fp32 scalars."""
    tensors = {}
    for key, (layer, alpha) in modules.items():
        tensors[f"{key}.lora_down.weight"] = export_weight(layer.lora_A[ADAPTER].weight, dtype)
        tensors[f"{key}.lora_up.weight"] = export_weight(layer.lora_B[ADAPTER].weight, dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


@torch.no_grad()
def load_lora_tensors(
    modules: dict[str, tuple[LoraLayer, float]], tensors: dict[str, Tensor], source: str
) -> None:
    """Copy a state saved by `lora_tensors` back into the layers; every key, shape and alpha checked."""
    expected = lora_tensors(modules, torch.float32)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        kind, first = ("lacks", missing[0]) if missing else ("has an unexpected", unexpected[0])
        raise LecoError(f"{source}: {kind} key {first}; it was not saved from this network's layers")
    for key, (layer, alpha) in modules.items():
        for target, suffix in (
            (layer.lora_A[ADAPTER].weight, "lora_down"),
            (layer.lora_B[ADAPTER].weight, "lora_up"),
        ):
            value = tensors[f"{key}.{suffix}.weight"]
            if value.shape != target.shape:
                raise LecoError(
                    f"{source}: {key}.{suffix}.weight has shape {list(value.shape)}, "
                    f"expected {list(target.shape)}"
                )
            target.copy_(value.to(target))
        saved = float(tensors[f"{key}.alpha"])
        if not math.isclose(saved, alpha, rel_tol=1e-6):
            raise LecoError(f"{source}: {key}.alpha is {saved}, the network has {alpha}")


def network_metadata(
    ranks: list[tuple[int, float]],
    family: ModelFamily,
    resolution: int,
    title: str,
    network_type: str,
    training_method: str,
    args: dict[str, str] | None = None,
) -> dict[str, str]:
    """The metadata of a LoRA file: kohya/A1111 (ss_*, the most common rank and alpha), ModelSpec, leco."""
    (rank, alpha), _ = Counter(ranks).most_common(1)[0]
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha),
        "ss_network_args": kohya.json_metadata(args or {}),
        "ss_output_name": title,
        **kohya.family_metadata(family, resolution),
        "modelspec.title": title,
        "leco.version": __version__,
        "leco.network_type": network_type,
        "leco.training_method": training_method,
    }


def with_extra_metadata(metadata: dict[str, str], extra: dict[str, Any] | None) -> dict[str, str]:
    """`metadata` and the run's own entries (JSON where not text)."""
    extra = {k: v if isinstance(v, str) else kohya.json_metadata(v) for k, v in (extra or {}).items()}
    return {**metadata, **extra}


def _network_type(unet: nn.Module, layers: Iterable[str]) -> str:
    """The first network type whose layers include `layers` (a file read back); every layer a file
    can name is in `all`."""
    layers = set(layers)
    return next(kind for kind in NETWORK_TYPES if layers <= set(adaptable_layers(unet, kind)))


def _exact(name: str) -> str:
    # peft matches rank/alpha patterns as regexes against the end of a module path.
    return "^" + name.replace(".", r"\.")


def export_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.detach().to("cpu", dtype).contiguous().clone()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)

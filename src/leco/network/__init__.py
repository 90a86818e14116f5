"""LoRA modules on a diffusers UNet and the kohya file format they are saved in."""

from leco.network.kohya import read_lora_file, save_lora_file
from leco.network.layers import PRESETS, adaptable_layers, select_layers
from leco.network.lora import LoRANetwork

__all__ = ["PRESETS", "LoRANetwork", "adaptable_layers", "read_lora_file", "save_lora_file", "select_layers"]

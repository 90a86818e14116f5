"""leco: train LoRAs that erase or strengthen concepts in Stable Diffusion, without images."""

__version__ = "0.1.0"

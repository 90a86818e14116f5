import os

# A tiny forward on a busy 2-core machine was measured 100x slower with 2 threads than with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

from leco.testing import save_single_file, save_tiny_pipeline  # noqa: E402

FAMILIES = {"sd1": ("sd1", False), "sd2-v": ("sd2", True), "sdxl": ("sdxl", False)}


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Diffusers folders of tiny SD1, SD2 (v-prediction) and SDXL pipelines, keyed by family name."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: _save(root / name, arch, v_pred) for name, (arch, v_pred) in FAMILIES.items()}


def _save(folder, arch, v_pred):
    save_tiny_pipeline(folder, arch, v_pred)
    return folder


@pytest.fixture(scope="session")
def tiny_single_files(tmp_path_factory, tiny_folders):
    """The same pipelines as original-layout single .safetensors files (UNet + text encoders)."""
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("single")
    files = {}
    for name, (arch, _) in FAMILIES.items():
        pipe = DiffusionPipeline.from_pretrained(tiny_folders[name])
        files[name] = save_single_file(root / f"{name}.safetensors", pipe, arch)
    return files

"""Full-size models: seconds per step and peak GPU memory of leco's config, and the reference's.

Builds random-initialised UNets and text encoders of SD1.5, SD2.1-v and SDXL from the configs leco
ships (nothing is downloaded) and trains leco's default config with the LoRA on the cross-attention
(rank 4, training_method xattn; samples_per_rollout 4, 50 denoising steps, CFG 3 rollouts) and the
reference's on every transformer layer (training_method full) at each family's native size, in
fp16 and bf16, with and without gradient checkpointing, the same with 4 steps per forward
(train.steps_per_forward), and the reference LECO schedule (benchmarks/reference.py) in one run.
`--transplant` times a transplant instead: SD1.5 taught by SD2.1-v and the other way round, the
teacher's UNet on the GPU and offloaded (teacher.offload). `--compile` compiles the student's UNet
(torch.compile) in every row; the first rollout's seconds, the compilation in them, are printed.

  python benchmarks/gpu_scale.py              # on a CUDA GPU: the measured table
  python benchmarks/gpu_scale.py --estimate   # no GPU: peak memory estimated from sizes (labelled)
  python benchmarks/gpu_scale.py --smoke      # the same code on the CPU at a tiny size (tests)
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import gc
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch
from diffusers import UNet2DConditionModel
from recipe_runs import known_names, positive_int, seconds
from reference import reference_step
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from leco.cli import quiet_libraries
from leco.config import LecoConfig
from leco.errors import first_line
from leco.models import CONFIG_ROOT, LoadedModels, ModelFamily, clip_tokenizers
from leco.steps import Step
from leco.trainer import Trainer

FAMILIES = {"sd1.5": ("sd1", False, 512), "sd2.1-v": ("sd2-v", True, 768), "sdxl": ("sdxl", False, 1024)}
GIB = 2**30


def unet_config(folder: Path, smoke: bool, size: int) -> dict[str, Any]:
    config = dict(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    # A row may train below the family's size (the CPU rows): the model is told that size is its
    # own, so the warning meant for a user's config far from the model's size stays quiet.
    config["sample_size"] = size // 8
    if smoke:  # the same blocks, an eighth of the width, one transformer layer each (SDXL has ten)
        config["transformer_layers_per_block"] = 1
        config["block_out_channels"] = [c // 8 for c in config["block_out_channels"]]
        heads = config["attention_head_dim"]
        config["attention_head_dim"] = heads if isinstance(heads, int) else [min(h, 4) for h in heads]
        # text width to match the tiny encoders below
        config["cross_attention_dim"] = 64 if config.get("addition_embed_type") else 32
        if config.get("addition_embed_type"):
            config["addition_time_embed_dim"] = 8
            config["projection_class_embeddings_input_dim"] = 8 * 6 + 32
        config["norm_num_groups"] = 8
    return config


def text_encoder(folder: Path, subfolder: str, smoke: bool, cls: type) -> torch.nn.Module:
    config = CLIPTextConfig.from_pretrained(folder / subfolder)
    if smoke:
        config.hidden_size = config.projection_dim = 32
        config.intermediate_size, config.num_hidden_layers, config.num_attention_heads = 64, 2, 4
    return cls(config)


def build(family: str, dtype: torch.dtype, device: torch.device, smoke: bool, size: int) -> LoadedModels:
    """Random weights in the family's layout, made directly on the device, drawing at `size` px."""
    name, v_pred, _ = FAMILIES[family]
    arch = name.split("-")[0]
    folder = CONFIG_ROOT / name
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config(folder, smoke, size)).to(dtype)
        encoders = [text_encoder(folder, "text_encoder", smoke, CLIPTextModel).to(dtype)]
        if arch == "sdxl":
            encoders.append(
                text_encoder(folder, "text_encoder_2", smoke, CLIPTextModelWithProjection).to(dtype)
            )
    for module in (unet, *encoders):
        module.requires_grad_(False).eval()
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    family_ = ModelFamily(arch, v_pred)
    scheduler["prediction_type"] = family_.prediction_type
    return LoadedModels(family_, unet, encoders, clip_tokenizers(family_), scheduler, 8, f"random {family}")


# The schedules compared: leco's defaults, the same with a rollout's 4 steps taking their gradients
# from one batched forward and backward (train.steps_per_forward; memory: 4 latents' activations),
# and the reference LECO schedule.
SCHEDULES = {"leco default": 1, "leco, 4 steps per forward": 4, "reference LECO": 1}
SCHEDULE_KEYS = dict(zip(["default", "steps4", "reference"], SCHEDULES, strict=True))  # --schedules


# --transplant: each student's teacher, the family that shares its latent space and noise schedule
# (SDXL shares neither with another family).
TEACHER_OF = {"sd1.5": "sd2.1-v", "sd2.1-v": "sd1.5"}
TRANSPLANTS = {"on the GPU": False, "offloaded": True}  # the teacher's UNet: teacher.offload


def config(
    out: str, precision: str, size: int, checkpointing: bool, schedule: str, teacher: dict | None = None
) -> LecoConfig:
    reference = schedule == "reference LECO"
    return LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": "unused"},
            **({"teacher": teacher} if teacher else {}),
            "prompts": [{"target": "a painting by van gogh", "resolution": size}],
            "network": {"training_method": "full" if reference else "xattn"},
            "train": {
                "precision": precision,
                "iterations": 10**6,
                "lr": 1e-4,
                "seed": 0,
                "gradient_checkpointing": checkpointing,
                "samples_per_rollout": 1 if reference else 4,
                "steps_per_forward": SCHEDULES[schedule],
            },
            "save": {"path": out, "name": "bench"},
        }
    )


def measure(
    family: str, precision: str, checkpointing: bool, schedule: str, args, out: str
) -> dict[str, Any]:
    device = torch.device("cpu" if args.smoke else "cuda")
    size = 64 if args.smoke else FAMILIES[family][2]  # 64: every family's latent grid divides it
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if args.smoke:
        dtype, precision = torch.float32, "fp32"  # the CPU has no fast half precision
    models = build(family, dtype, device, args.smoke, size)
    if args.compile:
        models.unet.compile()  # in place: the LoRA injected next is compiled with it, at the first call
    teacher, loading = None, nullcontext()
    if schedule in TRANSPLANTS:
        teacher_family = TEACHER_OF[family]
        teacher = {"name_or_path": f"random {teacher_family}", "offload": TRANSPLANTS[schedule]}
        # Nothing to load from disk: the teacher's loader is handed a model built like the student.
        teacher_models = build(teacher_family, dtype, device, args.smoke, size)
        loading = patch("leco.teacher.load_models", lambda *_, **__: teacher_models)
    base_schedule = "leco default" if teacher else schedule
    run = config(out, precision, size, checkpointing, base_schedule, teacher)
    run.train.device = device.type
    if args.smoke:
        run.train.max_denoising_steps = 6
    with loading:
        trainer = Trainer(run, progress=False, models=models)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        if schedule == "reference LECO":
            reference_step(trainer, generator)
        else:
            trainer.train_step()

    # Whole rollouts, warm-up and timed: a rollout's calls (and a block's one forward) fall on its
    # first step and the others are cheap, so a part of one would misstate a step.
    cycle = run.train.samples_per_rollout
    timed = cycle * -(-args.steps // cycle)
    start = time.perf_counter()
    for _ in range(cycle):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first_rollout = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(timed):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / timed
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")
    trainer.trainable.remove()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds_per_step": seconds, "peak_gib": peak, "size": size, "first_rollout_s": first_rollout}


def estimate(family: str) -> dict[str, float]:
    """Peak GPU memory from sizes: fp16 UNet weights, fp32 LoRA + AdamW, and the activations
    autograd saves for one student pass, measured on the CPU (bf16) at a quarter of the side and
    scaled by the pixel count (memory-efficient attention keeps them linear in pixels), plus 1 GiB for
    the CUDA context and allocator. The text encoders are on the CPU while the UNet trains."""
    size = FAMILIES[family][2]
    models = build(family, torch.bfloat16, torch.device("cpu"), smoke=False, size=size // 4)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            config(out, "bf16", size // 4, False, "leco default"), progress=False, models=models
        )
        weights = sum(p.numel() for p in models.unet.parameters()) * 2 / GIB
        lora = sum(p.numel() for p in trainer.trainable.parameters()) * 4 * 4 / GIB  # weight, grad, 2 moments
        # Autograd saves a frozen layer's weight for its input's gradient: already counted above, and
        # the same whatever the image size, so not an activation to scale with the pixels.
        weights_held = {
            p.untyped_storage().data_ptr()
            for p in [*models.unet.parameters(), *trainer.trainable.parameters()]
        }
        saved = []

        def count(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in weights_held:
                saved.append(tensor.numel() * tensor.element_size())
            return tensor

        samples = trainer.samples.next()
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            trainer.loss(Step(samples, []))
    activations = sum(saved) * 16 / GIB  # 4x the side: 16x the pixels
    return {
        "weights": weights,
        "lora": lora,
        "activations": activations,
        "peak": weights + lora + activations + 1,
    }


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=8,
        help="timed steps per row, in whole rollouts (after one as warm-up)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny widths: the code runs, numbers mean nothing"
    )
    parser.add_argument("--estimate", action="store_true", help="no GPU: estimated peak memory")
    parser.add_argument("--schedules", default=",".join(SCHEDULE_KEYS), help="default, steps4, reference")
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--checkpointing", default="no,yes", help="gradient checkpointing: no, yes")
    parser.add_argument(
        "--transplant",
        action="store_true",
        help="transplant rows instead: SD1.5 and SD2.1-v taught by each other, the teacher offloaded or not",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the student's UNet (the first rollout compiles)"
    )
    parser.add_argument(
        "--budget-s",
        type=seconds,
        default=0,
        help="start no new row after this many seconds (0: every row); the most telling rows run first",
    )
    args = parser.parse_args()
    families = known_names(parser, "--families", args.families, FAMILIES)
    schedules = [SCHEDULE_KEYS[k] for k in known_names(parser, "--schedules", args.schedules, SCHEDULE_KEYS)]
    if args.transplant:
        families = [family for family in families if family in TEACHER_OF]
        if not families:
            parser.error(f"--transplant: a student of {', '.join(TEACHER_OF)} (SDXL shares no latent space)")
        schedules = list(TRANSPLANTS)
    wanted_precisions = known_names(parser, "--precisions", args.precisions, ["fp16", "bf16"])
    checkpointed = [
        c == "yes" for c in known_names(parser, "--checkpointing", args.checkpointing, ["no", "yes"])
    ]
    if args.estimate:
        print("ESTIMATE (no GPU run): peak GiB = UNet fp16 weights + LoRA/AdamW + saved activations + 1")
        print("| model | size | weights | LoRA + optimizer | activations (no checkpointing) | peak |")
        print("|---|---|---|---|---|---|")
        for family in families:
            e = estimate(family)
            print(
                f"| {family} | {FAMILIES[family][2]} | {e['weights']:.2f} | {e['lora']:.3f} | "
                f"{e['activations']:.2f} | {e['peak']:.1f} |",
                flush=True,
            )
        return
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_scale: no CUDA GPU here; use --estimate (sizes) or --smoke (CPU check)")
    name = "CPU (smoke, tiny widths)" if args.smoke else torch.cuda.get_device_name()
    compiled = "; the student's UNet compiled (torch.compile)" if args.compile else ""
    print(f"{name}; {args.steps} timed steps per row{compiled}")
    schedule_column = "teacher's UNet" if args.transplant else "schedule"
    figures = "size | s/step | peak GiB | first rollout s"
    print(f"| model | precision | checkpointing | {schedule_column} | {figures} |")
    print("|---|---|---|---|---|---|---|---|")
    precisions = ["fp16"] if args.smoke else wanted_precisions
    start, skipped = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as out:
        for family, precision, checkpointing, schedule in rows_in_order(
            families, precisions, schedules, checkpointed
        ):
            student = f"{family} taught by {TEACHER_OF[family]}" if args.transplant else family
            cells = f"| {student} | {precision} | {'yes' if checkpointing else 'no'} | {schedule} |"
            if args.budget_s and time.perf_counter() - start > args.budget_s:
                skipped.append(cells)
                continue
            try:
                r = measure(family, precision, checkpointing, schedule, args, out)
            except Exception as error:  # noqa: BLE001 - one row's failure (memory, a kernel) is a result too
                failure = f"{type(error).__name__}: {first_line(error)}"
                print(f"{cells} failed: {failure} | - | - | - |", flush=True)
                gc.collect()  # the failed row's models, before the next row builds its own
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            figures = f"{r['seconds_per_step']:.3f} | {r['peak_gib']:.2f} | {r['first_rollout_s']:.1f}"
            print(f"{cells} {r['size']} | {figures} |", flush=True)
    if skipped:
        print(f"not measured (--budget-s {args.budget_s:g} spent): " + "; ".join(skipped))


Row = tuple[str, str, bool, str]  # family, precision, gradient checkpointing, schedule


def rows_in_order(
    families: list[str],
    precisions: list[str],
    schedules: list[str],
    checkpointed: tuple[bool, ...] | list[bool] = (False, True),
) -> list[Row]:
    """Every row, the ones the README's claims rest on first, so a time budget drops the least
    telling: fp16 before bf16 (the same memory), leco's default and the reference before the
    batched-forward variant, and checkpointing after the plain rows except for SDXL's default,
    whose memory goal assumes it."""
    rows = [
        (family, precision, checkpointing, schedule)
        for family in families
        for precision in precisions
        for checkpointing in checkpointed
        for schedule in schedules
    ]

    def later(row: Row) -> tuple[bool, bool, bool]:
        family, precision, checkpointing, schedule = row
        sdxl_goal = family == "sdxl" and schedule == SCHEDULE_KEYS["default"]
        return precision != "fp16", schedule == SCHEDULE_KEYS["steps4"], checkpointing and not sdxl_goal

    return sorted(rows, key=later)  # stable: families keep their order within a rank


if __name__ == "__main__":
    main()

"""The model cards (README.md) of the two bundled models, written from their build reports."""

from __future__ import annotations

from pathlib import Path

from leco.ink_digits import GUIDANCE, INK_DIGITS, STEPS
from leco.ink_digits.data import ALL_INKS, EMPTY_CAPTION_RATE, MODEL_INKS, PHRASING_NAMES, SIZE, caption
from leco.ink_digits.quality import format_quality
from leco.ink_digits.tokenizer import MAX_LENGTH
from leco.ink_digits.training import LATENT_SIZE, WARMUP_STEPS

LATENT = f"4x{LATENT_SIZE}x{LATENT_SIZE}"
UNSEEN = tuple(ink for ink in ALL_INKS if ink not in MODEL_INKS[INK_DIGITS])
EPSILON_OBJECTIVE = "epsilon target, min-SNR-{g} loss weighting (min(snr, {g}) / snr)"
V_OBJECTIVE = (
    "v target (v = sqrt(a)·noise - sqrt(1-a)·x0), "
    "min-SNR-{g} loss weighting adapted to v (min(snr, {g}) / (snr + 1))"
)


def write_ink_digits_card(out: Path, report: dict) -> None:
    r, n = report["recipe"], report["parameters"]
    inks = report["inks"]
    table = [
        *_table_head(),
        "| tokenizer | CLIPTokenizer | - | own vocabulary, a token per caption word of both ink-digits "
        f"models; {MAX_LENGTH} tokens, padded with the end-of-text token as SD 1.x |",
        f"| text encoder | CLIPTextModel | {n['text_encoder']:,} | {r['text_layers']} layers of width "
        f"{r['text_hidden']}, quick_gelu; the UNet reads last_hidden_state, as in SD 1.x |",
        f"| UNet | UNet2DConditionModel | {n['unet']:,} | channels {tuple(r['unet_channels'])}, "
        f"{r['layers_per_block']} layer per block, {_blocks(r)}, 4 heads, 1x1-conv projections, on {LATENT} "
        "latents |",
        f"| VAE | AutoencoderKL | {n['vae']:,} | {SIZE}x{SIZE} RGB <-> {LATENT} latents, "
        f"channels {tuple(r['vae_channels'])}; trained on all {len(ALL_INKS)} inks |",
        "| scheduler | DDIMScheduler | - | SD 1.x betas (scaled linear 0.00085..0.012, 1000 steps), "
        "epsilon prediction, trailing timestep spacing |",
    ]
    card = f"""{_front_matter()}# ink-digits

A small but real text-to-image model in the Stable Diffusion 1.x layout, built by leco as its
quick-start and measuring model. It is trained on scikit-learn's 1,797 real handwritten 8x8 digits,
upsampled to {SIZE}x{SIZE} and drawn in {len(inks)} inks ({", ".join(inks)}) on white paper,
so it knows objects (the digit) and styles (the ink): a LECO erasure, and what it leaves alone, can be
measured on a laptop CPU.

Its tokenizer also has the words {" and ".join(UNSEEN)} (one token each), which it has never seen
drawn, as a real model has rare words. Its VAE and judge know all {len(ALL_INKS)} inks: its sibling
`ink-digits-2` (SD 2.x layout, v-prediction, all {len(ALL_INKS)} inks) uses the same VAE and vocabulary, so
the two models share one latent space.

{_loading("StableDiffusionPipeline", "SD 1.x")}

## Architecture

{chr(10).join(table)}

{_judge(report)}

## Training recipe

- Captions, one phrasing drawn uniformly per sample: {_captions()};
  {EMPTY_CAPTION_RATE:.0%} empty, for classifier-free guidance. Only the {len(inks)} inks above.
- VAE: {r["vae_steps"]} steps of batch 64 on all {len(ALL_INKS)} inks, MSE + 1e-5 KL; latents scaled to
  unit variance.
{_diffusion_recipe(r, EPSILON_OBJECTIVE)}
{_build_time(report, "python -m leco.ink_digits build --model ink-digits")}

{_vae_table(report)}

{_quality(report)}
"""
    (out / "README.md").write_text(card)


def write_ink_digits_2_card(out: Path, report: dict) -> None:
    r, n = report["recipe"], report["parameters"]
    inks = report["inks"]
    saved, trained = r["text_layers"], r["text_layers"] + 1
    heads = ", ".join(str(h) for h in r["attention_heads"])
    table = [
        *_table_head(),
        "| tokenizer | CLIPTokenizer | - | the vocabulary of ink-digits (same vocab.json, merges.txt); "
        f'{MAX_LENGTH} tokens, padded with "!" (id 0) as OpenCLIP / SD 2.x |',
        f"| text encoder | CLIPTextModel | {n['text_encoder']:,} | {saved} layers of width "
        f"{r['text_hidden']}, {r['text_heads']} heads, gelu (SD 2.x kind); trained as {trained} layers read "
        "at the penultimate layer through the final layer norm, saved without the last layer as SD 2.x's "
        "conversion does, so last_hidden_state is what training read |",
        f"| UNet | UNet2DConditionModel | {n['unet']:,} | channels {tuple(r['unet_channels'])}, "
        f"{r['layers_per_block']} layer per block, {_blocks(r)}, heads per block [{heads}], linear "
        f"projections (use_linear_projection), upcast_attention as SD 2.x-v, cross-attention width "
        f"{r['text_hidden']}, on {LATENT} latents |",
        f"| VAE | AutoencoderKL | {n['vae']:,} | ink-digits' VAE, byte for byte "
        f"({SIZE}x{SIZE} RGB <-> {LATENT}) |",
        "| scheduler | DDIMScheduler | - | SD 1.x/2.x betas (scaled linear 0.00085..0.012, 1000 steps), "
        "**v-prediction**, trailing timestep spacing |",
    ]
    card = f"""{_front_matter()}# ink-digits-2

The Stable Diffusion 2.x (v-prediction) sibling of `ink-digits`, built by leco. Same data: scikit-learn's
1,797 real handwritten 8x8 digits, upsampled to {SIZE}x{SIZE}, here drawn in all {len(inks)} inks
({", ".join(inks)}). It shares ink-digits' VAE (identical weights), judge and vocabulary, so the two
models live in one latent space: a concept one model knows (e.g. {" or ".join(UNSEEN)}, which
ink-digits has only as words) can be taught to the other. Its text width ({r["text_hidden"]}) differs
from ink-digits' on purpose.

leco loads it by the name `ink-digits-2` and detects it as `sd2-v`.

{_loading("StableDiffusionPipeline", "SD 2.x")}

## Architecture

{chr(10).join(table)}

{_judge(report)}

## Training recipe

- Captions, one phrasing drawn uniformly per sample: {_captions()};
  {EMPTY_CAPTION_RATE:.0%} empty, for classifier-free guidance. All {len(inks)} inks.
- VAE: not trained; copied from the ink-digits build (with `judge.safetensors` and the vocabulary).
{_diffusion_recipe(r, V_OBJECTIVE)}
{_build_time(report, "python -m leco.ink_digits build --model ink-digits-2")}

{_vae_table(report)}

{_quality(report)}
"""
    (out / "README.md").write_text(card)


def _front_matter() -> str:
    # The Hugging Face card metadata for the widget's sampling settings; leco reads it too.
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
inference:
  parameters:
    num_inference_steps: {STEPS}
    guidance_scale: {GUIDANCE:g}
---

"""


def _table_head() -> list[str]:
    return ["| part | class | parameters | shape |", "|---|---|---|---|"]


def _blocks(recipe: dict) -> str:
    return " / ".join([*recipe["down_blocks"], "UNetMidBlock2DCrossAttn", *recipe["up_blocks"]])


def _captions() -> str:
    return "; ".join(f'"{caption(7, "red", p)}" ({p})' for p in PHRASING_NAMES)


def _loading(pipeline: str, family: str) -> str:
    return f"""Load it like any {family} folder (offline, nothing to download):

```python
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
image = pipe("a digit seven in red ink", guidance_scale={GUIDANCE:g}, num_inference_steps={STEPS}).images[0]
```

**Recommended sampling: guidance {GUIDANCE:g}, {STEPS} DDIM steps, {SIZE}x{SIZE} pixels**
(the default size)."""


def _judge(report: dict) -> str:
    accuracy = report.get("judge_held_out_accuracy")
    trained = f" ({accuracy:.1%} held-out accuracy)" if accuracy is not None else " by the ink-digits build"
    return f"""The judge (`judge.safetensors`, not part of the pipeline; the same file in both ink-digits
models) is a digit CNN of {report["parameters"]["judge"]:,} parameters trained on the real digits{trained},
read after stripping the ink; the ink is the one of all {len(ALL_INKS)} whose paper-to-ink colour line fits
the inked pixels best."""


def _diffusion_recipe(r: dict, objective: str) -> str:
    objective = objective.format(g=f"{r['min_snr']:g}")
    return f"""- Text encoder and UNet together, from scratch: {r["unet_steps"]} steps of batch {r["batch"]},
  AdamW lr {r["lr"]:g} ({WARMUP_STEPS} warm-up steps, cosine decay), {objective},
  EMA {r["ema"]}; seed {r["seed"]}."""


def _build_time(report: dict, command: str) -> str:
    r = report["recipe"]
    return f"""- `{command}` took {report["wall_seconds"] / 60:.0f} minutes
  ({report["cpu_seconds"] / 60:.0f} CPU minutes) on {r["threads"]} threads, torch {report["torch"]};
  the same machine and thread count give the same weights."""


def _vae_table(report: dict) -> str:
    vae = report["vae_reconstruction"]
    lines = [
        "## VAE reconstructions",
        "",
        "Every fifth digit in every ink, encoded and decoded; the judge reads the decoded images:",
        "",
        "| ink | mean abs error (/255) | digit read right | ink read right |",
        "|---|---|---|---|",
    ]
    for ink, values in [*vae["per_ink"].items(), ("all", vae)]:
        lines.append(
            f"| {ink} | {values['mean_abs_error_255']:.1f} | {values['digit_accuracy']:.1%} | "
            f"{values['ink_accuracy']:.1%} |"
        )
    return "\n".join(lines)


def _quality(report: dict) -> str:
    if "quality" not in report:
        return "## Measured quality\n\n(not measured)"
    seeds = report["sampling"]["seeds"]
    return f"""## Measured quality

Every digit x every ink it was trained on x {seeds} seeds per phrasing, generated with the diffusers
pipeline at the recommended settings and read by the judge; a phrasing is judged only on what it
names. Produced by `python -m leco.ink_digits quality --model {report["model"]}` (the build's last step):

{format_quality(report["quality"])}"""

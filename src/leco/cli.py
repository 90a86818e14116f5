"""The `leco` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from leco._version import __version__
from leco.errors import LecoError, Terminated, is_main_process, process_count, stopped_exit_code, warn
from leco.launcher import (
    LAUNCHED_BY_LECO,
    check_process_count,
    first_to_report_error,
    launch_processes,
    tell_launcher_ready,
)

if TYPE_CHECKING:  # the command loads torch and the models only once its arguments are read
    import torch

    from leco.models import LoadedModels

NUMERIC_LIST_OPTIONS = ("--strengths",)

TRAIN_DESCRIPTION = """\
Train a LoRA from a config YAML (the reference LECO config.yaml + prompts.yaml load unchanged).

example, on the bundled model ink-digits (seconds on a laptop CPU):
  leco train examples/ink-digits/erase_seven.yaml

A config names the model and a prompts file; the prompts file says what to erase or enhance:
  config.yaml:  {prompts_file: prompts.yaml, pretrained_model: {name_or_path: ink-digits}}
  prompts.yaml: [{target: "a digit seven", action: erase}]
More in examples/ink-digits/ (erase, enhance, slider); every key is in the README's config reference."""

GENERATE_DESCRIPTION = """\
Images of each prompt at each LoRA strength and seed, and a labelled grid (strengths as columns).

example, on the bundled model ink-digits, after `leco train examples/ink-digits/erase_seven.yaml`:
  leco generate --model ink-digits --lora output/ink-digits/no_seven_last.safetensors \\
      --prompt "a digit seven in red ink" --strengths -1,0,1 --seeds 0-1 --out grid_seven

Unset --steps and --guidance take the model's recommended values (ink-digits: 25 steps, guidance 3;
a model folder may declare its own in its README.md), else 30 steps at guidance 7."""

EVAL_DESCRIPTION = """\
How much of a concept a LoRA erased, and how much of everything else it left alone.

example, on the bundled model ink-digits, after `leco train examples/ink-digits/erase_seven.yaml`:
  leco eval --model ink-digits --lora output/ink-digits/no_seven_last.safetensors \\
      --spec examples/ink-digits/erase_seven_eval.yaml

A spec lists prompts whose concept should go (erase), stay (keep) or appear (enhance):
  detector: ink-digits
  erase: [{prompt: "a digit seven in red ink", concept: "digit:7"}]
  keep: all    # every other concept the detector knows (ink-digits: every digit and ink)
More in examples/ink-digits/*_eval.yaml; unset steps/guidance take the model's recommended values.
Repeat --lora to judge several LoRAs (e.g. training seeds) on the same images; the summary names
the worst prompt per measure and the worst LoRA. A negative embedding given as --lora is judged
with its token added to the negative prompt (strength 1) against without it (strength 0)."""


# Everything str.splitlines breaks a line at: a user's word carrying one must not split our one line.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def _escape_line_breaks(text: str) -> str:
    return "".join(char.encode("unicode_escape").decode() if char in _LINE_BREAKS else char for char in text)


def _error_message(error: LecoError, words: Sequence[str]) -> str:
    """The error as printed: the user's own words shown escaped where they hold line breaks."""
    message = str(error)
    for word in words:
        if any(char in _LINE_BREAKS for char in word):
            message = message.replace(word, _escape_line_breaks(word))
    return "\n".join(_escape_line_breaks(line) for line in message.split("\n"))


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in leco's style: one line naming the option, exit 2.
    Options are taken only as spelled out: an abbreviation (--seed for --seeds) would slip past the
    check for an option given twice, and one of them would be dropped without a word."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:
        one_line = _escape_line_breaks(" ".join(message.split("\n")))
        self.exit(2, f"{self.prog}: error: {one_line} (see {self.prog} --help)\n")


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a leco parser: its LecoError becomes argparse's one-line error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except LecoError as error:  # argparse names the option itself: drop our "--option: " prefix
            raise argparse.ArgumentTypeError(re.sub(r"^--[\w-]+: ", "", str(error))) from None

    convert.__name__ = parse.__name__
    return convert


def _steps(text: str) -> int:
    from leco.generate import MAX_SAMPLING_STEPS

    steps = _number(text, int, "a whole number")
    if steps < 1:
        raise argparse.ArgumentTypeError(f"{steps}: sampling needs at least 1 step")
    if steps > MAX_SAMPLING_STEPS:
        raise argparse.ArgumentTypeError(
            f"{steps}: at most {MAX_SAMPLING_STEPS} steps (one per training timestep)"
        )
    return steps


def _batch_size(text: str) -> int:
    size = _number(text, int, "a whole number")
    if size < 1:
        raise argparse.ArgumentTypeError(f"{size}: a pipeline call makes at least 1 image")
    return size


def _images_per_prompt(text: str) -> int:
    from leco.generate import MAX_SEEDS

    count = _number(text, int, "a whole number")
    if not 1 <= count <= MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"{count}: give 1 to {MAX_SEEDS} images a prompt and strength")
    return count


CLIP_SKIP_HELP = (
    "text-encoder layers back from the last, as A1111's clip skip (2: the penultimate layer); "
    "default: what the LoRA was trained with (its ss_clip_skip), else 1"
)


def _clip_skip(text: str) -> int:
    skip = _number(text, int, "a whole number")
    if skip < 1:
        raise argparse.ArgumentTypeError(f"{skip}: clip skip counts from 1 (the last layer), as A1111's")
    return skip


def _state_folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "empty; give the *_state folder a run saved (its path is printed at the end)"
        )
    return text


def _guidance(text: str) -> float:
    from leco.config import MAX_GUIDANCE
    from leco.generate import is_guidance

    guidance = _number(text, float, "a number")
    if not is_guidance(guidance):
        raise argparse.ArgumentTypeError(
            f"{text}: the guidance scale is a number from 0 to {MAX_GUIDANCE:g}, e.g. 3 or 7.5"
        )
    return guidance


def _size(text: str) -> int:
    from leco.config import MAX_SIDE
    from leco.generate import is_image_side

    pixels = _number(text, int, "a whole number of pixels")
    if not is_image_side(pixels):
        raise argparse.ArgumentTypeError(
            f"{pixels}: image sizes are positive multiples of 8 (diffusers needs them) up to {MAX_SIDE}, "
            "e.g. 16, 512, 1024"
        )
    return pixels


def _number(text: str, kind: type, what: str) -> Any:
    try:
        if "_" in text:  # int() and float() read Python's digit separator: "1_0" would be 10
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _named(text: str) -> str:
    """A path option's value: Path("") would be the working directory, never what was meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; name a file or folder")
    return text


class _Default(str):
    """An option's default path: argparse checks it as it checks a given one, and a problem with it
    must say the user gave none (the fix is to give one)."""


def _said_of_defaults(check: Callable[[str], Path]) -> Callable[[str], Path]:
    @functools.wraps(check)
    def checked(text: str) -> Path:
        try:
            return check(text)
        except argparse.ArgumentTypeError as error:
            if not isinstance(text, _Default):
                raise
            raise argparse.ArgumentTypeError(f"(not given: the default, ./{text}) {error}") from None

    return checked


@_said_of_defaults
def _output_folder(text: str) -> Path:
    """A folder leco can create or write into (checked now, not after minutes of loading)."""
    path = Path(_named(text)).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file; name a folder for the images")
    _check_writable(path)
    return path


@_said_of_defaults
def _output_file(text: str) -> Path:
    from leco.files import is_eval_report

    path = Path(_named(text)).expanduser()
    # "reports/" names a folder (Path drops the slash): a report file called "reports" is not meant
    if path.is_dir() or text.rstrip().endswith(("/", os.sep)):
        what = "is a folder" if path.is_dir() else "names a folder (it ends in a slash)"
        raise argparse.ArgumentTypeError(f"{text} {what}; name the report file, e.g. {path / 'report.json'}")
    if path.exists() and not is_eval_report(path):
        raise argparse.ArgumentTypeError(
            f"{path} exists and is not a leco eval report, which is all leco replaces; name a new file"
        )
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """`path` exists and is writable, or the nearest existing folder above it is."""
    from leco.files import nearest_existing

    try:
        existing = nearest_existing(path)
    except LecoError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if existing != path.absolute() and not existing.is_dir():
        raise argparse.ArgumentTypeError(
            f"{existing} is a file, so {path} cannot be created; choose another path"
        )
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(
            f"{existing} is not writable (permission denied); choose another path"
        )
    folder = existing if existing.is_dir() else existing.parent
    try:  # os.access answers yes to root everywhere; a file made and removed is the real test
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"{folder} takes no new files ({error.strerror or type(error).__name__}); choose another path"
        ) from None


def _lora_file(text: str) -> str:
    """generate's --lora: a LoRA file (its strengths are --strengths)."""
    _refuse_strength_suffix(_named(text), "generate draws each image at --strengths (e.g. --strengths 0.5)")
    return _read_lora(text)


def _read_lora(text: str) -> str:
    from leco.lora_files import read_lora_header

    return str(_checked(read_lora_header)(text).path)


def _refuse_strength_suffix(text: str, where_strengths_go: str) -> None:
    """FILE:0.5, as merge and A1111's <lora:name:0.5> take it, where the command takes the file alone."""
    from leco.config import typed_float

    path, colon, strength = text.rpartition(":")
    if colon and not Path(text).exists() and Path(path).is_file():
        try:
            typed_float(strength)
        except ValueError:  # "a.safetensors:abc": the file is there, what follows it is nothing
            raise argparse.ArgumentTypeError(
                f"no file {text!r}; {':' + strength!r} after {path} is not a strength (and this command "
                f"takes none after the file); give --lora {path}"
            ) from None
        raise argparse.ArgumentTypeError(
            f"{text}: no strength after the file here; {where_strengths_go} (give --lora {path})"
        )


def _lora_or_embedding_file(text: str) -> str:
    """eval's --lora: a LoRA, or a negative embedding (judged with its token in the negative prompt)."""
    from leco.embedding_files import is_embedding_file, read_embedding

    if is_embedding_file(_named(text)):
        return str(_checked(read_embedding)(text).path)
    _refuse_strength_suffix(text, "eval judges each LoRA at the spec's strengths: [...]")
    return _read_lora(text)


def _sampler(text: str) -> str:
    from leco.samplers import sampler_name, unknown_sampler

    name = sampler_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(unknown_sampler(text))
    return name


def _seeds(text: str) -> list[int]:
    from leco.generate import parse_seeds

    return _checked(parse_seeds)(text)


def _strengths(text: str) -> list[float]:
    from leco.generate import parse_strengths

    return _checked(parse_strengths)(text)


MERGE_DESCRIPTION = """\
Bake LoRAs at given strengths into a model and save it: X.safetensors is one checkpoint in the
original layout (A1111, ComfyUI, diffusers from_single_file); any other --out is a diffusers folder.

example, on the bundled model ink-digits, after `leco train examples/ink-digits/erase_seven.yaml`:
  leco merge --model ink-digits --lora output/ink-digits/no_seven_last.safetensors:1 \\
      --out ink-digits-no-seven

Strength follows the colon (default 1; negative inverts the edit); repeat --lora to stack LoRAs."""

CONVERT_DESCRIPTION = """\
Rewrite a LoRA of p1atdev/LECO (.safetensors, no metadata), rohitgandikota/sliders (.pt) or
diffusers' save_lora_weights (PEFT keys) as a kohya file with the metadata A1111 needs; SDXL layer
names become the SGM names A1111 expects.

examples:
  leco convert van_gogh_last.safetensors --out van_gogh.safetensors --family sd1
  leco convert age_slider_last.pt --out age_slider.safetensors --model sd_xl_base_1.0.safetensors
  leco convert sd2_lora.safetensors --out sd2_lora_kohya.safetensors --family sd2 --sd2-proj 4d"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leco",
        description="Train LoRAs that erase, weaken, strengthen or re-map concepts in Stable Diffusion "
        "models, from the model's own knowledge (LECO / ESD). No training images needed.",
    )
    parser.add_argument("--version", action="version", version=f"leco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_train_command(commands)
    _add_generate_command(commands)
    _add_evaluate_command(commands)
    _add_merge_command(commands)
    _add_convert_command(commands)
    parser.set_defaults(commands=commands.choices)  # for an unknown option, the command's own error line
    return parser


def _add_train_command(commands: Any) -> None:
    train = commands.add_parser(
        "train",
        help="train a LoRA from a config YAML",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", nargs="?", help="config YAML (the reference LECO format)")
    train.add_argument("--config_file", help="the same, spelled as the reference tool spells it")
    train.add_argument(
        "--prompts_file",
        "--prompts-file",
        metavar="FILE",
        help="the prompts file (YAML, or a kohya train_leco TOML), in place of the config's; as kohya's "
        "train_leco takes it next to its --config_file",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change one setting of the config without editing it, the value read as YAML "
        "(e.g. --set train.seed=1 --set save.name=no_seven_s1); repeatable; a --resume needs the same",
    )
    train.add_argument(
        "--resume", metavar="DIR", type=_state_folder, help="continue from the *_state folder a run saved"
    )
    train.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="data-parallel training on N processes (one per GPU; gloo on the CPU), through torchrun; "
        "the same as `accelerate launch --num_processes N -m leco train ...` (default 1)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run of the same save.name in save.path (its step files and state)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    train.set_defaults(run=run_train)


def _add_generate_command(commands: Any) -> None:
    generate = commands.add_parser(
        "generate",
        help="images at several LoRA strengths, and a labelled grid",
        description=GENERATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument(
        "--model", required=True, help="repo id, diffusers folder, .safetensors file or ink-digits"
    )
    generate.add_argument(
        "--lora",
        type=_lora_file,
        action="append",
        help="LoRA .safetensors (kohya format), one; omit for the plain model",
    )
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument(
        "--strengths",
        type=_strengths,
        help="LoRA strengths, e.g. -1,0,1 (the default with --lora; without one only 0 is drawn)",
    )
    generate.add_argument("--seeds", type=_seeds, default="0", help="e.g. 0-7 or 1,4,9 (default 0)")
    generate.add_argument(
        "--steps", type=_steps, help="sampling steps (default: the model's recommended, else 30)"
    )
    generate.add_argument(
        "--guidance", type=_guidance, help="CFG scale (default: the model's recommended, else 7)"
    )
    generate.add_argument(
        "--height", type=_size, help="image height in pixels (default: the model's native size)"
    )
    generate.add_argument(
        "--width", type=_size, help="image width in pixels (default: the model's native size)"
    )
    generate.add_argument("--negative", default="", help="negative prompt")
    generate.add_argument(
        "--embedding",
        action="append",
        type=_named,
        default=[],
        metavar="FILE[:TOKEN]",
        help="textual-inversion embedding (kohya/leco .safetensors, A1111 .pt) to use in prompts as TOKEN "
        "(default: its leco.token metadata, else the file name); repeatable",
    )
    generate.add_argument(
        "--batch-size", type=_batch_size, help="images per pipeline call (default: by size, 8 at 512x512)"
    )
    generate.add_argument("--clip-skip", type=_clip_skip, help=CLIP_SKIP_HELP)
    generate.add_argument(
        "--sampler",
        type=_sampler,
        default="model",
        help="model (its own scheduler), ddim, ddpm, euler, euler_a, dpm++ (DPM++ 2M), dpm++_sde, "
        "dpm++_sde_heun, dpm++_3m_sde, deis, dpm2, dpm2_a, heun, lms, lcm, plms, unipc, or A1111's and "
        "ComfyUI's names ('DPM++ 2M Karras', dpmpp_2m); ' Karras' appended: Karras sigmas",
    )
    generate.add_argument(
        "--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda:N"
    )
    generate.add_argument("--allow-pickle", action="store_true", help="allow loading a .ckpt model")
    generate.add_argument(
        "--out",
        type=_output_folder,
        default=_Default("generated"),
        help="output folder (default ./generated)",
    )
    generate.add_argument(
        "--overwrite", action="store_true", help="replace images and the grid an earlier run left in --out"
    )
    generate.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    generate.set_defaults(run=run_generate)


def _add_evaluate_command(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="how much of the concept is gone, how much else is unchanged",
        description=EVAL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument(
        "--model", required=True, help="repo id, diffusers folder, .safetensors file or ink-digits"
    )
    evaluate.add_argument(
        "--lora",
        type=_lora_or_embedding_file,
        action="append",
        default=[],
        help="LoRA to judge (omit to judge the plain model); repeat to judge several on the same seeds; "
        "a negative embedding is judged with its token added to the negative prompt",
    )
    evaluate.add_argument(
        "--spec", type=_named, required=True, help="eval spec YAML (prompts, concepts, detector)"
    )
    evaluate.add_argument("--negative", help="negative prompt (overrides the spec's negative_prompt:)")
    evaluate.add_argument(
        "--embedding",
        action="append",
        type=_named,
        default=[],
        metavar="FILE[:TOKEN]",
        help="textual-inversion embedding the prompts may use, as for generate; repeatable",
    )
    evaluate.add_argument(
        "--images-per-prompt",
        type=_images_per_prompt,
        metavar="N",
        help="images of each prompt at each strength, on seeds counting up from the spec's (overrides "
        "the spec's images_per_prompt:; 4 for a quick look, 16 for firm figures)",
    )
    evaluate.add_argument(
        "--batch-size", type=_batch_size, help="images per pipeline call (overrides the spec's batch_size:)"
    )
    evaluate.add_argument("--clip-skip", type=_clip_skip, help=CLIP_SKIP_HELP + " (overrides the spec's)")
    evaluate.add_argument(
        "--all-rows", action="store_true", help="print every kept prompt, not only the worst ones"
    )
    evaluate.add_argument(
        "--out",
        type=_output_file,
        default=_Default("eval_report.json"),
        help="JSON report (default ./eval_report.json)",
    )
    evaluate.add_argument(
        "--images", type=_output_folder, help="also save every generated image into this folder"
    )
    evaluate.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the report (--out) and images (--images) an earlier eval left",
    )
    evaluate.add_argument(
        "--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda:N"
    )
    evaluate.add_argument("--allow-pickle", action="store_true", help="allow loading a .ckpt model")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    evaluate.set_defaults(run=run_eval)


def _add_merge_command(commands: Any) -> None:
    merge = commands.add_parser(
        "merge",
        help="bake LoRAs into a model: a single-file checkpoint or a folder",
        description=MERGE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("--model", required=True, help="repo id, diffusers folder, .safetensors or ink-digits")
    merge.add_argument(
        "--lora",
        action="append",
        type=_named,
        required=True,
        metavar="FILE[:STRENGTH]",
        help="LoRA to bake in at STRENGTH (default 1, negative inverts it); repeat to stack several",
    )
    merge.add_argument(
        "--out",
        type=_named,
        required=True,
        help="X.safetensors: one checkpoint in the original layout (A1111, ComfyUI); else a diffusers folder",
    )
    merge.add_argument("--precision", default="fp16", help="saved weights: fp16 (default), bf16 or fp32")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument("--allow-pickle", action="store_true", help="allow loading a .ckpt model")
    _add_no_progress_for_scripts(merge)
    merge.set_defaults(run=run_merge)


def _add_convert_command(commands: Any) -> None:
    convert = commands.add_parser(
        "convert",
        help="LoRAs of other trainers (LECO, sliders) -> kohya files",
        description=CONVERT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "source", type=_named, metavar="IN", help="LoRA .safetensors or .pt (a plain state dict)"
    )
    convert.add_argument(
        "--out", type=_named, required=True, help="output .safetensors (kohya format with metadata)"
    )
    convert.add_argument("--model", help="the model the LoRA is for (its configs tell the family)")
    convert.add_argument("--family", help="sd1, sd2, sd2-v or sdxl, instead of --model (no weights needed)")
    convert.add_argument(
        "--sd2-proj",
        default="2d",
        choices=["2d", "4d"],
        help="SD2 proj_in/proj_out tensors: 2d (diffusers, A1111, ComfyUI; default) or 4d (kohya's scripts)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_no_progress_for_scripts(convert)
    convert.set_defaults(run=run_convert)


def _add_no_progress_for_scripts(command: argparse.ArgumentParser) -> None:
    # A script may pass --no-progress to every leco command; these draw no bar to turn off.
    command.add_argument("--no-progress", action="store_true", help="accepted as train's (no bar is drawn)")


def run_train(args: argparse.Namespace) -> int:
    from leco.checkpoints import StopRequest

    StopRequest.second_signal_ends_process = True  # even in a minutes-long step (a command, not a notebook)
    try:
        return _train_command(args)
    finally:  # main() called from Python (tests, scripts) leaves leco.train as it was
        StopRequest.second_signal_ends_process = False


def _train_command(args: argparse.Namespace) -> int:
    from leco import train
    from leco.formats.origins import in_config_file

    config = args.config or args.config_file
    if config is None:
        raise LecoError("train: no config given; run leco train CONFIG.yaml (or --config_file CONFIG.yaml)")
    if args.config and args.config_file:
        raise LecoError("train: give the config once: leco train CONFIG.yaml (or --config_file CONFIG.yaml)")
    if (
        args.config_file
        and not Path(args.config_file).exists()
        and Path(args.config_file + ".toml").is_file()
    ):
        config = args.config_file + ".toml"  # kohya's train_util adds it to a --config_file without one
    if args.resume and args.overwrite:
        raise LecoError("train: --resume continues a run and --overwrite replaces it; give one of them")
    if is_main_process() and not os.environ.get(LAUNCHED_BY_LECO):  # said once, not by each process
        _warn_of_repeated_sets(args.set)
    if args.num_processes < 1:
        raise LecoError(f"--num-processes: {args.num_processes} is not a number of processes; use 1 or more")
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from leco.checkpoints import check_before_loading, read_state

        if args.resume and not Path(args.resume).exists():
            raise LecoError(f"--resume: {args.resume} not found; pass the *_state folder a run saved")
        check_process_count(args.num_processes)  # before anything is made on disk
        try:  # its errors as one line here, not once per process
            loaded = _changed_config(config, args.prompts_file, args.set)
            check_before_loading(loaded, Path(args.resume) if args.resume else None, args.overwrite)
            if args.resume:  # a state of another run, config or process count
                read_state(args.resume, loaded.to_json(), args.num_processes)
        except LecoError as error:
            raise LecoError(in_config_file(config, str(error), args.set)) from None
        if loaded.train.method != "closed_form":
            return launch_processes(args.num_processes, args.words)
        warn(
            f"--num-processes {args.num_processes}: a closed-form edit is one solve; it runs in this process"
        )
    try:
        result = train(
            _changed_config(config, args.prompts_file, args.set) if args.set else config,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            prompts_file=None if args.set else args.prompts_file,
        )
    except LecoError as error:  # found once models are loaded: a key of the config, named with its file
        raise LecoError(in_config_file(config, str(error), args.set)) from None
    # Started by --num-processes: torchrun reads 130 as a failed process (and prints a traceback);
    # the leco process that started it reports the interruption instead.
    interrupted_code = 0 if os.environ.get(LAUNCHED_BY_LECO) else stopped_exit_code(result.stopped_by)
    if not is_main_process():  # a data-parallel process that is not the main one
        return interrupted_code if result.interrupted else 0
    if result.interrupted:
        processes = process_count()  # a resume needs as many
        again = f" --num-processes {processes}" if processes > 1 else ""
        print(f"interrupted after step {result.steps}; saved {result.path}")
        prompts = f" --prompts_file {shlex.quote(str(args.prompts_file))}" if args.prompts_file else ""
        changes = "".join(f" --set {shlex.quote(change)}" for change in args.set)
        state = shlex.quote(str(result.state))  # a path with spaces pastes as one argument
        print(
            f"continue with: leco train {shlex.quote(str(config))}{prompts}{changes} --resume {state}{again}"
        )
        return interrupted_code
    done = "closed-form edit" if result.state is None else f"{result.steps} steps"
    print(f"done: {done}; saved {result.path}")
    return 0


def _changed_config(config: str, prompts_file: str | None, changes: list[str]) -> Any:
    """The config file loaded (with --prompts_file) and changed by --set."""
    from leco.config import apply_overrides, load_config

    loaded = load_config(config, prompts_file)
    apply_overrides(loaded, changes)
    return loaded


# A problem with a config key, found after loading (the file is named when the config is read).
def load_for_images(args: argparse.Namespace) -> tuple[LoadedModels, torch.device]:
    import torch

    from leco.config import PretrainedModelConfig
    from leco.models import CLI_OPTION_NAMES, load_models, pick_device

    device = pick_device(args.device, option="--device")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    spec = PretrainedModelConfig(name_or_path=args.model, allow_pickle=args.allow_pickle)
    return load_models(spec, dtype=dtype, with_vae=True, names=CLI_OPTION_NAMES), device


def run_eval(args: argparse.Namespace) -> int:
    from leco.embedding_files import check_embedding_options
    from leco.evaluate import check_detector, evaluate, format_report, load_spec, write_report
    from leco.files import holds_or_is
    from leco.models import model_name

    # The report is written last, where the images would be: refused before any image is drawn.
    if args.images is not None and (holds_or_is(args.out, args.images) or holds_or_is(args.images, args.out)):
        raise LecoError(
            f"--out: {args.out} is the --images folder {args.images}, inside it or above it; name a report "
            "file outside it, e.g. eval_report.json"
        )
    if Path(args.out).exists() and not args.overwrite:  # checked now, not after minutes of images
        raise LecoError(f"--out: {args.out} holds an earlier eval's report; pass --overwrite to replace it")
    spec = load_spec(args.spec)
    if args.negative is not None:
        spec.negative_prompt = args.negative
    spec.batch_size = args.batch_size or spec.batch_size
    spec.images_per_prompt = args.images_per_prompt or spec.images_per_prompt
    if args.clip_skip:
        spec.clip_skip, spec._clip_skip_option = args.clip_skip, "--clip-skip"
    spec_texts = [spec.negative_prompt, *(p.prompt for p in (*spec.erase, *spec.keep, *spec.enhance))]
    args.embedding = check_embedding_options(args.embedding, spec_texts, args.lora or ())
    check_detector(spec)  # a missing package or a typo in a concept, before minutes of loading
    models, device = load_for_images(args)
    report = evaluate(
        models,
        args.lora,
        spec,
        device,
        image_dir=args.images,
        progress=not args.no_progress,
        embeddings=args.embedding,
        overwrite=args.overwrite,
        model_name=model_name(args.model),
    )
    try:  # first: the minutes of work are kept whatever printing does
        written = write_report(report, args.out)
    except LecoError as error:  # another file took --out during the eval (checked free at the start)
        written = write_report(report, _free_name(args.out))
        warn(f"--out: {error}; the report was written to {written} instead")
    print(format_report(report, all_rows=args.all_rows))
    print(f"report: {written}")
    for note in report["notes"]:
        warn(note)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from leco.embedding_files import check_embedding_options
    from leco.generate import (
        refuse_earlier_files,
        requests_for,
        run_generation,
        sampling_settings,
        warn_of_other_images,
    )
    from leco.models import model_name

    if args.lora and len(args.lora) > 1:
        raise LecoError(
            "--lora: given twice; generate applies one LoRA (bake several into a model with leco merge, or "
            "judge each with leco eval --lora A --lora B)"
        )
    args.lora = args.lora[0] if args.lora else None
    if args.lora is None and args.strengths not in (None, [0.0]):
        raise LecoError("--strengths: without --lora every strength draws the same image; add --lora FILE")
    strengths = args.strengths or ([-1.0, 0.0, 1.0] if args.lora else [0.0])
    prompts = list(dict.fromkeys(args.prompt))  # one file per prompt, strength and seed
    for repeated in {p for p in args.prompt if args.prompt.count(p) > 1}:
        warn(f"--prompt {repeated!r} is given {args.prompt.count(repeated)} times; it is drawn once")
    requests = requests_for(prompts, strengths, args.seeds)
    refuse_earlier_files(requests, args.out, args.overwrite)  # before minutes of loading; and again later
    if args.overwrite:
        warn_of_other_images(requests, args.out)
    args.embedding = check_embedding_options(args.embedding, [*args.prompt, args.negative or ""])
    models, device = load_for_images(args)
    settings = sampling_settings(
        models,
        args.lora,
        args.embedding,
        steps=args.steps,
        guidance=args.guidance,
        clip_skip=args.clip_skip,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative,
        sampler=args.sampler,
        batch_size=args.batch_size,
    )
    paths, grid = run_generation(
        models,
        args.lora,
        requests,
        settings,
        args.out,
        device,
        not args.no_progress,
        args.embedding,
        args.overwrite,
        model_name=model_name(args.model),
    )
    print(f"wrote {len(paths)} image{'' if len(paths) == 1 else 's'} and {grid}")
    return 0


def _free_name(path: Path) -> Path:
    """`path` with the first free number before its suffix: report.1.json, report.2.json, ..."""
    number = 1
    while (taken := path.with_name(f"{path.stem}.{number}{path.suffix}")).exists():
        number += 1
    return taken


def _warn_of_repeated_sets(changes: list[str]) -> None:
    """The same key set twice (a command line grown by copy and paste): the last wins, said."""
    last: dict[str, str] = {}
    for change in changes:
        key = "".join(change.partition("=")[0].split())
        if key in last and last[key] != change:
            warn(f"--set {key} is given more than once; the last, {change!r}, is used")
        last[key] = change


def run_merge(args: argparse.Namespace) -> int:
    from leco.config import PretrainedModelConfig
    from leco.interop.merge import merge, parse_lora_argument

    spec = PretrainedModelConfig(name_or_path=args.model, allow_pickle=args.allow_pickle)
    loras = [parse_lora_argument(text) for text in args.lora]
    out = merge(spec, loras, args.out, precision=args.precision, overwrite=args.overwrite)
    baked = sum(1 for lora in loras if lora.strength != 0)  # strength 0 is left out, with a warning
    print(f"merged {baked} LoRA(s) into {out}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from leco.interop.convert import convert

    out = convert(
        args.source,
        args.out,
        model=args.model,
        family=args.family,
        sd2_proj=args.sd2_proj,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")
    return 0


def quiet_libraries() -> None:
    """Keep library chatter (loading bars, notes about optional packages) out of the terminal."""
    _quiet_library_environment()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _quiet_library_environment() -> None:
    # Read when transformers/diffusers are first imported, which checking some options does.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _join_negative_values(argv: list[str]) -> list[str]:
    # argparse reads "--strengths -1,0,1" as two options; users write it that way, so join them.
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in NUMERIC_LIST_OPTIONS and re.match(r"-\.?\d", arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def entry() -> NoReturn:
    """The `leco` command: `main`, then exit. Once main has returned every file is written, so a
    further Ctrl-C (or TERM, HUP) has nothing left to stop: it is ignored, not raised into the
    interpreter's exit, where it would print a traceback from an atexit callback."""
    code = main()
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a prompt or path the console cannot show is escaped,
        with contextlib.suppress(AttributeError, ValueError):  # not a crash after the work is done
            stream.reconfigure(errors="backslashreplace")
    previous = _abort_on_termination()
    try:
        return _main(argv)
    except (KeyboardInterrupt, Terminated) as stop:  # while the options are read (some import torch)
        with contextlib.suppress(OSError):
            print("leco: aborted", file=sys.stderr)
        return stopped_exit_code(getattr(stop, "signal_number", None))
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _abort_on_termination() -> dict[int, Any]:
    """SIGTERM or a hang-up before training starts (loading, generating) ends leco as Ctrl-C does,
    with its one line, not silently; training installs its own handlers, which save."""

    def abort(number: int, frame: object) -> None:
        raise Terminated(number)

    if threading.current_thread() is not threading.main_thread():
        return {}
    stops = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    # a signal the caller ignores (`nohup` ignores SIGHUP) stays ignored
    return {n: signal.signal(n, abort) for n in stops if signal.getsignal(n) is not signal.SIG_IGN}


def _main(argv: Sequence[str] | None) -> int:
    _quiet_library_environment()
    parser = build_parser()
    words = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args, unknown = parser.parse_known_args(words)
    if unknown:  # named by the command it was given to, as its other errors are
        (args.commands.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.words = words  # the command line, for commands that start copies of themselves
    if args.command is not None:
        _refuse_repeated_options(args.commands[args.command], words)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("leco: error: name a command, e.g. leco train CONFIG.yaml (see leco --help)", file=sys.stderr)
        return 2
    try:
        quiet_libraries()  # imports diffusers: a Ctrl-C here must not print a traceback either
        tell_launcher_ready()  # past the imports: a Ctrl-C inside one can leave a module half-made
        return args.run(args)
    except LecoError as error:  # prefixed as argparse prefixes a bad option of the same command
        if first_to_report_error():  # data-parallel: every process finds it, one says it
            print(f"leco {args.command}: error: {_error_message(error, words)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as stop:
        return _aborted(args.command, getattr(stop, "signal_number", None))
    except Exception as error:  # torch.OutOfMemoryError is a RuntimeError; a full disk an OSError or not
        if (stop := _raised_by_an_interrupt(error)) is not None:
            return _aborted(args.command, getattr(stop, "signal_number", None))
        message = _out_of_memory(error) or _disk_full(error) or _write_failed(error, args.command)
        if not message:
            raise
        print(f"leco {args.command}: error: {message}", file=sys.stderr)
        return 1


def _aborted(command: str, signal_number: int | None) -> int:
    """Ctrl-C, SIGTERM or a hang-up outside training's own handling: one line, exit code 128 + the
    signal's number (130, 143, 129)."""
    if is_main_process():  # data-parallel: said once
        with contextlib.suppress(OSError):  # after a hang-up the terminal may be gone
            print(f"leco {command}: aborted", file=sys.stderr)
    if os.environ.get(LAUNCHED_BY_LECO):  # torchrun reads 130 as a crash; the launcher says 130
        # Ended here: CPython re-raises SIGINT at exit when the interrupt passed through code run
        # from C (seen under torch), even though it was caught; torchrun would report a crash.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return stopped_exit_code(signal_number)


def _raised_by_an_interrupt(error: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM behind an error Python raised because of it: an interrupt inside a class
    being made (a library's lazy import) comes out as "RuntimeError: Error calling __set_name__"."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt | Terminated):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _refuse_repeated_options(command: argparse.ArgumentParser, words: list[str]) -> None:
    """argparse keeps the last of an option given twice; for one that takes a value, the first is
    then dropped without a word (--seeds 0-1 --seeds 5 draws seed 5 only)."""
    seen: set[str] = set()
    for word in words:
        if word == "--":
            break
        action = command._option_string_actions.get(word.split("=", 1)[0])  # argparse's own table
        if action is None or action.nargs == 0 or isinstance(action, argparse._AppendAction):
            continue  # a flag (twice is once) or an option meant to be repeated
        name = action.option_strings[-1]
        if name in seen:
            lists = {"--seeds": " (a list goes in one value: 0-1,5)", "--strengths": " (one list: -1,0,1)"}
            command.error(f"argument {name}: given twice; give it once{lists.get(name, '')}")
        seen.add(name)


def _disk_full(error: BaseException) -> str | None:
    """One line for a write the disk had no room for (torch and safetensors wrap the OSError)."""
    from leco.files import is_disk_full

    if not is_disk_full(error):
        return None
    causes = [error, error.__cause__, error.__context__]
    where = next((c.filename for c in causes if isinstance(c, OSError) and c.filename), None)
    return f"the disk is full{f' (writing {where})' if where else ''}; free some space or write elsewhere"


def _write_failed(error: BaseException, command: str) -> str | None:
    """One line for an output that could not be written (a folder gone read-only or taken away
    under a running job); files written before it are left as they were."""
    from leco.files import OutputNotWritten

    if not isinstance(error, OutputNotWritten):
        return None
    resume = "; the run continues from its last save with --resume" if command == "train" else ""
    return f"cannot write {error.filename} ({error.strerror}); files written before it are kept{resume}"


def _out_of_memory(error: BaseException) -> str | None:
    """One line for an allocation that failed (image size, batch or model too large), else None."""
    text = str(error)
    if not (isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text):
        return None
    wanted = re.search(r"allocate ([0-9]+) bytes", text)
    size = f" ({int(wanted[1]) / 2**30:.1f} GiB asked for at once)" if wanted else ""
    return (
        f"out of memory{size}; use smaller images (resolution, --height/--width), a smaller batch "
        "(batch_size, --batch-size), or on a GPU train.gradient_checkpointing / a lower precision"
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""kohya sd-scripts `train_leco.py` prompt files (TOML), read into leco prompt entries.

The reference is kohya's `library/leco_train_util.py` (`load_prompt_settings`). Two forms:

- `[[prompts]]`: entries with the LECO keys plus `multiplier` and `weight`; top-level keys of the
  same names are defaults for every entry. An entry with `target_class` is a slider target.
- slider targets: `[[targets]]` (or inside a `[slider]` table, or one target written at the top
  level) with `target_class`, `positive`, `negative`; each expands into erase/enhance entries at
  +multiplier and -multiplier, once per neutral prompt and per resolution.

Defaults are kohya's (resolution 512, guidance_scale 1, batch_size 1, multiplier 1, weight 1).
leco is stricter in one way: a key kohya would silently skip (an unknown key on a slider target or
at the top level) is an error here, so a typo never goes unnoticed.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from leco.config import (
    ACTIONS,
    ConfigError,
    PromptSettings,
    as_read,
    describe_validation_error,
    read_config_text,
    read_prompt_text,
    text_lines,
    with_nearest,
)
from leco.errors import first_line, warn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROMPT_KEYS = (
    "target",
    "positive",
    "unconditional",
    "neutral",
    "action",
    "guidance_scale",
    "resolution",
    "dynamic_resolution",
    "batch_size",
    "dynamic_crops",
    "multiplier",
    "weight",
)
SLIDER_KEYS = (
    "target_class",
    "positive",
    "negative",
    "neutral",
    "guidance_scale",
    "resolution",
    "resolutions",
    "dynamic_resolution",
    "batch_size",
    "dynamic_crops",
    "multiplier",
    "weight",
)
KOHYA_ACTIONS = ("erase", "enhance")
LECO_ONLY_ACTIONS = tuple(a for a in ACTIONS if a not in KOHYA_ACTIONS)
# Lists of neutral prompts, in kohya's per-target precedence order.
NEUTRAL_LIST_KEYS = ("neutrals", "neutral_prompt_file", "prompt_file")
KOHYA_DEFAULTS = {
    "guidance_scale": 1.0,
    "resolution": 512,
    "dynamic_resolution": False,
    "batch_size": 1,
    "dynamic_crops": False,
    "multiplier": 1.0,
    "weight": 1.0,
}
# Keys a slider entry copies from its target (after the defaults are merged in).
_SLIDER_SHARED = ("guidance_scale", "dynamic_resolution", "batch_size", "dynamic_crops", "weight")

Entry = tuple[str, dict[str, Any]]  # (where in the file, PromptSettings fields)


def same_poles(positive: str, negative: str, keys: tuple[str, str] = ("positive", "negative")) -> str | None:
    """Why a slider with these ends (named by `keys` in its file) has no direction: both the same
    prompt as the model reads it, so each of its entries would only pull the target to its neutral."""
    if positive.strip() and as_read(positive) == as_read(negative):
        return (
            f"{keys[0]} and {keys[1]} are the same prompt ({positive!r}, as the model reads it), so the "
            "slider has no direction between its ends; give two different prompts, or one of them"
        )
    return None


def slider_pairs(positive: str, negative: str, multiplier: float) -> list[tuple[str, str, str, float]]:
    """(positive, unconditional, action, multiplier) of the entries one slider target trains.

    With both poles: +multiplier pushes target_class towards `positive`, -multiplier towards
    `negative`, each end trained twice (erase the other pole, enhance this one). One pole: two.
    """
    if positive.strip() and negative.strip():
        return [
            (negative, positive, "erase", multiplier),
            (positive, negative, "enhance", multiplier),
            (positive, negative, "erase", -multiplier),
            (negative, positive, "enhance", -multiplier),
        ]
    if negative.strip():
        return [(negative, "", "erase", multiplier), (negative, "", "enhance", -multiplier)]
    return [(positive, "", "enhance", multiplier), (positive, "", "erase", -multiplier)]


def load_kohya_prompts(path: Path, data: dict[str, Any] | None = None) -> list[PromptSettings]:
    """Read a kohya train_leco prompt TOML into leco prompt entries (sliders expanded); `data`: the
    same tables already read from another file format (kohya's docs once showed them as YAML)."""
    data = _read_toml(path) if data is None else data
    if not data:
        raise ConfigError(f"{path}: the file is empty; write [[prompts]] entries or slider [[targets]]")
    if "prompts" not in data and "targets" not in data and kohya_arguments_in(data):
        raise ConfigError(
            f"{path}: is a kohya train_leco arguments file (--config_file), not its prompt file; run it "
            f"as it is: leco train {path}"
        )
    reader = _KohyaReader(path)
    entries = reader.prompts_form(data) if "prompts" in data else reader.slider_form(data)
    if not entries:
        raise ConfigError(f"{path}: prompts: the list is empty; add at least one [[prompts]] entry")
    return [_validate(path, where, fields).written_at(f"{path.name}: {where}") for where, fields in entries]


class _KohyaReader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def prompts_form(self, data: dict[str, Any]) -> list[Entry]:
        for ignored in ("targets", "slider"):
            if ignored in data:
                raise ConfigError(
                    f"{self.path}: {ignored}: kohya reads only [[prompts]] when a file has them; move the "
                    "slider targets into [[prompts]] (they keep target_class) or drop [[prompts]]"
                )
        self.check_keys(data, ("prompts", *PROMPT_KEYS), "", "a file with [[prompts]]")
        defaults = {**KOHYA_DEFAULTS, **_pick(data, PROMPT_KEYS)}
        entries: list[Entry] = []
        for where, item in self.tables(data["prompts"], "prompts"):
            if "target_class" in item:
                # kohya reads only `neutral` here, so a file means here what it means to kohya.
                for unread in (key for key in NEUTRAL_LIST_KEYS if key in item):
                    warn(
                        f"{self.path}: {where}.{unread}: kohya reads only `neutral` in a [[prompts]] "
                        "slider item, and so does leco; move the item to [[targets]] to use a neutral list"
                    )
                entries += self.slider_entries(item, defaults, [self.text(item, "neutral", where)], where)
            else:
                entries.append(self.prompt_entry(item, defaults, where))
        return entries

    def slider_form(self, data: dict[str, Any]) -> list[Entry]:
        config, prefix = data, ""
        if "slider" in data:
            self.check_keys(data, ("slider",), "", "a file with a [slider] table")
            config, prefix = data["slider"], "slider."
            if not isinstance(config, dict):
                raise ConfigError(f"{self.path}: slider: must be a table ([slider]) of targets and defaults")
        targets = config.get("targets")
        if targets is None:
            if "target_class" not in config and "target" not in config:
                raise ConfigError(
                    f"{self.path}: no [[prompts]] or [[targets]] (nor a top-level target or target_class); "
                    "write [[prompts]] entries or slider [[targets]]"
                )
            return self.single_target(config, prefix)
        items = self.tables(targets, f"{prefix}targets")
        if not items:
            raise ConfigError(
                f"{self.path}: {prefix}targets: the list is empty; add at least one [[targets]]"
            )
        if "target" in items[0][1]:  # kohya: the first target decides how all of them are read
            self.check_keys(config, ("targets", *PROMPT_KEYS), prefix, "a file of [[targets]] with target")
            defaults = {**KOHYA_DEFAULTS, **_pick(config, PROMPT_KEYS)}
            return [self.prompt_entry(item, defaults, where) for where, item in items]
        self.check_keys(config, ("targets", *SLIDER_KEYS, *NEUTRAL_LIST_KEYS), prefix, "a slider file")
        defaults = {**KOHYA_DEFAULTS, **_pick(config, SLIDER_KEYS)}
        file_neutrals = self.file_neutrals(config, prefix)
        entries: list[Entry] = []
        for where, item in items:
            neutrals = self.item_neutrals(item, where, with_neutral=True)
            entries += self.slider_entries(
                item, defaults, file_neutrals if neutrals is None else neutrals, where
            )
        return entries

    def single_target(self, config: dict[str, Any], prefix: str) -> list[Entry]:
        where = prefix.rstrip(".") or "(top level)"
        if "target_class" in config:
            # kohya reads the table as its own only target: the per-target precedence applies.
            defaults = {**KOHYA_DEFAULTS, **_pick(config, SLIDER_KEYS)}
            neutrals = self.item_neutrals(config, where, with_neutral=True)
            return self.slider_entries(config, defaults, neutrals or [], where)
        defaults = {**KOHYA_DEFAULTS, **_pick(config, PROMPT_KEYS)}
        return [self.prompt_entry(config, defaults, where)]

    # -- entries ----------------------------------------------------------------------------------

    def prompt_entry(self, item: dict[str, Any], defaults: dict[str, Any], where: str) -> Entry:
        self.check_keys(item, PROMPT_KEYS, f"{where}.", "a prompt entry")
        fields = {**_pick(defaults, PROMPT_KEYS), **item}
        action = fields.get("action", "erase")
        # A kohya file should stay runnable by kohya; leco's other actions live in its own YAML.
        if isinstance(action, str) and action in LECO_ONLY_ACTIONS:
            raise ConfigError(
                f"{self.path}: {where}.action: {action!r} is not a kohya train_leco action (erase, enhance); "
                + (
                    self.leco_form_hint()
                    or "write this entry in a leco prompts YAML (README: prompts.yaml) to use leco's actions"
                )
            )
        if action not in KOHYA_ACTIONS:
            raise ConfigError(f"{self.path}: {where}.action: {action!r} is not allowed; use erase or enhance")
        if "resolution" in fields:
            fields["resolution"] = self.resolution(fields["resolution"], f"{where}.resolution")
        return where, fields

    def slider_entries(
        self, item: dict[str, Any], defaults: dict[str, Any], neutrals: list[str], where: str
    ) -> list[Entry]:
        self.check_keys(item, (*SLIDER_KEYS, *NEUTRAL_LIST_KEYS), f"{where}.", "a slider target")
        merged = {**_pick(defaults, SLIDER_KEYS), **item}
        if not neutrals:  # an empty list or file: kohya falls back to the target's `neutral`
            neutrals = [self.text(merged, "neutral", where)]
        positive = self.text(merged, "positive", where)
        negative = self.text(merged, "negative", where)
        if not positive.strip() and not negative.strip():
            raise ConfigError(
                f"{self.path}: {where}: a slider target needs positive or negative (its two ends); "
                "set at least one"
            )
        why = same_poles(positive, negative)
        if why:
            raise ConfigError(f"{self.path}: {where}: {why}")
        multiplier = merged.get("multiplier", 1.0)
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            raise ConfigError(f"{self.path}: {where}.multiplier: must be a number (got {multiplier!r})")
        key = "resolutions" if "resolutions" in merged else "resolution"
        resolutions = self.resolutions(merged.get(key, 512), f"{where}.{key}")
        shared = {k: merged[k] for k in _SLIDER_SHARED if k in merged}
        pairs = slider_pairs(positive, negative, multiplier)
        return [
            (
                where,
                {
                    **shared,
                    "target": self.text(merged, "target_class", where),
                    "neutral": neutral,
                    "positive": pole,
                    "unconditional": other,
                    "action": action,
                    "resolution": resolution,
                    "multiplier": strength,
                },
            )
            for neutral in neutrals
            for resolution in resolutions
            for pole, other, action, strength in pairs
        ]

    # -- neutral prompt lists -----------------------------------------------------------------------

    def file_neutrals(self, config: dict[str, Any], prefix: str) -> list[str]:
        """The file-level list: `neutrals` + `neutral_prompt_file` + `prompt_file`, else `neutral`."""
        values: list[str] = []
        if "neutrals" in config:
            values += self.string_list(config["neutrals"], f"{prefix}neutrals")
        for key in ("neutral_prompt_file", "prompt_file"):
            if key in config:
                values += self.lines(config[key], f"{prefix}{key}")
        return values or [self.text(config, "neutral", prefix.rstrip(".") or "(top level)")]

    def item_neutrals(self, item: dict[str, Any], where: str, with_neutral: bool = False) -> list[str] | None:
        """A target's own neutral list (kohya's precedence), or None when it names none."""
        if "neutrals" in item:
            return self.string_list(item["neutrals"], _key(where, "neutrals"))
        for key in ("neutral_prompt_file", "prompt_file"):
            if key in item:
                return self.lines(item[key], _key(where, key))
        if with_neutral and "neutral" in item:
            return [self.text(item, "neutral", where)]
        return None

    def lines(self, name: Any, key: str) -> list[str]:
        """kohya's reading: every non-blank line, stripped (a `#` line is a prompt too). An empty file
        gives none, and kohya then falls back to the `neutral` prompt; a UTF-8 BOM is not read as part
        of the first prompt (kohya would keep it)."""
        if not isinstance(name, str):
            raise ConfigError(f"{self.path}: {key}: must be a file name (got {name!r})")
        if not name.strip():
            raise ConfigError(
                f"{self.path}: {key}: empty; name a text file of prompts, one a line (relative to the "
                "prompt file), or leave the key out"
            )
        file = self.path.parent / Path(name).expanduser()
        text = read_prompt_text(file, f"{self.path}: {key}", relative_to="the prompt file")
        lines = [line.strip() for line in text_lines(text) if line.strip()]
        if not lines:
            warn(f"{self.path}: {key}: {file} holds no prompts; the neutral prompt is used, as kohya does")
        return lines

    def string_list(self, value: Any, key: str) -> list[str]:
        if not isinstance(value, list):
            raise ConfigError(f'{self.path}: {key}: must be a list of prompts, e.g. ["", "a photo"]')
        if not value and key.endswith("neutrals"):  # as an empty neutral_prompt_file is said
            warn(f"{self.path}: {key}: an empty list; the neutral prompt is used, as kohya does")
        return [self._prompt(v, f"{key}[{i}]") for i, v in enumerate(value)]

    def text(self, table: dict[str, Any], key: str, where: str) -> str:
        """A prompt key of a slider table ("" when unset), as kohya reads it: str() of the value, and
        its poles and neutral as `str(value or "")`, which reads a 0 as no prompt at all."""
        value = table.get(key)
        if key != "target_class" and value == 0 and not isinstance(value, bool):
            warn(
                f'{self.path}: {_key(where, key)}: 0 is read as no prompt, as kohya reads it; write "0" '
                "(quoted) for the text 0"
            )
            return ""
        return self._prompt(value, _key(where, key))

    def _prompt(self, value: Any, key: str) -> str:
        # kohya would str() a list or table into "['a', 'b']" and train on that text; a number is a
        # prompt ink-digits understands ("7"), so it is read as kohya reads it.
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{self.path}: {key}: must be one prompt text (got {value!r})")
        return str(value)

    # -- values ---------------------------------------------------------------------------------------

    def resolutions(self, value: Any, key: str) -> list[int | tuple[int, int]]:
        """kohya: a list of [h, w] lists is several sizes; anything else is one size."""
        if isinstance(value, list) and value and isinstance(value[0], list):
            return [self.resolution(v, key) for v in value]
        return [self.resolution(value, key)]

    def resolution(self, value: Any, key: str) -> Any:
        """An int, or [height, width] (a square one becomes its side). Other values: left to validation."""
        if isinstance(value, list):
            if len(value) != 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            ):
                raise ConfigError(f"{self.path}: {key}: must be a number or [height, width] (got {value!r})")
            if not all(math.isfinite(v) for v in value):
                raise ConfigError(
                    f"{self.path}: {key}: {value!r} is not a size; write pixels, e.g. [512, 512]"
                )
            height, width = int(value[0]), int(value[1])
            return height if height == width else (height, width)
        return _whole(value)

    def tables(self, value: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            name = key.split(".")[-1]
            toml = self.path.suffix.lower() == ".toml"
            one = (
                f"; a single table goes in a list too: {name} = [{{ ... }}]"
                if isinstance(value, dict) and toml
                else ""
            )
            raise ConfigError(f"{self.path}: {key}: must be a list of tables ([[{name}]]){one}")
        return [(f"{key} {number}", item) for number, item in enumerate(value, start=1)]

    def check_keys(self, table: dict[str, Any], allowed: Iterable[str], prefix: str, what: str) -> None:
        allowed = list(dict.fromkeys(allowed))
        unknown = [key for key in table if key not in allowed]
        if not unknown:
            return
        if len(unknown) == 1:  # as one key has always been said
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            named = f"{prefix}{unknown[0]}: unknown key in {what}; " + (
                f"did you mean {close[0]!r}? " if close else ""
            )
        else:  # every one at once: a file with several is fixed in one go
            keys = ", ".join(with_nearest(key, allowed, f"{prefix}{key}") for key in unknown)
            named = f"{keys}: unknown keys in {what}; "
        raise ConfigError(
            f"{self.path}: {named}" + (self.leco_form_hint() or f"allowed here: {', '.join(allowed)}")
        )

    def leco_form_hint(self) -> str:
        """For a YAML file read as kohya's tables (its top level is `prompts:`): leco's own form."""
        if self.path.suffix.lower() == ".toml":
            return ""
        return (
            "a YAML prompts file whose top level is `prompts:` is read as kohya train_leco's tables; leco's "
            "own prompts file is a top-level list (- target: ...): drop the `prompts:` line, or put the "
            "entries under prompts: in the config itself"
        )


def _whole(value: Any) -> Any:
    """kohya reads a size and a batch size with int(), so 24.9 trains at 24; other values: validation."""
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return value


def _pick(table: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if k in keys}


def _validate(path: Path, where: str, fields: dict[str, Any]) -> PromptSettings:
    if "batch_size" in fields:
        fields = {**fields, "batch_size": _whole(fields["batch_size"])}
    for key in ("dynamic_resolution", "dynamic_crops"):
        # kohya takes bool() of the value, so the text "false" is true: neither reading is safe.
        if key in fields and not isinstance(fields[key], bool):
            raise ConfigError(f"{path}: {where}.{key}: must be true or false (got {fields[key]!r})")
    try:
        return PromptSettings.model_validate(fields)
    except ValidationError as error:  # the first problem only: one line
        first = describe_validation_error(error, path, PromptSettings, prefix=f"{where}.").splitlines()[0]
        raise ConfigError(first) from None


# Options of kohya's train_leco.py command line, as its --config_file TOML holds them (flat, or in
# tables such as [model_arguments]); any of them marks such a file.
KOHYA_ARGUMENT_KEYS = {
    "pretrained_model_name_or_path",
    "prompts_file",
    "max_train_steps",
    "learning_rate",
    "network_dim",
    "network_alpha",
    "network_module",
    "output_dir",
    "output_name",
    "save_every_n_steps",
    "max_denoising_steps",
    "leco_denoise_guidance_scale",
}


def kohya_arguments(path: Path) -> dict[str, Any] | None:
    """The options of a kohya train_leco arguments TOML (tables flattened); None if it is none.
    ConfigError if it is not TOML at all."""
    return kohya_arguments_in(_read_toml(path))


def kohya_arguments_in(data: dict[str, Any]) -> dict[str, Any] | None:
    flat = {key: value for key, value in data.items() if not isinstance(value, dict)}
    for value in data.values():
        if isinstance(value, dict):  # kohya flattens one level of tables: [training_arguments] ...
            flat.update(value)
    return flat if KOHYA_ARGUMENT_KEYS & set(flat) else None


def _read_toml(path: Path) -> dict[str, Any]:
    text = read_config_text(path, "TOML").removeprefix("\ufeff")  # a BOM, as Windows editors write
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML ({first_line(error, None)})") from None


def _key(where: str, key: str) -> str:
    """A key as messages name it: `targets 1.neutral`, or plain `neutral` at the file's top level."""
    return key if where == "(top level)" else f"{where}.{key}"

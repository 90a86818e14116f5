"""rohitgandikota/sliders prompt files: its `--attributes "a, b"` as an entry key `attributes:`.

A sliders prompts YAML is already a leco prompts file (the same list of target / positive /
unconditional / neutral / action / guidance_scale / resolution / ... entries). Its train script's
`--attributes` option duplicates every entry once per attribute and prepends "<attribute> " to the
entry's four prompts (sliders' `load_prompts_from_yaml`), so one slider is trained across e.g.
"male" and "female" people. In leco that is a key of the entry:

    - target: "person"
      positive: "person, smiling"
      unconditional: "person, frowning"
      attributes: "male, female"      # or a list: [male, female]

The prefix is applied after the entry's defaults are filled in (positive = target, unconditional =
"", neutral = unconditional), which is what sliders does for entries that spell all four out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leco.config import ConfigError
from leco.errors import warn

ATTRIBUTES_KEY = "attributes"


# Keys sliders' own prompt files carry (trainscripts/textsliders/data/*_GPT.yaml) that its
# PromptSettings drops unread (a pydantic model that ignores extra keys): they train at its
# guidance_scale, 1 unless set. An entry with `rank:` (a network setting, never a prompt entry's) is
# read as such a file's; `guidance:` alone stays an error (a typo of guidance_scale in leco's own).
SLIDERS_UNREAD_KEYS = ("guidance", "rank")
# sliders' PromptSettings defaults, which its SDXL script uses too (leco's own: the model's native
# size, and the run's samples per rollout), filled into entries recognised as its files'.
SLIDERS_DEFAULTS = {"resolution": 512, "batch_size": 1}


def drop_sliders_unread_keys(entries: list[Any], path: Path, where: str) -> list[Any]:
    """Entries without the keys sliders ignores, named in one warning, and with sliders' defaults
    (SLIDERS_DEFAULTS) where unset: its files run as they do there."""
    dropped: dict[str, list[int]] = {}
    kept = []
    for number, entry in enumerate(entries, start=1):
        if isinstance(entry, dict) and "rank" in entry:
            for key in SLIDERS_UNREAD_KEYS:
                if key in entry:
                    dropped.setdefault(key, []).append(number)
            entry = {**SLIDERS_DEFAULTS, **{k: v for k, v in entry.items() if k not in SLIDERS_UNREAD_KEYS}}
        kept.append(entry)
    if dropped:
        keys = ", ".join(f"{key} ({_numbers(where, numbers)})" for key, numbers in dropped.items())
        warn(
            f"{path}: {keys}: keys of rohitgandikota/sliders' prompt files that its trainer ignores; "
            "ignored here too: entries train at their guidance_scale (1 unless set), as in sliders, and "
            "at its resolution 512 and batch_size 1 unless set"
        )
    return kept


def _numbers(where: str, numbers: list[int]) -> str:
    """ "entry 3", "entries 1-10" or "entries 1, 4, 9" (where: "entry " or "prompts.")."""
    name = where.strip().rstrip(".")
    if len(numbers) == 1:
        return f"{name} {numbers[0]}"
    plural = "entries" if name == "entry" else name
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{plural} {numbers[0]}-{numbers[-1]}"
    return f"{plural} {', '.join(map(str, numbers))}"


def expand_attributes(entries: list[Any], path: Path, where: str) -> list[tuple[int, Any]]:
    """Replace each entry that has `attributes:` by one copy per attribute, prompts prefixed (the
    keys sliders ignores dropped first); each with the number of the entry it was written as."""
    entries = drop_sliders_unread_keys(entries, path, where)
    expanded: list[tuple[int, Any]] = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or ATTRIBUTES_KEY not in entry:
            expanded.append((number, entry))
            continue
        attributes = parse_attributes(entry[ATTRIBUTES_KEY], f"{path}: {where}{number}.{ATTRIBUTES_KEY}")
        rest = {k: v for k, v in entry.items() if k != ATTRIBUTES_KEY}
        expanded += [(number, with_attribute(rest, attribute)) for attribute in attributes]
    return expanded


def parse_attributes(value: Any, where: str) -> list[str]:
    """sliders' option text "a, b" (split at commas, stripped) or a YAML list of strings."""
    if isinstance(value, str):
        attributes = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        attributes = [v.strip() for v in value]
    else:
        raise ConfigError(f'{where}: must be text like "male, female" or a list of strings (got {value!r})')
    if not attributes:
        raise ConfigError(f'{where}: no attributes given; write e.g. "male, female", or remove the key')
    if not all(attributes):
        raise ConfigError(f'{where}: an attribute is empty; write e.g. "male, female"')
    return attributes


def with_attribute(entry: dict[str, Any], attribute: str) -> dict[str, Any]:
    """The entry with "<attribute> " before target, positive, unconditional and neutral."""

    def prefixed(text: Any) -> Any:
        if isinstance(text, list):
            return [prefixed(item) for item in text]
        # Anything that is not text is left for the entry's validation to report.
        return f"{attribute} {text}" if isinstance(text, str | int | float) else text

    if "target" not in entry:
        return dict(entry)  # validation reports the missing target
    target = entry["target"]
    unconditional = entry.get("unconditional", "")
    result = {**entry, "target": prefixed(target), "unconditional": prefixed(unconditional)}
    # Unset, positive and neutral default to the (prefixed) target and unconditional: left unset, so
    # they stay defaults, not keys the file set (an action that never reads them is not warned of).
    for role in ("positive", "neutral"):
        if entry.get(role) is not None:
            result[role] = prefixed(entry[role])
    return result

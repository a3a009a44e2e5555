"""The two kinds of failure evomerge tells apart, and helpers for messages that name the fix.

- `EvomergeError`: bad input or state (a config, a recipe, a model folder, a journal). The CLI
  prints its message as one line and exits 2.
- `CandidateError`: a candidate failed on its own merits (its merged weights give NaN scores,
  say). The campaign journals it as failed and tells the optimizer a penalty. Every other
  exception inside a worker is an infrastructure failure: retried, then the campaign stops.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable


class EvomergeError(Exception):
    """Bad input or state, with a message that names the culprit and the fix."""


class CandidateError(Exception):
    """The candidate itself is at fault (non-finite weights or scores): a penalty, not a retry."""


def close_match(word: Any, choices: Iterable[str]) -> str:
    """'; did you mean X?' when a choice is close to `word`, else ''."""
    found = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {found[0]!r}?" if found else ""


def check_keys(block: dict, allowed: Iterable[str], where: str) -> None:
    """Refuse unknown keys in a config block, naming the allowed ones and the closest match."""
    allowed = list(allowed)
    for key in block:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise EvomergeError(f"config field '{prefix}{key}' is unknown; allowed: {', '.join(allowed)}"
                                f"{close_match(key, allowed)}")


def is_number(value: Any) -> bool:
    """A finite int or float (bools are not numbers here; neither are ints too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def is_count(value: Any, low: int = 0, high: int | None = None) -> bool:
    """An int in [low, high] (bools excluded)."""
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def is_name(value: Any, names) -> bool:
    """`value` is a string among `names` (a list or a YAML mapping in its place is not a crash)."""
    return isinstance(value, str) and value in names


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for journals and error lines."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__module__ + '.' if type(exc).__module__ not in ('builtins', '__main__') else ''}" \
           f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_document(path, what: str, hint: str, formats: str = "YAML"):
    """The YAML (or, for *.json, JSON) a user file holds, or one line: missing, a folder, unparseable."""
    import json
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"{what} file {path} does not exist" if not path.exists()
                            else f"{what} {path} is a folder; pass the {hint}")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{path}: not valid {formats} ({yaml_problem(exc)})") from None


def yaml_problem(exc: Exception) -> str:
    """'line 3, column 5: expected ...' from a YAML error (its first line alone says little)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "msg", None) or str(exc).splitlines()[0]
    if mark is None and hasattr(exc, "lineno"):  # json.JSONDecodeError
        return f"line {exc.lineno}, column {exc.colno}: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem

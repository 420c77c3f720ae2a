"""Argument types shared by every `fedldm` command, each defined once.

- `Parser`: an ArgumentParser whose errors are one line `fedldm <command>: <message>` (exit 2)
  instead of a usage dump and a SystemExit;
- `override`: the one `--set KEY=VALUE` parser (VALUE is read as JSON when it parses, else kept
  as a string: `--set diffusion.rounds=8`, `--set autoencoder.optimizer=sgd`);
- `epsilon`: a positive number or "inf" (no DP); `delta`: a number in (0, 1);
- `positive_int`, `nonneg_int`, `port`, `path`;
- `toml_value`: one TOML value (infinity as the string "inf", as the apps read it).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, NoReturn

from cli.errors import UsageError
from common import jsonio

__all__ = ["Parser", "override", "epsilon", "delta", "positive_int", "nonneg_int", "port",
           "path", "toml_value"]


class Parser(argparse.ArgumentParser):
    """Raises `UsageError` (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, f"{message} (see `{self.prog} --help`)")


def override(text: str) -> tuple[str, Any]:
    """`--set SECTION.FIELD=VALUE` -> (key, value); VALUE as JSON when it parses, else text."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: use SECTION.FIELD=VALUE, e.g. "
                                         "--set diffusion.rounds=8")
    if key in ("ae_init", "dm_init") and value.endswith(".safetensors"):
        # A prior file: absolute, so the coordinator's ServerApp (another working folder)
        # and a resumed run read the same file.
        return key, str(Path(value).expanduser().resolve())
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def epsilon(text: str) -> float:
    """A DP budget: a number > 0, or 'inf' (also 'infinity', 'none') for no DP."""
    if text.strip().lower() in ("inf", "infinity", "none"):
        return math.inf
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'inf')") from e
    if not v > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0, got {text!r} ('inf' = no DP)")
    return v


def delta(text: str) -> float:
    """The DP delta: a number strictly between 0 and 1 (e.g. 1e-5)."""
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 1e-5)") from e
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"delta must be in (0, 1), got {text}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from e


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0, e.g. seconds."""
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def port(text: str) -> int:
    v = _int(text)
    if not 0 < v < 65536:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {v}")
    return v


def rare_class(text: str) -> tuple[str, float]:
    """CLASS:FRACTION, e.g. 'tumor:0.03' (the demo's rare class and its share of patients)."""
    name, sep, frac = text.partition(":")
    try:
        value = float(frac)
    except ValueError:
        value = math.nan
    if not sep or not name.strip() or not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected CLASS:FRACTION with 0 < FRACTION < 1, e.g. tumor:0.03")
    return name.strip(), value


def float_list(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers >= 0, e.g. '1,2,4'."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers like 1,2,4") from e
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected finite numbers >= 0, like 1,2,4")
    return values


def path(text: str) -> Path:
    """A path as given, with `~` expanded (existence is checked by the command, which knows
    what the file is for)."""
    if not text:
        raise argparse.ArgumentTypeError("empty path")
    return Path(text).expanduser()


def toml_value(v: Any) -> str:
    """One TOML value; infinity becomes the string "inf", which is how the apps read it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    v = jsonio.encode_float(v)
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string

"""Checks of what a user hands tinyrwkv: numbers (options on the command line, arguments of the
API) and text files.

A NaN temperature, learning rate or LoRA alpha does not fail anywhere by itself: it flows through
the arithmetic and comes out as a NaN model, an empty generation or a comparison that passes. So
every number is checked where it comes in, with one message for both doors:

    check_float("temperature", t, NON_NEGATIVE)    # API: "temperature must be a finite number >= 0, not nan"
    p.add_argument("--temperature", type=option(float, NON_NEGATIVE))
                                                   # CLI: "argument --temperature: must be ..." (exit 2)
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; None: unbounded on that side."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x):
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def __str__(self):
        if self.low is not None and self.high is not None:
            if not (self.low_open or self.high_open):
                return f"between {self.low:g} and {self.high:g}"
            return (f"in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""


ANY = Range()
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)                           # probabilities, decay factors
UNIT_BELOW_ONE = Range(0, 1, high_open=True)  # Adam's betas


def _must_be(kind, within, value):
    return f"must be {kind}{' ' + str(within) if str(within) else ''}, not {value!r}"


def check_float(name, value, within=ANY):
    """`value` as a float if it is a finite real number in `within`; else ValueError naming
    `name`. (bool is refused: True for a temperature is a bug in the caller.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} {_must_be('a finite number', within, value)}")
    value = float(value)
    if not math.isfinite(value) or value not in within:
        raise ValueError(f"{name} {_must_be('a finite number', within, value)}")
    return value


def check_int(name, value, within=ANY):
    """`value` as an int if it is an integer (not a bool, not a float) in `within`; else
    ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in within:
        raise ValueError(f"{name} {_must_be('an integer', within, value)}")
    return int(value)


def option(kind, within=ANY):
    """An argparse `type=` for numbers of `kind` (float or int) in `within`. A bad value becomes
    argparse's usage error (exit 2): "argument --top-p: must be a finite number between 0 and 1,
    not 1.5"."""
    check = check_float if kind is float else check_int
    what = "a finite number" if kind is float else "an integer"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(_must_be(what, within, text)) from None
        try:
            return check("", value, within)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    parse.__name__ = what                    # argparse names the type in some messages
    return parse


def read_text(path, what="input"):
    """The text of a UTF-8 file; not UTF-8: a ValueError naming the file (decode_text)."""
    return decode_text(Path(path).read_bytes(), path, what)


def decode_text(data, where, what="input"):
    """`data` (bytes) decoded as UTF-8. Not UTF-8: a ValueError naming `where` (a path, "stdin"),
    the first bad byte and the fix, instead of Python's message that names no file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: the {what} is not UTF-8 text (byte 0x{data[e.start]:02X} at "
                         f"offset {e.start}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                         ) from None

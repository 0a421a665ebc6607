"""Checked types for command-line flags: `parser.add_argument("--steps", type=positive_int)`,
and the help formatter that names every flag's default (`DefaultsHelp`).

A bad value is argparse's one-line error naming the flag and what it must be, exit
status 2. Imports nothing but argparse, so every command's `--help` stays fast.
"""

from __future__ import annotations

import argparse


def _checked(convert, test, what: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0, "a positive number")
non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
probability = _checked(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")


class DefaultsHelp(argparse.HelpFormatter):
    """Help that ends each flag's line with its default, where it has one that is not None
    and the text does not say it (a None default's meaning is in the help text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, argparse.SUPPRESS, []) and action.option_strings):
            shown = "off" if action.default is False else action.default
            text += f" (default: {shown})"
        return text

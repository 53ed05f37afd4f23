"""
What the scripts (train.py, sample.py, compare.py, bench.py) share on the command line: a parser
whose errors are one line, flag types that check their range when the flag is parsed, fail() for
errors found later, and the device a flag names. A user's mistake ends in one line on stderr and a
non-zero exit (2 for a bad flag, 1 otherwise), never a traceback.
"""
import argparse
import math
import sys

import torch


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and the defaults shown in --help."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def fail(msg):
    """An error found after parsing: one line on stderr, exit 1."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def checked(kind, low=None, high=None, low_open=False, name=None):
    """An argparse type: kind(text), finite, within [low, high] ((low, high] with low_open)."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        below = low is not None and (x <= low if low_open else x < low)
        if not math.isfinite(x) or below or (high is not None and x > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {name}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = checked(int, 1, name="a whole number >= 1")
natural_int = checked(int, 0, name="a whole number >= 0")
positive = checked(float, 0.0, low_open=True, name="a number > 0")
nonnegative = checked(float, 0.0, name="a number >= 0")
probability = checked(float, 0.0, 1.0, name="a number in [0, 1]")


def subset(names):
    """An argparse type: "all" (every one of names, in order) or a comma list of some of them."""
    def parse(text):
        chosen = list(names) if text == "all" else text.split(",")
        if any(s not in names for s in chosen):
            raise argparse.ArgumentTypeError(f"takes all or a comma list of {','.join(names)}; got {text!r}")
        return chosen
    return parse


def device(text):
    """An argparse type: auto (cuda if available, else cpu), cpu, cuda or cuda:N on a machine that has it."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (use cpu or auto)")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text

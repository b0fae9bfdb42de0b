"""Command-line tools. Each module defines HELP, add_arguments(parser) and run(args) -> exit code."""
import argparse
import math


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks (formulas, lists); every option shows its default."""


def plain(doc):
    """A docstring as --help text: no reST markup (``literal`` → literal)."""
    return (doc or "").replace("``", "")


def _number(kind, minimum, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'number' if kind is float else 'whole number'}")
        if not value >= minimum or (kind is float and (value == minimum or not math.isfinite(value))):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, "at least 1")
positive_float = _number(float, 0.0, "a finite number greater than 0")


from . import bench, demo, verify  # noqa: E402  (they import the helpers above)

COMMANDS = {"demo": demo, "bench": bench, "verify": verify}

"""Command-line tools. Each module defines HELP, add_arguments(parser) and run(args) -> exit code."""
from . import demo

COMMANDS = {"demo": demo}

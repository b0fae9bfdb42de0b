"""Command-line tools. Each module defines HELP, add_arguments(parser) and run(args) -> exit code."""
from . import bench, demo, verify

COMMANDS = {"demo": demo, "bench": bench, "verify": verify}

"""``python -m fusedgrad <command>``: demo, and the other tools in fusedgrad.cli."""
import argparse
import sys

from .cli import COMMANDS


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__))
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())

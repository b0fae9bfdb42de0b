"""python -m fusedgrad COMMAND: the command-line tools of fusedgrad (see fusedgrad.cli)."""
import argparse
import sys
import textwrap

from .cli import COMMANDS, HelpFormatter, plain

DESCRIPTION = ("fusedgrad's command-line tools: train the demo network with fusedgrad and native autograd "
               "side by side (demo), check the hand-derived gradients (verify), and benchmark against native "
               "autograd and torch.compile (bench). 'python -m fusedgrad COMMAND --help' describes each.")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedgrad", description=textwrap.fill(DESCRIPTION, 79),
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=plain(module.__doc__),
                                            formatter_class=HelpFormatter))
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())

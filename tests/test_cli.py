"""The command line: every option documented with its default, degenerate input refused with exit status 2."""
import argparse

import pytest

from fusedgrad.__main__ import main
from fusedgrad.cli import COMMANDS


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "--steps: must be at least 1, got 0"),
    (["demo", "--steps", "-3"], "--steps: must be at least 1, got -3"),
    (["demo", "--hidden", "0"], "--hidden: must be at least 1, got 0"),
    (["demo", "--lr", "0"], "--lr: must be a finite number greater than 0, got 0"),
    (["demo", "--lr", "nan"], "--lr: must be a finite number greater than 0, got nan"),
    (["demo", "--steps", "ten"], "--steps: 'ten' is not a whole number"),
    (["bench", "--repeats", "0"], "--repeats: must be at least 1, got 0"),
    (["bench", "--threads", "0"], "--threads: must be at least 1, got 0"),
    (["bench", "--shapes", "4x4x4"], "must be NxDxHxO"),
    (["verify", "--shape", "1", "1", "0", "1"], "--shape: must be at least 1, got 0"),
    ([], "the following arguments are required: COMMAND"),
])
def test_degenerate_input_exits_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_one_step_runs(capsys):
    assert main(["demo", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "largest relative loss difference from native over 1 steps" in out
    assert "fusedgrad.Trainer.fit, one call" in out


def parser_of(name):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    from fusedgrad.cli import HelpFormatter
    p = sub.add_parser(name, formatter_class=HelpFormatter)
    COMMANDS[name].add_arguments(p)
    return p


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    parser = parser_of(name)
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings}: no help text"
    # ArgumentDefaultsHelpFormatter: each option with help gets its default appended.
    assert text.count("(default:") >= len([a for a in parser._actions if a.dest != "help"])


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "demo" in out and "verify" in out and "bench" in out
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "``" not in capsys.readouterr().out

"""The command line parses: every subcommand builds (no flag defined twice) and the attack commands take their flags."""

import pytest

from fedguard.cli import build_parser
from producers.attacks import ATTACKS


def test_every_subcommand_builds_and_parses_its_help():
    parser = build_parser()
    for argv in (["attack", "--help"], ["demo", "--help"], ["devices", "show", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 0


def _subcommands(parser):
    """(argv prefix, subparser) of every command and nested command."""
    import argparse

    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subcommands(sub)
                out.extend(([name, *prefix], p) for prefix, p in nested) if nested else out.append(([name], sub))
    return out


def test_help_is_plain_text_for_users(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ".. " not in text  # no reStructuredText
    for command in ("up", "demo", "watch", "attack", "inject", "rejected", "eval", "grafana push"):
        assert f"fedguard {command}" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("fedguard ")


TRAINING_FLAGS = ("--window-size", "--local-lr", "--alpha", "--rule-params", "--per-round")


def test_each_subcommand_shows_only_its_own_flags():
    trains = {"up", "demo", "init", "eval", "processors", "aggregator", "fleet"}
    commands = _subcommands(build_parser())
    assert len(commands) >= 15
    for argv, sub in commands:
        text = sub.format_help()
        shown = [flag for flag in TRAINING_FLAGS if flag in text]
        if argv[0] in trains:
            assert shown == list(TRAINING_FLAGS), argv
        else:
            assert shown == [], f"fedguard {' '.join(argv)} --help shows training flags {shown}"


def test_inject_help_explains_the_kinds_and_count():
    sub = dict((" ".join(a), p) for a, p in _subcommands(build_parser()))["inject"]
    text = " ".join(sub.format_help().split())
    for kind in ("garbage:", "tamper:", "replay:", "flood:"):
        assert kind in text
    assert "--count COUNT how many records to send" in text


def test_attack_flags():
    args = build_parser().parse_args(["attack", "ipm", "--compromise", "dev-0001,dev-0002", "--params",
                                      '{"eps": 1}', "--rounds", "3", "--devices", "10"])
    assert (args.kind, args.compromise, args.rounds, args.num_devices) == ("ipm", "dev-0001,dev-0002", 3, 10)
    assert build_parser().parse_args(["attack", "status"]).kind == "status"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["attack", "not-an-attack"])
    args = build_parser().parse_args(["demo", "--attack", "sybil", "--fraction", "0.3", "--attack-start", "2"])
    assert (args.attack, args.fraction, args.attack_start) == ("sybil", 0.3, 2)
    for kind in ATTACKS:
        assert build_parser().parse_args(["attack", kind]).kind == kind


def test_operational_errors_are_one_line_with_a_hint_and_a_non_zero_exit(capsys, monkeypatch):
    from fedguard.cli import main

    assert main(["attack", "status", "--redis-port", "1"]) == 1  # nothing listens on port 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach Redis" in err[0] and "fedguard up" in err[0]
    assert main(["rejected", "--reason", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fedguard reasons" in err[0]
    monkeypatch.setenv("FEDGUARD_DETECTION", "bogus")
    assert main(["attack", "status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "detection must be one of" in err[0]

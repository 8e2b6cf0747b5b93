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

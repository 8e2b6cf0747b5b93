"""``fedguard eval`` (fedguard.evaluation_matrix) on the synthetic task with tiny settings: the outputs and their
shape, resume (finished cells are not rerun), the PNGs, the CLI's usage errors."""

import json

import pytest

import fedguard.evaluation_matrix as em
import fedguard.simulation as sim
from fedguard.cli import build_parser, main

TINY = {"num_devices": 6, "per_round": 4}
ISSUE_ROUND = {"round", "main_accuracy", "backdoor_accuracy", "malicious", "honest", "flagged_malicious",
               "flagged_honest"}
ISSUE_CELL = {"rule", "rule_params", "detection", "attack", "fraction", "seed", "rounds", "final_main_accuracy",
              "max_backdoor_accuracy"}
PNG = b"\x89PNG\r\n\x1a\n"


def matrix(out, **kw):
    args = {"rules": ["fedavg", "krum"], "attacks": ["none", "sign_flip"], "fractions": [0.34], "seeds": [0, 1],
            "rounds": 3, "task": "synthetic", "out_dir": out, "detection": ("ensemble",),
            "rule_params": {"krum": {"f": 1}}, "attack_start": 2, "workers": 1, "overrides": TINY, **kw}
    return em.run_matrix(**args)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return out, matrix(out)


def test_outputs_exist_with_the_issue_shape(done):
    out, results = done
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cells"] == results["cells"] and on_disk["config"]["rounds"] == 3
    cells = results["cells"]
    # 2 rules x 1 detection x (1 clean + 1 attack x 1 fraction) x 2 seeds
    assert len(cells) == 8 and len(list((out / "cells").glob("*.json"))) == 8
    for c in cells:
        assert ISSUE_CELL <= set(c)
        assert [r["round"] for r in c["rounds"]] == [1, 2, 3]
        assert all(ISSUE_ROUND <= set(r) for r in c["rounds"])
        assert c["final_main_accuracy"] == c["rounds"][-1]["main_accuracy"]
    krum = [c for c in cells if c["rule"] == "krum"]
    assert all(c["rule_params"] == {"f": 1} for c in krum)
    clean = [c for c in cells if c["attack"] == "none"]
    assert len(clean) == 4 and all(c["fraction"] == 0.0 and c["detection_rates"]["tp"] is None for c in clean)
    assert all(r["malicious"] == 0 for c in clean for r in c["rounds"])
    attacked = [c for c in cells if c["attack"] == "sign_flip"]
    assert {c["fraction"] for c in attacked} == {0.34} and {c["seed"] for c in attacked} == {0, 1}
    assert any(r["malicious"] for c in attacked for r in c["rounds"])
    md = (out / "results.md").read_text()
    assert "| krum | ensemble | sign_flip | 0.34 | 2 |" in md and " ± " in md
    assert md.count("\n| fedavg |") == 2


def test_heat_maps_and_curves_are_pngs(done):
    out, _ = done
    maps = sorted(p.name for p in out.glob("heatmap_*.png"))
    assert maps == sorted(f"heatmap_{m}_ensemble_f0.34.png" for m in ("main", "backdoor", "tp", "fp"))
    curves = list((out / "curves").glob("*.png"))
    assert len(curves) == 4  # one per (rule, detection, attack, fraction), a line per seed
    for p in [*(out / m for m in maps), *curves]:
        assert p.read_bytes()[:8] == PNG


def test_a_rerun_skips_finished_cells(done, monkeypatch):
    out, first = done
    calls = []
    original = sim.simulate

    def counting(config, progress=None):
        calls.append(em.cell_key(config))
        return original(config, progress)

    monkeypatch.setattr(sim, "simulate", counting)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    again = matrix(out, plots=False)
    assert calls == [] and again["cells"] == first["cells"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == mtimes
    # one cell lost (an interrupted run): only that one runs again
    lost = sorted(mtimes)[0]
    (out / "cells" / lost).unlink()
    matrix(out, plots=False)
    assert [f"{k}.json" for k in calls] == [lost]
    # a changed setting is a different cell
    matrix(out, rules=["fedavg"], attacks=["none"], seeds=[0], rounds=2, plots=False)
    assert len(calls) == 2 and (out / "cells" / f"{calls[-1]}.json").exists()


def test_the_process_pool_gives_the_same_cells(tmp_path, done):
    _, first = done
    pooled = matrix(tmp_path, rules=["fedavg"], attacks=["sign_flip"], seeds=[0, 1], workers=2, plots=False)
    want = {c["key"]: c for c in first["cells"] if c["rule"] == "fedavg" and c["attack"] == "sign_flip"}
    assert len(pooled["cells"]) == 2
    for c in pooled["cells"]:
        assert c["rounds"] == want[c["key"]]["rounds"]  # deterministic, same key = same config


@pytest.mark.parametrize("flag, value, word", [("--attacks", "sign_flip,not_an_attack", "not_an_attack"),
                                               ("--rules", "fedavg,nope", "nope")])
def test_an_unknown_name_exits_2_with_one_line(tmp_path, capsys, flag, value, word):
    assert main(["eval", flag, value, "--task", "synthetic", "--rounds", "2", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "one of:" in lines[0] and captured.out == ""
    assert not (tmp_path / "cells").exists()


def test_the_cli_flags_and_a_tiny_run(tmp_path, capsys):
    args = build_parser().parse_args(["eval", "--rules", "fedavg,krum", "--attacks", "ipm,none", "--fractions",
                                      "0.1,0.2", "--seeds", "0,1,2", "--rounds", "30", "--task", "fashion-mnist",
                                      "--detection", "ensemble,none", "--out", "D", "--workers", "1"])
    assert (args.rules, args.attacks, args.fractions, args.seeds, args.rounds, args.task, args.detection, args.out,
            args.workers) == ("fedavg,krum", "ipm,none", "0.1,0.2", "0,1,2", 30, "fashion-mnist", "ensemble,none",
                              "D", 1)
    assert main(["eval", "--rules", "fedavg", "--attacks", "none", "--detection", "none", "--seeds", "3",
                 "--rounds", "2", "--task", "synthetic", "--devices", "5", "--per-round", "3", "--workers", "1",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (cell,) = results["cells"]
    assert (cell["rule"], cell["detection"], cell["attack"], cell["seed"], len(cell["rounds"])) == (
        "fedavg", "none", "none", 3, 2)
    assert cell["simulation"]["num_devices"] == 5 and cell["simulation"]["per_round"] == 3
    assert "results.md" in capsys.readouterr().out

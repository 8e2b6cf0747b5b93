"""The demo's reading of the model audit from a version's metadata (fedguard.demo.audit_of): what each round line
and the summary say the audit did."""

from __future__ import annotations

from fedguard.demo import RoundLine, audit_of


def test_a_flagged_version_names_its_source_and_splits_the_quarantined_by_the_ledger():
    meta = {"rule_info": {"params_from": 4},
            "audit": {"verdict": "flagged", "attributed": ["dev-0001", "dev-0009"],
                      "screened": {"screened": ["dev-0002"]},
                      "look_back": {"screened": {"dev-0003": [6, 7], "dev-0001": [6]}, "served_from": 4}}}
    got = audit_of(meta, bad_devices={"dev-0001", "dev-0002", "dev-0003"})
    # dev-0001 is attributed and found by the look-back: one device; dev-0009 is not in the ledger
    assert got == {"audit": "flagged", "served_from": 4, "audit_attackers": 3, "audit_honest": 1,
                   "attackers_screened": 1}
    RoundLine(round=7, version=7, members=10, accepted=9, rejected=0, accuracy=0.8, loss=0.5, seconds=1.0, **got)


def test_a_clean_version_served_as_made_reports_only_its_screening():
    meta = {"rule_info": {}, "audit": {"verdict": "clean", "screened": {"screened": ["dev-0005"]}}}
    assert audit_of(meta, bad_devices={"dev-0005"}) == {"audit": "clean", "served_from": None,
                                                         "audit_attackers": 1, "audit_honest": 0,
                                                         "attackers_screened": 1}


def test_a_version_without_an_audit_or_with_it_off():
    assert audit_of({}, set()) == {"audit": None, "served_from": None, "audit_attackers": 0, "audit_honest": 0,
                                   "attackers_screened": 0}
    skipped = {"audit": {"verdict": "skipped", "why": "audit off"}, "rule_info": {"params_from": 3}}
    assert audit_of(skipped, set())["served_from"] is None  # only a flag withholds the candidate

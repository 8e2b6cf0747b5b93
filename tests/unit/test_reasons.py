"""The reason-code enumeration: one place, distinct codes, every code documented (issue 3, item 5)."""

from pathlib import Path

from fedguard import cli
from fedguard.reasons import MEANINGS, Reason, markdown_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "reason-codes.md"


def test_codes_are_distinct_lowercase_identifiers():
    values = [r.value for r in Reason]
    assert len(values) == len(set(values))
    assert all(v.isidentifier() and v == v.lower() for v in values)


def test_every_code_has_a_stage_and_a_meaning():
    assert set(MEANINGS) == set(Reason)
    assert all(r.stage and len(r.meaning) > 10 for r in Reason)


def test_the_doc_carries_the_generated_table_and_lists_every_code():
    text = DOC.read_text()
    assert markdown_table() in text, "docs/reason-codes.md is out of date: paste `fedguard reasons --markdown`"
    for reason in Reason:
        assert f"| `{reason.value}` |" in text


def test_revocation_rate_limits_and_codec_have_their_own_codes():
    assert {"revoked", "quarantined", "rate_limited", "ingress_limited", "unsupported_codec",
            "internal_error"} <= {r.value for r in Reason}


def test_cli_prints_every_code(capsys):
    assert cli.main(["reasons"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == [r.value for r in Reason]
    assert cli.main(["reasons", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table()


def test_rejected_summary_counts_by_code_and_shows_the_last_records():
    rows = [{"reason": "replay", "detail": f"sequence {i}", "rejected_at": i, "raw": {"partition": 0, "offset": i},
             "device_id": "dev-0001", "authenticated": True} for i in range(5)]
    rows.append({"reason": "malformed", "detail": "bad magic", "rejected_at": 10, "raw": {"partition": 1, "offset": 0},
                 "device_id": None, "authenticated": False})
    text = cli.summarize_rejected(rows, last=2)
    assert text.splitlines()[0] == "6 rejected records"
    counts = {line.split()[0]: int(line.split()[1]) for line in text.splitlines()[2:4]}
    assert counts == {"replay": 5, "malformed": 1}
    tail = text.split("last 2:")[1]
    assert "sequence 4" in tail and "bad magic" in tail and "sequence 3" not in tail
    assert "dev-0001 " in tail and "-?" in tail  # authenticated vs claimed device ids

"""The alert rules' unit tests (monitoring/tests/alerts.test.yml) run through ``promtool test rules``, and cover
every alert of monitoring/alerts.yml both firing and staying quiet.

Rules that count histogram observations above a threshold subtract the bucket ``le="<threshold>"``: a threshold
that is not one of the histogram's buckets selects nothing and the alert could never fire, which promtool's tests
(fed hand-written series) would not notice. So each such ``le`` is checked against the buckets the code declares.

``promtool`` comes with the Debian package ``prometheus``: missing, these tests skip on a developer's machine and
fail under CI (tests/unit/test_monitoring.py).
"""

from __future__ import annotations

import ast
import re

from tests.unit.test_monitoring import ALERTS_YML, MONITORING, ROOT, SERVICE_PACKAGES, load_yaml, promtool

ALERT_TESTS_YML = MONITORING / "tests" / "alerts.test.yml"


def alert_names() -> list[str]:
    return [rule["alert"] for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"] if "alert" in rule]


def alert_cases() -> list[dict]:
    return [case for test in load_yaml(ALERT_TESTS_YML)["tests"] for case in test.get("alert_rule_test", [])]


def test_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass():
    result = promtool("test", "rules", str(ALERT_TESTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_load_the_repository_rules():
    (rule_file,) = load_yaml(ALERT_TESTS_YML)["rule_files"]
    assert (ALERT_TESTS_YML.parent / rule_file).resolve() == ALERTS_YML.resolve()


def test_every_alert_is_tested_firing_and_quiet():
    cases = alert_cases()
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    names = alert_names()
    assert len(names) == len(set(names)), "duplicate alert names in alerts.yml"
    assert not set(names) - firing, f"no test where these alerts fire: {sorted(set(names) - firing)}"
    assert not set(names) - quiet, f"no test where these alerts stay quiet: {sorted(set(names) - quiet)}"
    unknown = (firing | quiet) - set(names)
    assert not unknown, f"tests of alerts that do not exist: {sorted(unknown)}"


# -- histogram thresholds are buckets ------------------------------------------------------------------------------

def _literal_buckets(node: ast.AST, assignments: dict[str, ast.AST]) -> tuple[float, ...]:
    """The value of a ``buckets=`` argument: a literal, or a module-level name bound to one."""
    if isinstance(node, ast.Name) and node.id in assignments:
        node = assignments[node.id]
    return tuple(float(b) for b in ast.literal_eval(node))


def declared_histogram_buckets(names: set[str]) -> dict[str, tuple[float, ...]]:
    """name -> buckets of each ``Histogram("name", ..., buckets=...)`` among ``names`` in the services and the core."""
    found = {}
    for package in SERVICE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            assignments = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                           for target in node.targets if isinstance(target, ast.Name)}
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                        == "Histogram" and node.args and isinstance(node.args[0], ast.Constant)
                        and node.args[0].value in names):
                    continue
                buckets = next((k.value for k in node.keywords if k.arg == "buckets"), None)
                found[node.args[0].value] = (_literal_buckets(buckets, assignments) if buckets is not None
                                             else (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5,
                                                   10.0))  # prometheus_client's default buckets
    return found


def bucket_thresholds(expr: str) -> list[tuple[str, str]]:
    """(histogram name, le) of every ``<name>_bucket{... le="x" ...}`` selector in a PromQL expression."""
    return [(name, le) for name, matchers in re.findall(r"\b([a-zA-Z_:][\w:]*)_bucket\s*\{([^}]*)\}", expr)
            for le in re.findall(r'\ble\s*=\s*"([^"]+)"', matchers)]


def test_bucket_thresholds_lexer():
    assert bucket_thresholds('sum(increase(a_bucket{le="+Inf"}[5m])) - b_bucket{job="x", le="0.2"}') == [
        ("a", "+Inf"), ("b", "0.2")]


def test_alert_thresholds_on_histograms_are_declared_buckets():
    used = [(rule["alert"], name, le) for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]
            if "alert" in rule for name, le in bucket_thresholds(rule["expr"])]
    declared = declared_histogram_buckets({name for _, name, _ in used})
    assert used, "no alert uses a histogram bucket any more: drop this test"
    problems = []
    for alert, name, le in used:
        if name not in declared:
            problems.append(f"{alert}: no Histogram({name!r}) is declared in the code")
        elif le != "+Inf" and float(le) not in declared[name]:
            problems.append(f"{alert}: {name} has no bucket le={le} (buckets {declared[name]})")
    assert not problems, problems

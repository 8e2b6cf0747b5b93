"""compose.yaml's values that nothing else checks before a user runs `docker compose up`."""

import base64
import re
from pathlib import Path

import yaml

from aggregator.rules import RULES
from fedguard.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def test_kraft_cluster_id_is_what_kafka_storage_format_accepts():
    # Kafka's Uuid.fromString: URL-safe base64 of 16 bytes without padding, i.e. exactly 22 characters.
    cluster_id = yaml.safe_load(COMPOSE.read_text())["services"]["kafka"]["environment"]["CLUSTER_ID"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id), cluster_id
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_every_rule_compose_names_exists_and_the_default_is_the_safe_one():
    text = COMPOSE.read_text()
    named = set(re.findall(r"FEDGUARD_RULE=(\w+)", text)) | set(re.findall(r"FEDGUARD_RULE:-(\w+)", text))
    assert named, "compose.yaml names no rule"
    assert named <= set(RULES), f"rules compose.yaml names that do not exist: {named - set(RULES)}"
    assert re.search(r"FEDGUARD_RULE: \$\{FEDGUARD_RULE:-robust_lr\}", text), "compose's default must be robust_lr"
    assert Settings.rule == "robust_lr"

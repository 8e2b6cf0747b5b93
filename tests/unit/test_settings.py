from pathlib import Path

from fedguard.settings import Settings, from_env, to_env


def test_defaults_avoid_standard_ports():
    s = Settings()
    assert s.kafka_bootstrap == "127.0.0.1:19092" and s.redis_url == "redis://127.0.0.1:16379/0"
    assert s.window_size == s.devices_per_round == 10


def test_addresses_follow_ports_unless_given():
    s = Settings().with_overrides(broker_port=1234, redis_port=5678, devices_per_round=4)
    assert s.kafka_bootstrap == "127.0.0.1:1234" and s.redis_url == "redis://127.0.0.1:5678/0"
    assert s.window_size == 4
    explicit = Settings(kafka_bootstrap="kafka:9092", window_size=7).with_overrides(broker_port=1, devices_per_round=3)
    assert explicit.kafka_bootstrap == "kafka:9092" and explicit.window_size == 7


def test_env_round_trip():
    s = Settings(task="digits", data_dir=Path("/tmp/x"), window_deadline_s=2.5, devices_per_round=3)
    back = from_env(to_env(s))
    assert back == s


def test_standard_variables_win():
    s = from_env({"KAFKA_BOOTSTRAP_SERVERS": "k:1", "REDIS_URL": "redis://r:2/0", "FEDGUARD_TOPIC_RAW": "raw2"})
    assert s.kafka_bootstrap == "k:1" and s.redis_url == "redis://r:2/0" and s.topics.raw == "raw2"

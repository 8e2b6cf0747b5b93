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


def test_model_hidden_widths():
    import pytest

    from fedguard.settings import Settings
    from fedguard.tasks.models import model_spec

    assert Settings().hidden_widths() is None
    assert Settings(model_hidden="126").hidden_widths() == (126,)
    assert Settings(model_hidden="256, 64").hidden_widths() == (256, 64)
    assert model_spec("fashion-mnist", Settings(model_hidden="126").hidden_widths()).num_params == 100_180
    for bad in ("a", "0", "12,-1"):
        with pytest.raises(ValueError, match="FEDGUARD_MODEL_HIDDEN"):
            Settings(model_hidden=bad).hidden_widths()

"""Settings: defaults, RECLORA_* environment variables, and refusal of inconsistent values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No RECLORA_* variables or .env file from the machine running the tests."""
    import os
    for name in [n for n in os.environ if n.startswith("RECLORA_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults():
    s = Settings()
    assert (s.http.host, s.http.port, s.requests.max_candidates, s.requests.default_deadline_ms,
            s.requests.max_deadline_ms) == ("127.0.0.1", 8000, 100, 500, 10_000)
    assert s.history.history_max_events == 1000 and s.events.max_event_batch == 100 and s.model.engine == "torch"
    assert s.model.active_version is None and s.model.model_store == Path("model_store")
    assert s.logging.log_json is True and s.logging.log_level == "INFO"


def test_environment_variables_use_the_reclora_prefix(monkeypatch):
    monkeypatch.setenv("RECLORA_REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("RECLORA_MAX_CANDIDATES", "250")
    monkeypatch.setenv("RECLORA_ACTIVE_VERSION", "2025-01-01_crm-v3")
    monkeypatch.setenv("RECLORA_LOG_JSON", "false")
    monkeypatch.setenv("RECLORA_MODEL_STORE", "/srv/models")
    monkeypatch.setenv("RECLORA_TORCH_THREADS", "4")
    monkeypatch.setenv("MAX_CANDIDATES", "7")  # unprefixed: ignored
    s = get_settings()
    assert s.history.redis_url == "redis://cache:6380/2" and s.requests.max_candidates == 250
    assert s.model.active_version == "2025-01-01_crm-v3" and s.logging.log_json is False
    assert s.model.model_store == Path("/srv/models") and s.torch.torch_threads == 4
    assert get_settings() is s  # read once per process


def test_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("RECLORA_PORT=9100\n")
    assert Settings().http.port == 9100


@pytest.mark.parametrize("values,problem", [
    ({"rating_min": 5.0, "rating_max": 1.0}, "rating_min"),
    ({"default_deadline_ms": 2000, "max_deadline_ms": 1000}, "default_deadline_ms"),
    ({"redis_prefix": "a{b}"}, "braces"),
    ({"engine": "vllm"}, "vllm_url"),
    ({"engine": "tensorrt"}, "engine"),
    ({"active_version": "../escape"}, "active_version"),
    ({"max_candidates": 0}, "max_candidates"),
    ({"port": 70000}, "port"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"redis_timeout_s": 0}, "redis_timeout_s"),
])
def test_inconsistent_settings_are_refused(values, problem):
    with pytest.raises(ValidationError, match=problem):
        Settings(**values)


def test_vllm_engine_with_url():
    s = Settings(engine="vllm", vllm_url="http://vllm:8000")
    assert str(s.vllm.vllm_url) == "http://vllm:8000/"


def test_settings_are_immutable():
    with pytest.raises(ValidationError):
        Settings().http.port = 1


def test_admin_needs_a_token_digest():
    with pytest.raises(ValueError, match="no admin token"):
        Settings(admin_enabled=True)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Settings(admin_enabled=True, admin_token_sha256=["secret-in-clear"])
    assert Settings(admin_enabled=True, admin_token_sha256=["a" * 64]).admin.admin_enabled


def test_admin_token_matching_is_by_digest():
    from service.api.admin.auth import new_token, token_matches

    token, digest = new_token()
    assert token_matches(token, ["0" * 64, digest])
    assert not token_matches(token + "x", [digest])
    assert not token_matches(token, [])

"""Passwords of a process from its secret files (core.secrets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.secrets import ClientSecrets, with_redis_password, without_redis_password

PW = "0123456789abcdef-x/@"


def secrets_from(folder: Path, **files: str) -> ClientSecrets:
    for name, value in files.items():
        (folder / name).write_text(value + "\n")
    return ClientSecrets(_secrets_dir=folder)  # type: ignore[call-arg]


def test_nothing_set_means_plaintext_and_the_url_as_given(tmp_path: Path) -> None:
    s = secrets_from(tmp_path)
    assert s.kafka() == {}
    assert s.redis_url("redis://redis:6379/0") == "redis://redis:6379/0"


def test_files_give_sasl_arguments_and_the_redis_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKSCALE_KAFKA_USERNAME", "handler")
    s = secrets_from(tmp_path, tickscale_kafka_password=PW, tickscale_redis_password=PW)
    assert s.kafka() == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "handler",
        "sasl_plain_password": PW,
    }
    url = s.redis_url("redis://redis:6379/0")
    assert url == "redis://:0123456789abcdef-x%2F%40@redis:6379/0"
    assert without_redis_password(url) == "redis://redis:6379/0"
    # A URL that carries its own password keeps it.
    assert with_redis_password("redis://:own@r:1/0", PW) == "redis://:own@r:1/0"
    assert PW not in repr(s)


@pytest.mark.parametrize("value", ["change-me", "password", "", "short"])
def test_placeholders_are_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValidationError, match="redis_password"):
        secrets_from(tmp_path, tickscale_redis_password=value)


def test_a_kafka_password_without_a_user_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        secrets_from(tmp_path, tickscale_kafka_password=PW)

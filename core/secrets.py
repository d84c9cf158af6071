"""Passwords of a process, read from secret files (``/run/secrets``), never from its command line.

One model for every tickscale process (handler, scaler, replay, verify, topics,
load test): each runs as one principal, so it holds at most one Kafka identity
and one Redis password. In the compose and Swarm stacks Docker mounts them as
files named after the setting (``tickscale_redis_password``,
``tickscale_kafka_password``); pydantic-settings reads them from there. With
nothing set, clients connect as before: PLAINTEXT Kafka, Redis as its URL says.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRETS_DIR = "/run/secrets"
SASL_MECHANISM = "SCRAM-SHA-512"
# Values people leave in example files; refused so they never reach a real stack.
_PLACEHOLDERS = {"change-me", "changeme", "change_me", "password", "secret", "admin", "redis",
                 "kafka", "tickscale", "example", "placeholder", "xxx", "todo"}  # fmt: skip
MIN_PASSWORD_LEN = 16


def secrets_dir() -> str | None:
    """Where the secret files are (TICKSCALE_SECRETS_DIR, else /run/secrets), if there."""
    path = os.environ.get("TICKSCALE_SECRETS_DIR") or SECRETS_DIR
    return path if Path(path).is_dir() else None


def check_password(v: SecretStr | None) -> SecretStr | None:
    if v is None:
        return None
    value = v.get_secret_value()
    if value.lower() in _PLACEHOLDERS or len(value) < MIN_PASSWORD_LEN:
        raise ValueError(
            f"a placeholder or too short (at least {MIN_PASSWORD_LEN} characters): put a "
            "random value in its secret file, e.g. `openssl rand -hex 24` (docs/security.md)"
        )
    return v


class ClientSecrets(BaseSettings):
    """``TICKSCALE_KAFKA_USERNAME``; the passwords as the files ``tickscale_kafka_password``
    and ``tickscale_redis_password`` in the secrets folder."""

    model_config = SettingsConfigDict(env_prefix="TICKSCALE_", extra="ignore")

    kafka_username: str | None = Field(None, description="SASL/SCRAM user; unset = PLAINTEXT")
    kafka_password: SecretStr | None = None
    redis_password: SecretStr | None = None

    _passwords = field_validator("kafka_password", "redis_password")(check_password)

    @model_validator(mode="after")
    def _pair(self) -> Self:
        if (self.kafka_username is None) != (self.kafka_password is None):
            raise ValueError(
                "kafka_username and the secret file tickscale_kafka_password go together"
            )
        return self

    def kafka(self) -> dict[str, Any]:
        """aiokafka client arguments: SASL/SCRAM when a user is set, else none."""
        if self.kafka_username is None or self.kafka_password is None:
            return {}
        return {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": SASL_MECHANISM,
            "sasl_plain_username": self.kafka_username,
            "sasl_plain_password": self.kafka_password.get_secret_value(),
        }

    def redis_url(self, url: str) -> str:
        """``url`` with the Redis password, unless it carries one already."""
        if self.redis_password is None:
            return url
        return with_redis_password(url, self.redis_password.get_secret_value())


@functools.cache
def client_secrets() -> ClientSecrets:
    """This process's secrets, read once; ValidationError names the bad one."""
    return ClientSecrets(_secrets_dir=secrets_dir())


def kafka_auth() -> dict[str, Any]:
    """What every Kafka client of this process adds to its arguments."""
    return client_secrets().kafka()


def with_redis_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or parts.password:
        return url
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def without_redis_password(url: str) -> str:
    """``url`` with no password in it: what may be written into another's environment."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

"""The compose stack's password files: which there are, and making the missing ones.

Each password is one file in the stack's SECRETS_DIR (compose/.env), mounted
read-only as a Docker secret into the services that need it. Made here with
random values: the folder readable by its owner only, the files readable by
the containers' own users (redis, Kafka's, tickscale's 10001), which a bind
mount does not remap.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# Every secret of compose/docker-compose.yml (a test checks the two agree).
STACK_SECRETS = (
    "redis_password",
    "grafana_admin_password",
    "kafka_admin_password",
    "kafka_replay_password",
    "kafka_handler_password",
    "kafka_scaler_password",
    "kafka_verify_password",
    "kafka_loadtest_password",
)


def make_secrets(folder: Path) -> list[str]:
    """Write a random password into each missing file; never touches an existing one.

    Returns the names written."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    made: list[str] = []
    for name in STACK_SECRETS:
        path = folder / name
        if path.exists():
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")
        path.chmod(0o444)
        made.append(name)
    return made

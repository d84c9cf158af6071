"""A broker with SASL/SCRAM-SHA-512 and ACLs, for the ACL tests.

The usual local broker (tickscale.localstack.kafka) plus a SASL_PLAINTEXT
listener and the KRaft authorizer. Its PLAINTEXT listener stays, for the
harness only: it is the super user there (ANONYMOUS), creates the topics, the
SCRAM users and the ACLs of compose/kafka/acls.txt. Principals under test only
ever connect to the SASL listener.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from tickscale.localstack.kafka import KafkaBroker, run_tool
from tickscale.localstack.net import HOST, free_port

ACLS = Path(__file__).resolve().parent.parent / "compose" / "kafka" / "acls.txt"
PRINCIPALS = ("replay", "handler", "scaler", "verify", "loadtest")
MECHANISM = "SCRAM-SHA-512"


def sasl_broker(data_dir: Path) -> tuple[KafkaBroker, int]:
    """A started broker and its SASL port."""
    port, ctrl, sasl = free_port(), free_port(), free_port()
    config = {
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{ctrl},SASL://{HOST}:{sasl}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port},SASL://{HOST}:{sasl}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
        "SASL:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": MECHANISM,
        "listener.name.sasl.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": "User:ANONYMOUS",
        "allow.everyone.if.no.acl.found": False,
    }  # fmt: skip
    broker = KafkaBroker(data_dir, port=port, controller_port=ctrl, config=config)
    broker.start()
    return broker, sasl


def tool(main_class: str, args: list[str]) -> str:
    r = run_tool(main_class, args)
    if r.returncode != 0:
        raise RuntimeError(f"{main_class} {args} failed: {r.stdout}\n{r.stderr}")
    return r.stdout


def add_user(bootstrap: str, name: str, password: str) -> None:
    tool("kafka.admin.ConfigCommand", [
        "--bootstrap-server", bootstrap, "--alter", "--entity-type", "users",
        "--entity-name", name, "--add-config", f"{MECHANISM}=[iterations=4096,password={password}]",
    ])  # fmt: skip


def apply_acls(bootstrap: str) -> int:
    """Every grant of compose/kafka/acls.txt; returns how many lines were applied."""
    n = 0
    for line in ACLS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            tool("org.apache.kafka.tools.AclCommand", ["--bootstrap-server", bootstrap, "--add",
                                              *shlex.split(line)])  # fmt: skip
            n += 1
    return n

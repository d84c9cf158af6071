#!/bin/bash
# The kafka-setup job, as User:admin: each principal's SCRAM password from its
# secret file (set again on every run, so a rotated file takes effect on the
# next `up`), then every grant of acls.txt (adding one twice is a no-op).
# Passwords go to the tools in files private to this container, never argv.
set -euo pipefail
umask 077
# The tools' classes through kafka-run-class.sh, which the public image and
# the stand-in both have (the stand-in lacks the kafka-configs/acls wrappers).
run=/opt/kafka/bin/kafka-run-class.sh
bootstrap=kafka:9092

password() {
    local v
    v="$(cat "/run/secrets/kafka_$1_password")"
    if [ "${#v}" -lt 16 ]; then
        echo "error: the secret file kafka_$1_password in SECRETS_DIR is empty or shorter than 16 characters: put a random password in it (tickscale secrets, or openssl rand -hex 24)" >&2
        exit 2
    fi
    printf '%s' "$v"
}

admin=/tmp/admin.properties
printf 'security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="%s";\n' \
    "$(password admin)" >"$admin"

for user in replay handler scaler verify loadtest; do
    printf 'SCRAM-SHA-512=iterations=8192,password=%s\n' "$(password "$user")" >/tmp/scram.properties
    "$run" kafka.admin.ConfigCommand --bootstrap-server "$bootstrap" --command-config "$admin" --alter \
        --entity-type users --entity-name "$user" --add-config-file /tmp/scram.properties
done
rm -f /tmp/scram.properties

grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' /etc/tickscale/kafka/acls.txt | while read -r line; do
    # shellcheck disable=SC2086  # one acls.txt line: its words are the arguments
    "$run" org.apache.kafka.tools.AclCommand --bootstrap-server "$bootstrap" --command-config "$admin" --add $line >/dev/null
done
echo "kafka-setup: SCRAM users and ACLs in place"

#!/bin/bash
# The kafka service's start: the broker's config with its own SCRAM login (as
# User:admin, from the admin password file) in a private copy, the storage
# formatted on first start with the admin user already in it (no-op after),
# then the broker. The password reaches no environment and no image.
set -euo pipefail
umask 077
pw="$(cat /run/secrets/kafka_admin_password)"
if [ "${#pw}" -lt 16 ]; then
    echo "error: the secret file kafka_admin_password in SECRETS_DIR is empty or shorter than 16 characters: put a random password in it (tickscale secrets, or openssl rand -hex 24)" >&2
    exit 2
fi
conf=/tmp/server.properties
cp /etc/tickscale/kafka/server.properties "$conf"
login="org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"$pw\";"
printf 'listener.name.internal.scram-sha-512.sasl.jaas.config=%s\n' "$login" >>"$conf"
# The health check's client settings (kafka-broker-api-versions.sh), readable by this user only.
printf 'security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\nsasl.jaas.config=%s\n' \
    "$login" >/tmp/admin.properties
/opt/kafka/bin/kafka-storage.sh format --ignore-formatted -t "$KAFKA_CLUSTER_ID" -c "$conf" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$pw]"
exec /opt/kafka/bin/kafka-server-start.sh "$conf" \
    --override "advertised.listeners=INTERNAL://kafka:9092,EXTERNAL://localhost:${KAFKA_EXTERNAL_PORT}"

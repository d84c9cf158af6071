#!/bin/bash
# Default command: a single combined KRaft node on config/server.properties, the
# storage formatted on first start (what the public image does with no KAFKA_* env).
set -euo pipefail
props=${KAFKA_SERVER_PROPERTIES:-/opt/kafka/config/server.properties}
cluster_id=${CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}
/opt/kafka/bin/kafka-storage.sh format --ignore-formatted -t "$cluster_id" -c "$props"
exec /opt/kafka/bin/kafka-server-start.sh "$props"

"""``python -m tickscale.gate``: run the gate with its TICKSCALE_GATE_* settings."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from pydantic import ValidationError

from tickscale.gate.server import GateServer
from tickscale.gate.settings import GateSettings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        # Every setting from the environment (mypy sees required fields as arguments).
        settings = GateSettings(**{})
    except ValidationError as e:
        err = e.errors()[0]
        where = "_".join(str(x) for x in err["loc"]).upper()
        print(f"error: TICKSCALE_GATE_{where}: {err['msg']}" if where else f"error: {err['msg']}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        server = GateServer(settings)
    except OSError as e:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        return 2
    # shutdown() must come from another thread than serve_forever's.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    host, port = server.server_address[:2]
    logging.info(
        "gate on %s:%s for image %s, fleet %s (%s mode), engine %s",
        host, port, settings.image, settings.fleet, settings.mode, settings.engine_socket,
    )  # fmt: skip
    with server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A Docker API gate: the only way the scaler reaches the engine in compose/.

It sits between the scaler and the Docker socket and lets through only what
running handlers needs (see :mod:`tickscale.gate.policy`); everything else is
answered 403 with the reason. A tool of the stack: it imports nothing of
ingest or scaler, only the shared label names.
"""

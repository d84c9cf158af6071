"""The bottom layer: what the handler, the replay, the scaler and the command line share.

Nothing here imports ``ingest``, ``scaler`` or ``tickscale``."""

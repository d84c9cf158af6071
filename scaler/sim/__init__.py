"""The offline simulator's parts: measured pauses, the suite's day shapes, the suite runner."""

"""``tickscale loadtest``: replay a market day through a running stack and judge the result.

One concern per module:

- ``scenarios``: named parts of the day, speeds and the flash burst, resolved to a replay plan;
- ``feed``: the replay child process (the project's publisher, with a speed profile);
- ``stack``: Kafka, Redis, per-run topics and the scaler child, started or reused;
- ``scaler_proc``: the scaler command with the hook the scale-in drill needs;
- ``chaos``: faults injected at a time offset (kill a handler or the scaler, scale in, stop,
  kill or pause the broker, stop or kill Redis);
- ``procs``: the run's handler processes as ``/proc`` shows them (counted and killed by that);
- ``watch``: the fail-fast when the group has no members while records wait;
- ``latency``: the handlers' end-to-end histograms, scraped and merged across handlers;
- ``sampler``: one sample a second of lag, rates, handler counts and latency;
- ``ledger``: every tick checked against the replay manifest (``ingest.verify``);
- ``slo``: thresholds, percentiles, recovery times, handler-seconds;
- ``results``: the JSON a run writes and ``compare`` reads;
- ``report``: charts and the self-contained HTML report;
- ``runner``: one run, start to verdict, with live progress;
- ``suite``: ``--suite reliability``, every drill and bad input as short runs, one table;
- ``cli``: the Typer app mounted as ``tickscale loadtest``.
"""

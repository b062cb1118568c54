"""The engine's decisions by use case, as synchronous functions over the fleet in memory.

A decision (a version report, a progress report, a hand-out, a batch start, a reload, a
timeout, a retry, a cancel) reads and changes the `LiveFleet` (live.py) and queues the
messages to send. It never awaits, so no other decision runs in the middle of one and no
locks are needed. The caller (otacore/engine.py) commits what changed before sending what
names it.

- live.py: the live catalog and fleet state every decision works on, and `Send`
- assignment.py: what a device gets now (`assignment_for`), and handing it out (push, ask)
- reports.py: what devices report (versions, progress)
- batches.py: batches starting and stopping (reload, verification, the abort halt)
- admin.py: retry, cancel, pause, resume
- ticks.py: what time moves (rollout waves, windows, rates, retries; job timeouts)
"""

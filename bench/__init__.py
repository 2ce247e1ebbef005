"""
The benchmark harness of hsu-registry (issue 4).

``python -m bench`` starts the installed daemon and a bare twisted.web
reference as subprocesses, loads them with ``wrk`` (where installed) or the
built-in Python load generator, and prints a table (and writes JSON) of
throughput and latency, publish on the memory and the SQLite store (hammered
by closed-loop generators, and by 64 publishers at a fixed rate, open loop),
memory, start-up time, cleanup lag, the garbage collector's pauses,
watch fan-out (SSE watchers and held blocking queries), process liveness
(``kill -9`` of a module to its removal, and what tracking thousands of
process-bound registrations costs) and active health checks (what checking
a thousand APIs every second costs the daemon and its discover latency, and
that a hung service does not pile checks up).  Throughput is also given as
a ratio to the reference measured in the same run (and SQLite publish as a
ratio to the memory store's): the machine is shared and noisy, so those
ratios are what to compare across commits.

One module per job: ``workload`` (request bodies), ``stats``, ``probe``
(blocking HTTP for set-up and checks), ``daemon`` (processes), ``loadgen``
(the Python load generator), ``wrk``, ``reference``, ``bare_klein``,
``throughput``, ``store``, ``memory``, ``startup``, ``cleanup``, ``gcpause``,
``fanout``, ``liveness``, ``checks``, ``report`` and ``__main__`` (the
command line).  ``latency`` is an older, simpler loop.

Importing this package imports nothing else (no reactor, no hsu_registry).
"""

__all__: list[str] = []

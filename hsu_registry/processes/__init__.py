"""
Process-bound registrations: who is on the other end of a unix socket
(L{peers}), which process a PID names right now (L{table}), and a watch that
calls back the moment a process exits (L{monitor}).

A registration bound to a process is identified by PID I{and} start time, so
a new process that happens to get the same PID cannot keep a dead module's
registration alive.
"""

from hsu_registry.processes.monitor import ProcessMonitor
from hsu_registry.processes.peers import peer_pid
from hsu_registry.processes.table import ProcessIdentity, ProcessStat, ProcTable

__all__ = ["ProcTable", "ProcessIdentity", "ProcessMonitor", "ProcessStat", "peer_pid"]

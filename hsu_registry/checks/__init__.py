# -*- test-case-name: tests.test_checks -*-
"""
Opt-in active health checks of registered APIs.

An API entry of a publish body may carry a ``check`` object
(L{spec.parse_check}): the registry then connects to the API (TCP) or GETs a
path from it (HTTP) every ``interval``, and marks it passing or critical.
L{scheduler.CheckScheduler} decides when each target is probed (fairly
between identities), L{probes.tcp_probe} and L{probes.http_probe} do the
probing, and L{service.HealthCheckService} follows the registry and records
the results.

Checks connect on a publisher's behalf, so they are bounded (issue 12):
L{targets.CheckTargets} decides at publish time which addresses a check may
reach (L{addresses}) and resolves names once, L{limits.CheckLimits} bounds
what one identity may ask for, and answers only ever show the fixed
vocabulary of L{probes}.

This module imports only the check specification, which the data model
needs: the probes and the scheduler (and with them C{twisted.web.client})
are imported where they are used, so the command-line client stays light.
"""

from __future__ import annotations

from hsu_registry.checks.spec import CheckSpec, parse_check

__all__ = ["CheckSpec", "parse_check"]

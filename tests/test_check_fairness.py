"""
Tests for L{CheckScheduler}'s fairness between identities (issue 12): due
checks wait per owner and owners take turns; optionally each owner has a
rate of check starts (a token bucket) and a share of the concurrency.  All
on a L{task.Clock}, with probes the tests answer (or never answer).
"""

from __future__ import annotations

import random
from itertools import pairwise
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.checks.limits import DEFAULT_CHECK_LIMITS, CheckLimits
from hsu_registry.checks.probes import ProbeResult
from hsu_registry.checks.scheduler import CheckScheduler, Target
from hsu_registry.checks.spec import CheckSpec

FAST = CheckSpec("tcp", None, 1.0, 1.0)
HANG = CheckSpec("tcp", None, 60.0, 60.0)
NORMAL = CheckSpec("tcp", None, 10.0, 1.0)


def target(owner: str, module: str, index: int, spec: CheckSpec = FAST, port: int = 9) -> Target:
    return Target(module, index, "127.0.0.1", port, spec, owner)


class _Probes:
    """
    Records every check started (when, which); answers at once with
    C{refused} for owners in C{instant}, and never for the others.
    """

    def __init__(self, clock: Clock, instant: set[str]) -> None:
        self.clock = clock
        self.instant = instant
        self.started: list[tuple[float, Target]] = []

    def __call__(self, t: Target) -> Deferred[ProbeResult]:
        self.started.append((self.clock.seconds(), t))
        if t.owner in self.instant:
            return succeed(ProbeResult(False, "refused"))
        return Deferred()

    def of(self, owner: str) -> list[float]:
        return [when for when, t in self.started if t.owner == owner]


class FairnessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reports: list[tuple[Target, ProbeResult]] = []

    def scheduler(self, probe: Any, concurrency: int = 32, **kw: Any) -> CheckScheduler:
        scheduler = CheckScheduler(
            self.clock,
            probe,
            lambda t, r: self.reports.append((t, r)),
            concurrency,
            first_delay=kw.pop("first_delay", lambda t: 0.0),
            **kw,
        )
        self.addCleanup(scheduler.stop)
        return scheduler

    def production(self, probe: Any, concurrency: int = 32, **kw: Any) -> CheckScheduler:
        """A scheduler with the daemon's per-identity bounds."""
        limits = DEFAULT_CHECK_LIMITS
        return self.scheduler(
            probe,
            concurrency,
            owner_concurrency=limits.in_flight_per_identity(concurrency),
            owner_rate=limits.starts_per_second,
            owner_burst=limits.burst,
            **kw,
        )

    def test_ownersTakeTurns(self) -> None:
        """Due checks of two owners start alternately, FIFO within each owner."""
        probes = _Probes(self.clock, set())
        scheduler = self.scheduler(probes, concurrency=1)
        once = CheckSpec("tcp", None, 60.0, 1.0)  # not due again during the test
        scheduler.set_targets("a", [target("A", "a", i, once) for i in range(4)])
        scheduler.set_targets("b", [target("B", "b", i, once) for i in range(2)])
        self.clock.advance(0)
        for _ in range(5):
            self.clock.advance(1.0)  # each hung check times out and frees the slot
        order = [(t.owner, t.api_index) for _, t in probes.started]
        self.assertEqual(order, [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A", 2), ("A", 3)])

    def test_victimBehindAThousandBlackholedChecks(self) -> None:
        """
        One identity's 1 000 checks against a target that never answers
        (each hangs to its 60 s timeout) do not delay another identity's
        first check: it starts the moment it is due, within its interval
        plus timeout whatever the jitter, while the attacker never holds
        more than its share of the slots.
        """
        probes = _Probes(self.clock, {"uid:1000"})
        jitter = random.Random(12).random
        due = 0.4  # the victim's first check is due this long after its publish

        def first_delay(t: Target) -> float:
            return due if t.owner == "uid:1000" else jitter()

        scheduler = self.production(probes, first_delay=first_delay)
        for m in range(8):
            scheduler.set_targets(
                f"hole{m}", [target("uid:666", f"hole{m}", i, HANG) for i in range(125)]
            )
        self.clock.advance(2.0)  # every attacker check is due and waiting
        self.assertEqual(scheduler.owner_in_flight("uid:666"), 8)
        self.assertGreater(scheduler.queued, 900)
        published = self.clock.seconds()
        scheduler.set_targets("v", [target("uid:1000", "v", 0, NORMAL, port=8080)])
        for _ in range(110):
            self.clock.advance(0.1)
        victim_starts = probes.of("uid:1000")
        self.assertTrue(victim_starts)
        delay = victim_starts[0] - published
        self.assertAlmostEqual(delay, due, delta=0.1)
        self.assertLessEqual(delay, NORMAL.interval + NORMAL.timeout)
        # Checked every interval after that, the attacker notwithstanding.
        self.assertEqual(len(victim_starts), 2)
        self.assertLessEqual(scheduler.owner_in_flight("uid:666"), 8)

    def test_shareOfSlots(self) -> None:
        """
        An owner's hung checks hold at most its share of the concurrency;
        the rest stays free for others, who start at once.
        """
        probes = _Probes(self.clock, set())
        scheduler = self.scheduler(probes, concurrency=4, owner_concurrency=1)
        scheduler.set_targets("a", [target("A", "a", i, HANG) for i in range(10)])
        scheduler.set_targets("b", [target("B", "b", i, HANG) for i in range(10)])
        self.clock.advance(0)
        self.assertEqual(scheduler.in_flight, 2)
        self.assertEqual((scheduler.owner_in_flight("A"), scheduler.owner_in_flight("B")), (1, 1))
        scheduler.set_targets("c", [target("C", "c", 0, HANG)])
        self.clock.advance(0)
        self.assertEqual(scheduler.owner_in_flight("C"), 1)

    def test_ratePerOwner(self) -> None:
        """
        An owner starts at most C{burst} checks at once and then
        C{owner_rate} a second; another owner's checks are not held back.
        """
        probes = _Probes(self.clock, {"A", "B"})
        scheduler = self.scheduler(probes, owner_rate=4.0, owner_burst=2)
        scheduler.set_targets("a", [target("A", "a", i) for i in range(100)])
        self.clock.advance(0)
        self.assertEqual(len(probes.of("A")), 2)
        self.clock.advance(0.25)
        self.assertEqual(len(probes.of("A")), 3)
        scheduler.set_targets("b", [target("B", "b", i) for i in range(2)])
        self.clock.advance(0)
        self.assertEqual(len(probes.of("B")), 2)
        for _ in range(40):
            self.clock.advance(0.25)
        # 10.25 s after the start: the burst of 2 plus 4 a second.
        self.assertEqual(len(probes.of("A")), 2 + 41)
        gaps = {round(b - a, 6) for a, b in pairwise(probes.of("A")[2:])}
        self.assertEqual(gaps, {0.25})

    def test_productionRateAtOneTarget(self) -> None:
        """
        With the daemon's bounds, 1 024 checks of one identity at one
        host:port every second start at most 32 a second after the first
        burst (issue 12 measured 843 a second).
        """
        probes = _Probes(self.clock, {"uid:666"})
        scheduler = self.production(probes)
        for m in range(8):
            scheduler.set_targets(f"f{m}", [target("uid:666", f"f{m}", i) for i in range(128)])
        for _ in range(200):
            self.clock.advance(0.05)
        starts = probes.of("uid:666")
        self.assertLessEqual(len(starts), 32 + 10 * 32)
        late = [when for when in starts if when >= 5.0]
        self.assertLessEqual(len(late), 5 * 32 + 1)

    def test_idleOwnersLeaveNoTimer(self) -> None:
        """
        An owner waiting for its rate to allow a check has a timer; removing
        its checks cancels it, and nothing is left behind.
        """
        probes = _Probes(self.clock, {"A"})
        scheduler = self.scheduler(probes, owner_rate=1.0, owner_burst=1)
        scheduler.set_targets("a", [target("A", "a", i) for i in range(3)])
        self.clock.advance(0)
        self.assertEqual(len(probes.of("A")), 1)
        scheduler.remove("a")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((scheduler.queued, scheduler.in_flight, scheduler.scheduled), (0, 0, 0))

    def test_stopCancelsRefills(self) -> None:
        """stop() leaves no timer, owners' refills included."""
        probes = _Probes(self.clock, {"A"})
        scheduler = self.scheduler(probes, owner_rate=1.0, owner_burst=1)
        scheduler.set_targets("a", [target("A", "a", i) for i in range(3)])
        self.clock.advance(0)
        scheduler.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_targets(self) -> None:
        """targets(module_id) lists the module's current targets."""
        scheduler = self.scheduler(_Probes(self.clock, set()))
        mine = [target("A", "a", 0), target("A", "a", 1)]
        scheduler.set_targets("a", mine)
        self.assertEqual(scheduler.targets("a"), tuple(mine))
        self.assertEqual(scheduler.targets("nothing"), ())

    def test_badBounds(self) -> None:
        """Bounds that could never run a check are refused."""
        probe = _Probes(self.clock, set())
        for kw in ({"owner_concurrency": 0}, {"owner_rate": 0.0}, {"owner_burst": 0}):
            self.assertRaises(
                ValueError, CheckScheduler, self.clock, probe, lambda t, r: None, 32, None, **kw
            )

    def test_limitsShare(self) -> None:
        """An identity's share of the concurrency: a quarter by default, at least one."""
        self.assertEqual(DEFAULT_CHECK_LIMITS.in_flight_per_identity(32), 8)
        self.assertEqual(DEFAULT_CHECK_LIMITS.in_flight_per_identity(2), 1)
        self.assertEqual(CheckLimits(in_flight_share=1.0).in_flight_per_identity(5), 5)
        self.assertRaises(ValueError, CheckLimits, in_flight_share=0.0)

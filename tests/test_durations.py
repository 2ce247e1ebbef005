"""
Tests for L{hsu_registry.durations}: Go ``time.ParseDuration`` syntax in,
Go ``Duration.Round(time.Second).String()`` text out.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.durations import format_duration, parse_duration

_YEAR = 366 * 24 * 3600


class ParseDurationTests(SynchronousTestCase):
    """
    L{parse_duration} accepts Go's duration syntax, plus bare numbers as
    seconds, and refuses everything else with L{ValueError}.
    """

    def assertParses(self, text: str, expected: float) -> None:
        self.assertAlmostEqual(parse_duration(text), expected, places=12)

    def assertRefused(self, text: str) -> ValueError:
        return self.assertRaises(ValueError, parse_duration, text)

    def test_singleUnits(self) -> None:
        """
        Each of Go's units is understood.
        """
        self.assertParses("1h", 3600)
        self.assertParses("1m", 60)
        self.assertParses("1s", 1)
        self.assertParses("250ms", 0.25)
        self.assertParses("300us", 0.0003)
        self.assertParses("1500ns", 0.0000015)

    def test_microsecondVariants(self) -> None:
        """
        Go accepts ``us``, U+00B5 MICRO SIGN and U+03BC GREEK SMALL LETTER MU
        for microseconds.
        """
        self.assertParses("300us", 0.0003)
        self.assertParses("300\u00b5s", 0.0003)
        self.assertParses("300\u03bcs", 0.0003)

    def test_compound(self) -> None:
        """
        Several parts add up, as in Go.
        """
        self.assertEqual(parse_duration("1m30s"), 90.0)
        self.assertEqual(parse_duration("2h30m15s"), 9015.0)
        self.assertParses("1h1m1s1ms", 3661.001)
        self.assertParses("1s500ms", 1.5)

    def test_fractions(self) -> None:
        """
        Decimal fractions are allowed in any part, as in Go.
        """
        self.assertEqual(parse_duration("0.5s"), 0.5)
        self.assertEqual(parse_duration("1.5h"), 5400.0)
        self.assertEqual(parse_duration(".5s"), 0.5)
        self.assertEqual(parse_duration("1.s"), 1.0)
        self.assertParses("1.5m0.25s", 90.25)

    def test_zero(self) -> None:
        """
        Zero durations are accepted.
        """
        self.assertEqual(parse_duration("0"), 0.0)
        self.assertEqual(parse_duration("0s"), 0.0)
        self.assertEqual(parse_duration("0h0m0s"), 0.0)

    def test_bareNumbersAreSeconds(self) -> None:
        """
        A bare number, integral or not, is a number of seconds.
        """
        self.assertEqual(parse_duration("30"), 30.0)
        self.assertEqual(parse_duration("0.25"), 0.25)
        self.assertEqual(parse_duration("600"), 600.0)

    def test_leadingPlus(self) -> None:
        """
        A leading ``+`` is allowed, as in Go.
        """
        self.assertEqual(parse_duration("+5s"), 5.0)

    def test_returnsFloat(self) -> None:
        """
        The result is a L{float}, in seconds.
        """
        self.assertIsInstance(parse_duration("1m"), float)
        self.assertIsInstance(parse_duration("7"), float)

    def test_refusesEmpty(self) -> None:
        """
        An empty or blank string is not a duration.
        """
        self.assertRefused("")
        self.assertRefused("   ")

    def test_refusesNegative(self) -> None:
        """
        Negative durations are refused, with or without a unit.
        """
        for text in ["-1s", "-1", "-0.5", "-1m30s"]:
            self.assertIn("negative", str(self.assertRefused(text)), text)

    def test_refusesGarbage(self) -> None:
        """
        Unknown units, a unit without a number, a number without a unit after
        a unit, and other junk are refused.
        """
        for text in [
            "5x",
            "m",
            "s",
            "1m30",
            "1.5.5s",
            ".",
            ".s",
            "1 m",
            "1m 30s",
            "1S",
            "1H",
            "1d",
            "abc",
            "0x10",
            "1s-1s",
            "s1",
            "--1s",
            "++1s",
        ]:
            self.assertRefused(text)

    def test_refusesNaNAndInfinity(self) -> None:
        """
        Float specials accepted by Python's L{float} are not durations.
        """
        for text in ["nan", "NaN", "inf", "Infinity", "+inf", "-inf", "1e999"]:
            self.assertRefused(text)

    def test_refusesMoreThanAYear(self) -> None:
        """
        Anything longer than 366 days is refused; 366 days is the limit.
        """
        self.assertEqual(parse_duration("8784h"), float(_YEAR))
        self.assertEqual(parse_duration(str(_YEAR)), float(_YEAR))
        for text in ["8785h", "8784h1s", str(_YEAR + 1), "99999999h", "1" * 400 + "s"]:
            self.assertIn("year", str(self.assertRefused(text)), text)

    def test_refusesNonASCIIDigits(self) -> None:
        """
        Go's parser only knows ASCII digits; Python's C{\\d} and L{float}
        also accept other Unicode decimal digits, which must be refused.
        """
        # U+0661 ARABIC-INDIC DIGIT ONE, U+FF11 FULLWIDTH DIGIT ONE
        for text in ["\u0661m", "\u0661\u0662", "\uff11s", "1m\u0663s"]:
            self.assertRefused(text)

    def test_refusesUnderscoresInBareNumbers(self) -> None:
        """
        Go has no digit separators in durations; Python's L{float} accepts
        ``1_000``, which must be refused.
        """
        self.assertRefused("1_000")


class FormatDurationTests(SynchronousTestCase):
    """
    L{format_duration} writes what Go's C{Duration.Round(time.Second).String()}
    writes.
    """

    def test_zero(self) -> None:
        self.assertEqual(format_duration(0), "0s")
        self.assertEqual(format_duration(0.0), "0s")
        self.assertEqual(format_duration(0.4), "0s")

    def test_seconds(self) -> None:
        self.assertEqual(format_duration(1), "1s")
        self.assertEqual(format_duration(45), "45s")
        self.assertEqual(format_duration(59), "59s")

    def test_minutes(self) -> None:
        self.assertEqual(format_duration(60), "1m0s")
        self.assertEqual(format_duration(90), "1m30s")
        self.assertEqual(format_duration(3599), "59m59s")

    def test_hours(self) -> None:
        self.assertEqual(format_duration(3600), "1h0m0s")
        self.assertEqual(format_duration(3601), "1h0m1s")
        self.assertEqual(format_duration(9015), "2h30m15s")
        self.assertEqual(format_duration(100 * 3600), "100h0m0s")

    def test_seedUptime(self) -> None:
        """
        The seed's health example shows an uptime of ``2h30m15s``.
        """
        self.assertEqual(format_duration(2 * 3600 + 30 * 60 + 15), "2h30m15s")

    def test_roundsToNearestSecond(self) -> None:
        self.assertEqual(format_duration(59.6), "1m0s")
        self.assertEqual(format_duration(59.4), "59s")
        self.assertEqual(format_duration(3599.7), "1h0m0s")
        self.assertEqual(format_duration(1.2), "1s")

    def test_halfwayRoundsAwayFromZero(self) -> None:
        """
        Go's C{Duration.Round} rounds halfway values away from zero, so 0.5s
        is ``1s`` and 2.5s is ``3s`` (Python's L{round} rounds to even).
        """
        self.assertEqual(format_duration(0.5), "1s")
        self.assertEqual(format_duration(2.5), "3s")
        self.assertEqual(format_duration(59.5), "1m0s")

    def test_negative(self) -> None:
        """
        Negative durations (a clock going backwards) show as ``0s``.
        """
        self.assertEqual(format_duration(-5), "0s")
        self.assertEqual(format_duration(-0.4), "0s")
        self.assertEqual(format_duration(-3600), "0s")

    def test_returnsStr(self) -> None:
        self.assertIsInstance(format_duration(12.0), str)


class RoundTripTests(SynchronousTestCase):
    """
    What L{format_duration} writes, L{parse_duration} reads back.
    """

    @settings(max_examples=200, deadline=None)
    @given(st.integers(min_value=0, max_value=10**6))
    def test_wholeSecondsRoundTrip(self, n: int) -> None:
        self.assertEqual(parse_duration(format_duration(n)), n)

    @settings(max_examples=200, deadline=None)
    @given(
        st.integers(min_value=0, max_value=8783),
        st.integers(min_value=0, max_value=59),
        st.integers(min_value=0, max_value=59),
    )
    def test_goSyntaxParses(self, h: int, m: int, s: int) -> None:
        """
        Any ``XhYmZs`` within a year parses to its number of seconds.
        """
        self.assertEqual(parse_duration(f"{h}h{m}m{s}s"), h * 3600 + m * 60 + s)

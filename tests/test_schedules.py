"""Tests for the schedule engine.

Every expected fire time below is written out by hand (UTC), not computed by
the code under test. Offsets used:
  Europe/Berlin     CET = UTC+1, CEST = UTC+2
                    2026-03-29 01:00Z: 02:00 CET -> 03:00 CEST (gap 02:00-03:00)
                    2026-10-25 01:00Z: 03:00 CEST -> 02:00 CET (02:00-03:00 twice)
  America/New_York  EST = UTC-5, EDT = UTC-4
                    2026-03-08 07:00Z: 02:00 EST -> 03:00 EDT (gap 02:00-03:00)
                    2026-11-01 06:00Z: 02:00 EDT -> 01:00 EST (01:00-02:00 twice)
Calendar anchors: 2026-01-01 is a Thursday; 1997-08-05 (RFC 5545 examples) a Tuesday.
"""

import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from prefectlite import ScheduleError, validate_schedule, next_fire_times

UTC = timezone.utc


def utc(*parts):
    return datetime(*parts, tzinfo=UTC)


def fires(schedule, start, **kwargs):
    return next_fire_times(schedule, start, **kwargs)


def error_for(schedule):
    with pytest.raises(ScheduleError) as info:
        validate_schedule(schedule)
    return info.value


# --- validate_schedule: normalised output ---------------------------------


def test_interval_defaults_like_prefect():
    assert validate_schedule({"interval": 3600}) == {
        "interval": 3600.0,
        "anchor_date": "2020-01-01T00:00:00+00:00",
        "timezone": "UTC",
    }


def test_interval_keeps_anchor_from_prefect_trace():
    schedule = {
        "interval": 3600.0,
        "anchor_date": "2026-11-24T20:35:14.892831+00:00",
        "timezone": "UTC",
    }
    assert validate_schedule(schedule) == schedule


def test_interval_z_suffix_and_naive_anchor_in_schedule_timezone():
    assert (
        validate_schedule({"interval": 60, "anchor_date": "2026-01-01T00:00:00Z"})["anchor_date"]
        == "2026-01-01T00:00:00+00:00"
    )
    normalised = validate_schedule(
        {"interval": 86400, "anchor_date": "2026-03-01T09:00:00", "timezone": "America/New_York"}
    )
    assert normalised == {
        "interval": 86400.0,
        "anchor_date": "2026-03-01T09:00:00-05:00",
        "timezone": "America/New_York",
    }


def test_interval_fractional_and_numeric_string():
    assert validate_schedule({"interval": 0.5})["interval"] == 0.5
    assert validate_schedule({"interval": "90"})["interval"] == 90.0


def test_cron_defaults_keep_null_timezone_like_prefect():
    assert validate_schedule({"cron": "0 9 * * 1-5"}) == {
        "cron": "0 9 * * 1-5",
        "timezone": None,
        "day_or": True,
    }
    assert validate_schedule({"cron": "@daily", "timezone": "Europe/Berlin", "day_or": False}) == {
        "cron": "@daily",
        "timezone": "Europe/Berlin",
        "day_or": False,
    }


def test_rrule_timezone_defaults_to_utc():
    text = "DTSTART:20200101T000000\nRRULE:FREQ=DAILY;BYHOUR=9"
    assert validate_schedule({"rrule": text}) == {"rrule": text, "timezone": "UTC"}


@pytest.mark.parametrize(
    "schedule",
    [
        {"interval": 600, "anchor_date": "2026-05-01T10:00:00+02:00", "timezone": "Europe/Berlin"},
        {"cron": "*/5 * * * *", "timezone": "America/New_York", "day_or": True},
        {"rrule": "RRULE:FREQ=WEEKLY;BYDAY=MO", "timezone": "UTC"},
    ],
)
def test_validation_is_idempotent(schedule):
    once = validate_schedule(schedule)
    assert validate_schedule(once) == once


# --- validate_schedule: errors ----------------------------------------------


@pytest.mark.parametrize(
    "cron, words",
    [
        ("61 * * * *", ["minute", "61", "0-59"]),
        ("0 24 * * *", ["hour", "24", "0-23"]),
        ("0 0 0 * *", ["day-of-month", "0", "1-31"]),
        ("0 0 32 * *", ["day-of-month", "32"]),
        ("0 0 * 13 *", ["month", "13", "1-12"]),
        ("0 0 * * 8", ["day-of-week", "8", "0-7"]),
        ("* * *", ["3 fields", "expected 5"]),
        ("0 0 0 * * *", ["6 fields", "expected 5"]),
        ("*/0 * * * *", ["step"]),
        ("30-10 * * * *", ["range start is after its end"]),
        ("0 0 * * FOO", ["'FOO'", "day-of-week", "SUN"]),
        ("0 0 * FOO *", ["'FOO'", "month", "JAN"]),
        ("0 0 15W * *", ["nearest-weekday", "W"]),
        ("H * * * *", ["hashed", "H"]),
        ("R * * * *", ["random", "R"]),
        ("0 0 ? * *", ["'?'"]),
        ("0 0 * * 5L", ["'L'", "day-of-month"]),
        ("0 0 * * 1#6", ["'#'", "1 to 5"]),
        ("@reboot", ["@reboot", "macro"]),
        ("", ["0 fields"]),
    ],
)
def test_bad_cron_fields_name_the_problem(cron, words):
    exc = error_for({"cron": cron})
    assert exc.field == "cron"
    for word in words:
        assert word in exc.message
    assert str(exc).startswith("cron: ")


def test_unknown_timezone():
    exc = error_for({"cron": "0 9 * * *", "timezone": "Mars/Olympus_Mons"})
    assert exc.field == "timezone"
    assert "Mars/Olympus_Mons" in exc.message
    exc = error_for({"interval": 60, "timezone": "localtime"})
    assert exc.field == "timezone"
    exc = error_for({"rrule": "RRULE:FREQ=DAILY", "timezone": 5})
    assert exc.field == "timezone"


@pytest.mark.parametrize("interval", [0, -5, 0.0000001, "abc", True, None, float("nan"), [60]])
def test_bad_interval(interval):
    exc = error_for({"interval": interval})
    assert exc.field == "interval"
    assert exc.message


def test_bad_interval_messages():
    assert "positive" in error_for({"interval": 0}).message
    assert "positive" in error_for({"interval": -1}).message
    assert "number of seconds" in error_for({"interval": "abc"}).message


def test_bad_anchor_date():
    exc = error_for({"interval": 60, "anchor_date": "yesterday"})
    assert exc.field == "anchor_date"
    assert "'yesterday'" in exc.message


def test_bad_day_or():
    exc = error_for({"cron": "0 0 * * *", "day_or": "yes"})
    assert exc.field == "day_or"


@pytest.mark.parametrize(
    "schedule, field, words",
    [
        ({}, "schedule", ["exactly one of"]),
        ({"cron": "0 0 * * *", "rrule": "FREQ=DAILY"}, "schedule", ["'cron'", "'rrule'"]),
        ("0 0 * * *", "schedule", ["object"]),
        ({"cron": "0 0 * * *", "anchor_date": "2026-01-01"}, "anchor_date", ["unexpected"]),
        ({"interval": 60, "day_or": True}, "day_or", ["unexpected"]),
        ({"rrule": "FREQ=DAILY", "foo": 1}, "foo", ["unexpected"]),
        ({"cron": 5}, "cron", ["string"]),
    ],
)
def test_bad_shapes(schedule, field, words):
    exc = error_for(schedule)
    assert exc.field == field
    for word in words:
        assert word in exc.message


@pytest.mark.parametrize(
    "text, words",
    [
        ("RRULE:FREQ=YEARLY;BYWEEKNO=20", ["BYWEEKNO", "not supported"]),
        ("RRULE:FREQ=YEARLY;BYYEARDAY=100", ["BYYEARDAY", "not supported"]),
        ("RRULE:FREQ=DAILY;BYSECOND=30", ["BYSECOND", "not supported"]),
        ("RRULE:FREQ=YEARLY;BYEASTER=0", ["BYEASTER", "not supported"]),
        ("RRULE:FREQ=SECONDLY", ["SECONDLY", "not supported"]),
        ("DTSTART:20260101T000000\nRRULE:FREQ=DAILY\nEXDATE:20260102T000000", ["EXDATE"]),
        ("DTSTART:20260101T000000\nRRULE:FREQ=DAILY\nRDATE:20260102T000000", ["RDATE"]),
        ("RRULE:FREQ=DAILY\nEXRULE:FREQ=WEEKLY", ["EXRULE"]),
        ("RRULE:FREQ=DAILY\nRRULE:FREQ=WEEKLY", ["more than one RRULE"]),
        ("RRULE:FREQ=DAILY;FOO=1", ["unknown rule part", "FOO"]),
        ("RRULE:INTERVAL=2", ["FREQ is required"]),
        ("RRULE:FREQ=FORTNIGHTLY", ["FORTNIGHTLY"]),
        ("RRULE:FREQ=DAILY;COUNT=3;UNTIL=20260101T000000Z", ["COUNT and UNTIL"]),
        ("RRULE:FREQ=WEEKLY;BYDAY=1MO", ["ordinal", "MONTHLY or YEARLY"]),
        ("RRULE:FREQ=MONTHLY;BYDAY=MO,2TU", ["mixes"]),
        ("RRULE:FREQ=MONTHLY;BYDAY=6MO", ["ordinal 6", "±1..5"]),
        ("RRULE:FREQ=YEARLY;BYMONTH=13", ["BYMONTH", "13"]),
        ("RRULE:FREQ=MONTHLY;BYMONTHDAY=0", ["BYMONTHDAY", "0"]),
        ("RRULE:FREQ=DAILY;BYHOUR=24", ["BYHOUR", "24"]),
        ("RRULE:FREQ=DAILY;BYMINUTE=60", ["BYMINUTE", "60"]),
        ("RRULE:FREQ=DAILY;BYDAY=XX", ["BYDAY", "XX"]),
        ("RRULE:FREQ=DAILY;INTERVAL=0", ["INTERVAL", "0"]),
        ("RRULE:FREQ=DAILY;WKST=XY", ["WKST"]),
        ("DTSTART:2026-01-01\nRRULE:FREQ=DAILY", ["DTSTART", "2026-01-01"]),
        ("DTSTART:20260230T000000\nRRULE:FREQ=DAILY", ["not a valid date"]),
        ("DTSTART:20260101T000000", ["no RRULE"]),
        (
            "DTSTART:20260101T000100\nRRULE:FREQ=HOURLY;INTERVAL=2;BYHOUR=1",
            ["BYHOUR", "never reached"],
        ),
        ("RRULE:FREQ=DAILY;UNTIL=tomorrow", ["UNTIL"]),
        ("VEVENT:FOO", ["unknown property"]),
    ],
)
def test_bad_or_unsupported_rrule_names_the_part(text, words):
    exc = error_for({"rrule": text})
    assert exc.field == "rrule"
    for word in words:
        assert word in exc.message


def test_overlong_rrule():
    exc = error_for({"rrule": "RRULE:FREQ=DAILY" + " " * 7000})
    assert exc.field == "rrule"
    assert "6500" in exc.message


def test_next_fire_times_validates_too():
    with pytest.raises(ScheduleError):
        next_fire_times({"cron": "61 * * * *"}, utc(2026, 1, 1), n=1)


# --- next_fire_times: API contract ------------------------------------------


def test_results_are_aware_utc():
    result = fires({"cron": "0 9 * * *", "timezone": "Europe/Berlin"}, utc(2026, 1, 1), n=2)
    assert result == [utc(2026, 1, 1, 8), utc(2026, 1, 2, 8)]
    assert all(moment.tzinfo is UTC for moment in result)


def test_start_in_another_timezone():
    start = datetime(2026, 1, 1, 10, 0, tzinfo=ZoneInfo("Europe/Berlin"))  # 09:00Z
    assert fires({"cron": "0 * * * *"}, start, n=2) == [utc(2026, 1, 1, 9), utc(2026, 1, 1, 10)]


def test_start_is_inclusive_and_end_exclusive():
    schedule = {"interval": 3600}
    assert fires(schedule, utc(2026, 1, 1), end=utc(2026, 1, 1, 3)) == [
        utc(2026, 1, 1, 0),
        utc(2026, 1, 1, 1),
        utc(2026, 1, 1, 2),
    ]


def test_n_and_end_together():
    schedule = {"cron": "*/10 * * * *"}
    assert fires(schedule, utc(2026, 1, 1), end=utc(2026, 1, 1, 0, 25), n=2) == [
        utc(2026, 1, 1, 0, 0),
        utc(2026, 1, 1, 0, 10),
    ]
    assert fires(schedule, utc(2026, 1, 1), end=utc(2026, 1, 1, 0, 25), n=10) == [
        utc(2026, 1, 1, 0, 0),
        utc(2026, 1, 1, 0, 10),
        utc(2026, 1, 1, 0, 20),
    ]


def test_microseconds_in_start_round_up():
    assert fires({"cron": "* * * * *"}, utc(2026, 1, 1, 0, 0, 0, 500), n=1) == [utc(2026, 1, 1, 0, 1)]


def test_degenerate_requests():
    assert fires({"interval": 60}, utc(2026, 1, 1), n=0) == []
    assert fires({"interval": 60}, utc(2026, 1, 1), end=utc(2026, 1, 1)) == []
    with pytest.raises(ValueError):
        next_fire_times({"interval": 60}, utc(2026, 1, 1))
    with pytest.raises(ValueError):
        next_fire_times({"interval": 60}, datetime(2026, 1, 1), n=1)


def test_end_only_is_capped():
    result = fires({"interval": 1}, utc(2026, 1, 1), end=utc(2026, 1, 2))
    assert len(result) == 1000
    assert result[-1] == utc(2026, 1, 1, 0, 16, 39)


# --- cron --------------------------------------------------------------------


def test_cron_weekdays_by_number_and_name():
    # 2026-05-15 is a Friday
    expected = [utc(2026, 5, d, 9) for d in (18, 19, 20, 21, 22)]
    for cron in ("0 9 * * 1-5", "0 9 * * MON-FRI", "0 9 * * mon,tue,wed,thu,fri"):
        assert fires({"cron": cron}, utc(2026, 5, 15, 10), n=5) == expected


def test_cron_steps_ranges_lists():
    assert fires({"cron": "*/15 9-10 * * *"}, utc(2026, 1, 1, 9, 50), n=5) == [
        utc(2026, 1, 1, 10, 0),
        utc(2026, 1, 1, 10, 15),
        utc(2026, 1, 1, 10, 30),
        utc(2026, 1, 1, 10, 45),
        utc(2026, 1, 2, 9, 0),
    ]
    assert fires({"cron": "1-30/10 0 * * *"}, utc(2026, 1, 1), n=4) == [
        utc(2026, 1, 1, 0, 1),
        utc(2026, 1, 1, 0, 11),
        utc(2026, 1, 1, 0, 21),
        utc(2026, 1, 2, 0, 1),
    ]
    assert fires({"cron": "5/20 0 1 1 *"}, utc(2026, 1, 1), n=3) == [
        utc(2026, 1, 1, 0, 5),
        utc(2026, 1, 1, 0, 25),
        utc(2026, 1, 1, 0, 45),
    ]
    assert fires({"cron": "0 0 1,15 * *"}, utc(2026, 1, 2), n=3) == [
        utc(2026, 1, 15),
        utc(2026, 2, 1),
        utc(2026, 2, 15),
    ]


def test_cron_month_names_and_sunday_as_seven():
    assert fires({"cron": "0 0 1 JAN,jul *"}, utc(2026, 1, 2), n=3) == [
        utc(2026, 7, 1),
        utc(2027, 1, 1),
        utc(2027, 7, 1),
    ]
    sundays = [utc(2026, 1, 4), utc(2026, 1, 11)]
    assert fires({"cron": "0 0 * * 7"}, utc(2026, 1, 1), n=2) == sundays
    assert fires({"cron": "0 0 * * 0"}, utc(2026, 1, 1), n=2) == sundays
    assert fires({"cron": "0 0 * * SUN"}, utc(2026, 1, 1), n=2) == sundays


@pytest.mark.parametrize(
    "macro, expected",
    [
        ("@hourly", [utc(2026, 1, 1, 1), utc(2026, 1, 1, 2)]),
        ("@daily", [utc(2026, 1, 2), utc(2026, 1, 3)]),
        ("@midnight", [utc(2026, 1, 2), utc(2026, 1, 3)]),
        ("@weekly", [utc(2026, 1, 4), utc(2026, 1, 11)]),
        ("@monthly", [utc(2026, 2, 1), utc(2026, 3, 1)]),
        ("@yearly", [utc(2027, 1, 1), utc(2028, 1, 1)]),
        ("@annually", [utc(2027, 1, 1), utc(2028, 1, 1)]),
    ],
)
def test_cron_macros(macro, expected):
    assert fires({"cron": macro}, utc(2026, 1, 1, 0, 30), n=2) == expected


def test_cron_day_or_true_is_union():
    # the 13th OR any Friday; Fridays in Feb 2026: 6, 13, 20, 27; March 6
    assert fires({"cron": "0 0 13 * 5"}, utc(2026, 2, 1), n=5) == [
        utc(2026, 2, 6),
        utc(2026, 2, 13),
        utc(2026, 2, 20),
        utc(2026, 2, 27),
        utc(2026, 3, 6),
    ]


def test_cron_day_or_false_is_intersection():
    # Friday the 13th: in 2026 only February, March and November
    assert fires({"cron": "0 0 13 * 5", "day_or": False}, utc(2026, 1, 1), n=3) == [
        utc(2026, 2, 13),
        utc(2026, 3, 13),
        utc(2026, 11, 13),
    ]


def test_cron_day_or_ignored_when_one_side_is_star():
    assert fires({"cron": "0 0 13 * *", "day_or": True}, utc(2026, 1, 1), n=2) == [
        utc(2026, 1, 13),
        utc(2026, 2, 13),
    ]
    assert fires({"cron": "0 0 * * 5", "day_or": False}, utc(2026, 1, 1), n=2) == [
        utc(2026, 1, 2),
        utc(2026, 1, 9),
    ]


def test_cron_last_day_of_month_and_nth_weekday():
    assert fires({"cron": "0 12 L * *"}, utc(2026, 1, 1), n=4) == [
        utc(2026, 1, 31, 12),
        utc(2026, 2, 28, 12),
        utc(2026, 3, 31, 12),
        utc(2026, 4, 30, 12),
    ]
    assert fires({"cron": "0 12 L 2 *"}, utc(2027, 3, 1), n=1) == [utc(2028, 2, 29, 12)]
    # first Monday: Jan 5, Feb 2, Mar 2 (2026)
    assert fires({"cron": "0 8 * * 1#1"}, utc(2026, 1, 1), n=3) == [
        utc(2026, 1, 5, 8),
        utc(2026, 2, 2, 8),
        utc(2026, 3, 2, 8),
    ]


def test_cron_rare_dates_are_found_quickly():
    began = time.perf_counter()
    # February 29th falling on a Monday: 2044, then 2072
    assert fires({"cron": "0 0 29 2 1", "day_or": False}, utc(2026, 1, 1), n=2) == [
        utc(2044, 2, 29),
        utc(2072, 2, 29),
    ]
    assert fires({"cron": "0 0 1 1 *"}, utc(2026, 6, 1), n=3) == [
        utc(2027, 1, 1),
        utc(2028, 1, 1),
        utc(2029, 1, 1),
    ]
    assert time.perf_counter() - began < 1.0


@pytest.mark.parametrize(
    "cron, day_or",
    [
        ("0 0 30 2 *", True),
        ("0 0 31 4,6,9,11 *", True),
        ("0 0 31 2 1", False),
        ("0 0 30 * 1#1", False),
    ],
)
def test_cron_that_never_fires_returns_empty_quickly(cron, day_or):
    began = time.perf_counter()
    schedule = {"cron": cron, "day_or": day_or}
    assert fires(schedule, utc(2026, 1, 1), n=5) == []
    assert fires(schedule, utc(2026, 1, 1), end=utc(2030, 1, 1)) == []
    assert time.perf_counter() - began < 0.5


# cron across DST: a missing local time fires at the first instant after the
# gap; a repeated local time fires once, at its first occurrence.


def test_cron_berlin_spring_gap():
    schedule = {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}
    assert fires(schedule, utc(2026, 3, 27), n=4) == [
        utc(2026, 3, 27, 1, 30),  # 02:30 CET
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 02:30 does not exist -> 03:00 CEST
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]


def test_cron_berlin_gap_start_exactly_at_gap_end():
    schedule = {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}
    assert fires(schedule, utc(2026, 3, 29, 1, 0), n=1) == [utc(2026, 3, 29, 1, 0)]
    assert fires(schedule, utc(2026, 3, 29, 1, 0, 1), n=1) == [utc(2026, 3, 30, 0, 30)]


def test_cron_berlin_autumn_fold_fires_once():
    schedule = {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}
    assert fires(schedule, utc(2026, 10, 23), n=4) == [
        utc(2026, 10, 23, 0, 30),  # 02:30 CEST
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # first 02:30 (CEST); not again at 01:30Z
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]


def test_cron_berlin_hourly_across_fold_skips_repeated_hour():
    schedule = {"cron": "0 * * * *", "timezone": "Europe/Berlin"}
    assert fires(schedule, utc(2026, 10, 24, 22), n=5) == [
        utc(2026, 10, 24, 22),  # 00:00 CEST
        utc(2026, 10, 24, 23),  # 01:00 CEST
        utc(2026, 10, 25, 0),  # 02:00 CEST (first)
        utc(2026, 10, 25, 2),  # 03:00 CET; 02:00 CET (01:00Z) is skipped
        utc(2026, 10, 25, 3),  # 04:00 CET
    ]


def test_cron_berlin_every_15_minutes_across_gap():
    schedule = {"cron": "*/15 * * * *", "timezone": "Europe/Berlin"}
    assert fires(schedule, utc(2026, 3, 29, 0, 30), n=5) == [
        utc(2026, 3, 29, 0, 30),  # 01:30 CET
        utc(2026, 3, 29, 0, 45),  # 01:45 CET
        utc(2026, 3, 29, 1, 0),  # 02:00-02:45 missing -> one fire at 03:00 CEST
        utc(2026, 3, 29, 1, 15),  # 03:15 CEST
        utc(2026, 3, 29, 1, 30),  # 03:30 CEST
    ]


def test_cron_daily_9am_stays_local_in_berlin():
    schedule = {"cron": "0 9 * * *", "timezone": "Europe/Berlin"}
    assert fires(schedule, utc(2026, 3, 28), n=3) == [
        utc(2026, 3, 28, 8),  # 09:00 CET
        utc(2026, 3, 29, 7),  # 09:00 CEST
        utc(2026, 3, 30, 7),
    ]
    assert fires(schedule, utc(2026, 10, 24), n=3) == [
        utc(2026, 10, 24, 7),  # 09:00 CEST
        utc(2026, 10, 25, 8),  # 09:00 CET
        utc(2026, 10, 26, 8),
    ]


def test_cron_daily_9am_stays_local_in_new_york():
    schedule = {"cron": "0 9 * * *", "timezone": "America/New_York"}
    assert fires(schedule, utc(2026, 3, 6), n=4) == [
        utc(2026, 3, 6, 14),  # 09:00 EST
        utc(2026, 3, 7, 14),
        utc(2026, 3, 8, 13),  # 09:00 EDT
        utc(2026, 3, 9, 13),
    ]
    assert fires(schedule, utc(2026, 10, 30), n=4) == [
        utc(2026, 10, 30, 13),  # 09:00 EDT
        utc(2026, 10, 31, 13),
        utc(2026, 11, 1, 14),  # 09:00 EST
        utc(2026, 11, 2, 14),
    ]


def test_cron_new_york_gap_half_hourly():
    schedule = {"cron": "*/30 * * * *", "timezone": "America/New_York"}
    assert fires(schedule, utc(2026, 3, 8, 6), n=4) == [
        utc(2026, 3, 8, 6, 0),  # 01:00 EST
        utc(2026, 3, 8, 6, 30),  # 01:30 EST
        utc(2026, 3, 8, 7, 0),  # 02:00 and 02:30 missing -> 03:00 EDT, once
        utc(2026, 3, 8, 7, 30),  # 03:30 EDT
    ]


def test_cron_new_york_fold():
    schedule = {"cron": "30 1 * * *", "timezone": "America/New_York"}
    assert fires(schedule, utc(2026, 10, 31), n=3) == [
        utc(2026, 10, 31, 5, 30),  # 01:30 EDT
        utc(2026, 11, 1, 5, 30),  # first 01:30 (EDT) only
        utc(2026, 11, 2, 6, 30),  # 01:30 EST
    ]
    # starting during the repeated hour (01:00 EST) the second 01:30 is not a fire
    assert fires(schedule, utc(2026, 11, 1, 6), n=1) == [utc(2026, 11, 2, 6, 30)]


def test_cron_without_timezone_is_utc():
    assert fires({"cron": "30 2 * * *"}, utc(2026, 3, 29), n=1) == [utc(2026, 3, 29, 2, 30)]


# --- interval -----------------------------------------------------------------


def test_interval_hourly_from_default_anchor():
    assert fires({"interval": 3600}, utc(2026, 5, 17, 13, 7), n=2) == [
        utc(2026, 5, 17, 14),
        utc(2026, 5, 17, 15),
    ]


def test_interval_90_seconds_grid_from_2020():
    # 2020-01-01 .. 2026-01-01 is 2192 days = 2,104,320 intervals of 90 s
    assert fires({"interval": 90}, utc(2026, 1, 1, 0, 0, 30), n=2) == [
        utc(2026, 1, 1, 0, 1, 30),
        utc(2026, 1, 1, 0, 3, 0),
    ]


def test_interval_fractional_seconds():
    schedule = {"interval": 0.25, "anchor_date": "2026-01-01T00:00:00Z"}
    assert fires(schedule, utc(2026, 1, 1, 0, 0, 1, 100000), n=3) == [
        utc(2026, 1, 1, 0, 0, 1, 250000),
        utc(2026, 1, 1, 0, 0, 1, 500000),
        utc(2026, 1, 1, 0, 0, 1, 750000),
    ]


def test_interval_fires_before_anchor_too():
    schedule = {"interval": 86400, "anchor_date": "2026-01-10T00:00:00+00:00"}
    assert fires(schedule, utc(2026, 1, 8, 12), n=3) == [
        utc(2026, 1, 9),
        utc(2026, 1, 10),
        utc(2026, 1, 11),
    ]


def test_interval_daily_keeps_wall_clock_in_new_york():
    schedule = {
        "interval": 86400,
        "anchor_date": "2026-03-01T09:00:00-05:00",
        "timezone": "America/New_York",
    }
    assert fires(schedule, utc(2026, 3, 6), n=4) == [
        utc(2026, 3, 6, 14),  # 09:00 EST
        utc(2026, 3, 7, 14),
        utc(2026, 3, 8, 13),  # 09:00 EDT: 23 hours later
        utc(2026, 3, 9, 13),
    ]
    assert fires(schedule, utc(2026, 10, 31), n=3) == [
        utc(2026, 10, 31, 13),  # 09:00 EDT
        utc(2026, 11, 1, 14),  # 09:00 EST: 25 hours later
        utc(2026, 11, 2, 14),
    ]


def test_interval_weekly_keeps_wall_clock():
    schedule = {
        "interval": 604800,
        "anchor_date": "2026-03-02T09:00:00-05:00",
        "timezone": "America/New_York",
    }
    assert fires(schedule, utc(2026, 3, 2), n=3) == [
        utc(2026, 3, 2, 14),
        utc(2026, 3, 9, 13),
        utc(2026, 3, 16, 13),
    ]


def test_interval_daily_without_timezone_is_utc():
    # the anchor's -05:00 offset is not a timezone: Prefect infers "UTC"
    schedule = {"interval": 86400, "anchor_date": "2026-03-01T09:00:00-05:00"}
    assert validate_schedule(schedule)["timezone"] == "UTC"
    assert fires(schedule, utc(2026, 3, 7), n=3) == [
        utc(2026, 3, 7, 14),
        utc(2026, 3, 8, 14),
        utc(2026, 3, 9, 14),
    ]


def test_interval_hourly_is_absolute_across_new_york_fold():
    schedule = {
        "interval": 3600,
        "anchor_date": "2026-11-01T00:00:00-04:00",
        "timezone": "America/New_York",
    }
    assert fires(schedule, utc(2026, 11, 1, 4), n=4) == [
        utc(2026, 11, 1, 4),  # 00:00 EDT
        utc(2026, 11, 1, 5),  # 01:00 EDT
        utc(2026, 11, 1, 6),  # 01:00 EST (local 01:00 again)
        utc(2026, 11, 1, 7),  # 02:00 EST
    ]


def test_interval_hourly_is_absolute_across_berlin_gap():
    schedule = {
        "interval": 3600,
        "anchor_date": "2026-03-29T00:00:00+01:00",
        "timezone": "Europe/Berlin",
    }
    assert fires(schedule, utc(2026, 3, 28, 23), n=4) == [
        utc(2026, 3, 28, 23),  # 00:00 CET
        utc(2026, 3, 29, 0),  # 01:00 CET
        utc(2026, 3, 29, 1),  # 03:00 CEST
        utc(2026, 3, 29, 2),  # 04:00 CEST
    ]


def test_interval_daily_anchored_in_gap_and_fold():
    berlin = {"interval": 86400, "timezone": "Europe/Berlin"}
    gap = {**berlin, "anchor_date": "2026-03-28T02:30:00+01:00"}
    assert fires(gap, utc(2026, 3, 28), n=3) == [
        utc(2026, 3, 28, 1, 30),  # 02:30 CET
        utc(2026, 3, 29, 1, 0),  # 02:30 missing -> 03:00 CEST
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]
    fold = {**berlin, "anchor_date": "2026-10-24T02:30:00+02:00"}
    assert fires(fold, utc(2026, 10, 24), n=3) == [
        utc(2026, 10, 24, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 0, 30),  # first 02:30
        utc(2026, 10, 26, 1, 30),  # 02:30 CET
    ]


def test_interval_over_a_day_steps_wall_clock_like_pendulum():
    # 25 h = 1 day + 1 h of wall-clock time, so across the gap two fires are
    # only 24 real hours apart (pendulum's add(days=1, seconds=3600))
    schedule = {
        "interval": 90000,
        "anchor_date": "2026-03-28T00:00:00+01:00",
        "timezone": "Europe/Berlin",
    }
    assert fires(schedule, utc(2026, 3, 27), n=3) == [
        utc(2026, 3, 27, 23),  # 03-28 00:00 CET
        utc(2026, 3, 29, 0),  # 03-29 01:00 CET
        utc(2026, 3, 30, 0),  # 03-30 02:00 CEST
    ]


# --- rrule --------------------------------------------------------------------


def test_rrule_last_friday_of_month_in_berlin():
    schedule = {
        "rrule": "DTSTART:20260101T090000\nRRULE:FREQ=MONTHLY;BYDAY=-1FR",
        "timezone": "Europe/Berlin",
    }
    assert fires(schedule, utc(2026, 1, 1), n=6) == [
        utc(2026, 1, 30, 8),  # 09:00 CET
        utc(2026, 2, 27, 8),
        utc(2026, 3, 27, 8),
        utc(2026, 4, 24, 7),  # 09:00 CEST
        utc(2026, 5, 29, 7),
        utc(2026, 6, 26, 7),
    ]


def test_rrule_last_weekday_of_month_by_setpos():
    schedule = {"rrule": "DTSTART:20260101T090000\nRRULE:FREQ=MONTHLY;BYDAY=MO,TU,WE,TH,FR;BYSETPOS=-1"}
    assert fires(schedule, utc(2026, 1, 1), n=6) == [
        utc(2026, 1, 30, 9),  # Sat 31st -> Fri 30th
        utc(2026, 2, 27, 9),  # Sat 28th -> Fri 27th
        utc(2026, 3, 31, 9),  # Tuesday
        utc(2026, 4, 30, 9),  # Thursday
        utc(2026, 5, 29, 9),  # Sun 31st, Sat 30th -> Fri 29th
        utc(2026, 6, 30, 9),  # Tuesday
    ]


def test_rrule_count_counts_from_dtstart():
    schedule = {"rrule": "DTSTART:20260105T100000\nRRULE:FREQ=WEEKLY;BYDAY=MO,WE;COUNT=5"}
    every = [
        utc(2026, 1, 5, 10),
        utc(2026, 1, 7, 10),
        utc(2026, 1, 12, 10),
        utc(2026, 1, 14, 10),
        utc(2026, 1, 19, 10),
    ]
    assert fires(schedule, utc(2026, 1, 1), n=10) == every
    assert fires(schedule, utc(2026, 1, 13), n=10) == every[3:]
    assert fires(schedule, utc(2026, 1, 20), n=10) == []


def test_rrule_count_with_minutely_far_from_dtstart():
    # 2020-01-01 00:00 + 3,500,000 minutes = 2026-08-27 13:20, the last fire
    schedule = {"rrule": "DTSTART:20200101T000000\nRRULE:FREQ=MINUTELY;COUNT=3500001"}
    began = time.perf_counter()
    assert fires(schedule, utc(2026, 8, 27, 13, 18), n=5) == [
        utc(2026, 8, 27, 13, 18),
        utc(2026, 8, 27, 13, 19),
        utc(2026, 8, 27, 13, 20),
    ]
    assert time.perf_counter() - began < 2.0


def test_rrule_until_is_inclusive():
    schedule = {"rrule": "DTSTART:20260101T090000\nRRULE:FREQ=DAILY;UNTIL=20260104T090000"}
    assert fires(schedule, utc(2025, 12, 1), n=10) == [
        utc(2026, 1, 1, 9),
        utc(2026, 1, 2, 9),
        utc(2026, 1, 3, 9),
        utc(2026, 1, 4, 9),
    ]


def test_rrule_until_in_utc_with_tzid_dtstart():
    schedule = {"rrule": "DTSTART;TZID=Europe/Berlin:20260101T090000\nRRULE:FREQ=DAILY;UNTIL=20260103T080000Z"}
    assert fires(schedule, utc(2026, 1, 1), n=10) == [
        utc(2026, 1, 1, 8),
        utc(2026, 1, 2, 8),
        utc(2026, 1, 3, 8),
    ]


def test_rrule_tzid_overrides_schedule_timezone_default():
    schedule = {"rrule": "DTSTART;TZID=America/New_York:20260306T090000\nRRULE:FREQ=DAILY;COUNT=4"}
    assert fires(schedule, utc(2026, 3, 1), n=10) == [
        utc(2026, 3, 6, 14),
        utc(2026, 3, 7, 14),
        utc(2026, 3, 8, 13),
        utc(2026, 3, 9, 13),
    ]


def test_rrule_tzid_naming_no_known_zone_falls_back_to_schedule_timezone():
    """Prefect accepts any TZID (its CLI tests send "US-Eastern") and times the rule in the schedule's
    timezone; such a rule was refused here."""
    for zone, hour in (("Asia/Seoul", 0), (None, 9)):
        schedule = {"rrule": "DTSTART;TZID=US-Eastern:19970902T090000\nRRULE:FREQ=DAILY;COUNT=10"}
        if zone:
            schedule["timezone"] = zone
        assert validate_schedule(schedule)["timezone"] == (zone or "UTC")
        assert fires(schedule, utc(1997, 1, 1), n=1) == [utc(1997, 9, 2, hour)]


def test_rrule_utc_dtstart_ignores_schedule_timezone():
    schedule = {
        "rrule": "DTSTART:20260306T140000Z\nRRULE:FREQ=DAILY;COUNT=4",
        "timezone": "America/New_York",
    }
    assert fires(schedule, utc(2026, 3, 1), n=10) == [
        utc(2026, 3, 6, 14),
        utc(2026, 3, 7, 14),
        utc(2026, 3, 8, 14),
        utc(2026, 3, 9, 14),
    ]


@pytest.mark.parametrize("text", ["RRULE:FREQ=DAILY;BYHOUR=9", "FREQ=DAILY;BYHOUR=9", "rrule:freq=daily;byhour=9"])
def test_rrule_without_dtstart_starts_2020_in_schedule_timezone(text):
    schedule = {"rrule": text, "timezone": "Europe/Berlin"}
    assert fires(schedule, utc(2026, 3, 28), n=3) == [
        utc(2026, 3, 28, 8),  # 09:00 CET
        utc(2026, 3, 29, 7),  # 09:00 CEST
        utc(2026, 3, 30, 7),
    ]


def test_rrule_dst_gap_and_fold_like_cron():
    gap = {"rrule": "DTSTART;TZID=Europe/Berlin:20260327T023000\nRRULE:FREQ=DAILY"}
    assert fires(gap, utc(2026, 3, 27), n=4) == [
        utc(2026, 3, 27, 1, 30),
        utc(2026, 3, 28, 1, 30),
        utc(2026, 3, 29, 1, 0),  # 02:30 missing -> 03:00 CEST
        utc(2026, 3, 30, 0, 30),
    ]
    hourly = {"rrule": "DTSTART;TZID=Europe/Berlin:20261025T000000\nRRULE:FREQ=HOURLY;COUNT=5"}
    assert fires(hourly, utc(2026, 10, 24), n=10) == [
        utc(2026, 10, 24, 22),  # 00:00 CEST
        utc(2026, 10, 24, 23),  # 01:00 CEST
        utc(2026, 10, 25, 0),  # 02:00 CEST (first)
        utc(2026, 10, 25, 2),  # 03:00 CET
        utc(2026, 10, 25, 3),  # 04:00 CET
    ]


def test_rrule_yearly_on_leap_day_skips_other_years():
    schedule = {"rrule": "DTSTART:20240229T120000\nRRULE:FREQ=YEARLY"}
    assert fires(schedule, utc(2024, 1, 1), n=3) == [
        utc(2024, 2, 29, 12),
        utc(2028, 2, 29, 12),
        utc(2032, 2, 29, 12),
    ]


def test_rrule_monthly_day_31_skips_short_months():
    schedule = {"rrule": "DTSTART:20260131T000000\nRRULE:FREQ=MONTHLY"}
    assert fires(schedule, utc(2026, 1, 1), n=3) == [
        utc(2026, 1, 31),
        utc(2026, 3, 31),
        utc(2026, 5, 31),
    ]


def test_rrule_negative_monthday():
    schedule = {"rrule": "DTSTART:20260101T000000\nRRULE:FREQ=MONTHLY;BYMONTHDAY=-1"}
    assert fires(schedule, utc(2026, 1, 1), n=3) == [
        utc(2026, 1, 31),
        utc(2026, 2, 28),
        utc(2026, 3, 31),
    ]


def test_rrule_thanksgiving():
    schedule = {"rrule": "DTSTART:20260101T000000\nRRULE:FREQ=YEARLY;BYMONTH=11;BYDAY=4TH"}
    assert fires(schedule, utc(2026, 1, 1), n=3) == [
        utc(2026, 11, 26),
        utc(2027, 11, 25),
        utc(2028, 11, 23),
    ]


def test_rrule_minutely_with_byhour():
    schedule = {"rrule": "DTSTART:20260101T090000\nRRULE:FREQ=MINUTELY;INTERVAL=20;BYHOUR=9,10"}
    assert fires(schedule, utc(2026, 1, 1), n=7) == [
        utc(2026, 1, 1, 9, 0),
        utc(2026, 1, 1, 9, 20),
        utc(2026, 1, 1, 9, 40),
        utc(2026, 1, 1, 10, 0),
        utc(2026, 1, 1, 10, 20),
        utc(2026, 1, 1, 10, 40),
        utc(2026, 1, 2, 9, 0),
    ]


def test_rrule_daily_with_hour_and_minute_lists():
    schedule = {"rrule": "DTSTART:20260101T000000\nRRULE:FREQ=DAILY;BYHOUR=8,17;BYMINUTE=0,30"}
    assert fires(schedule, utc(2026, 1, 1, 12), n=5) == [
        utc(2026, 1, 1, 17, 0),
        utc(2026, 1, 1, 17, 30),
        utc(2026, 1, 2, 8, 0),
        utc(2026, 1, 2, 8, 30),
        utc(2026, 1, 2, 17, 0),
    ]


def test_rrule_weekly_setpos_first_week_starts_at_dtstart():
    # like dateutil (Prefect): the first week only holds days from DTSTART
    # (Friday 2026-01-02) on, so BYSETPOS=1 picks that Friday, not Mon Dec 29
    schedule = {"rrule": "DTSTART:20260102T090000\nRRULE:FREQ=WEEKLY;BYDAY=MO,FR;BYSETPOS=1"}
    assert fires(schedule, utc(2026, 1, 1), n=3) == [
        utc(2026, 1, 2, 9),
        utc(2026, 1, 5, 9),
        utc(2026, 1, 12, 9),
    ]


def test_rrule_keeps_dtstart_seconds():
    schedule = {"rrule": "DTSTART:20260101T090015\nRRULE:FREQ=HOURLY;INTERVAL=6"}
    assert fires(schedule, utc(2026, 1, 1), n=3) == [
        utc(2026, 1, 1, 9, 0, 15),
        utc(2026, 1, 1, 15, 0, 15),
        utc(2026, 1, 1, 21, 0, 15),
    ]


# Examples from RFC 5545 section 3.8.5.3, with the RFC's own listed dates.


def test_rfc5545_biweekly_wkst_matters():
    rule = "DTSTART:19970805T090000\nRRULE:FREQ=WEEKLY;INTERVAL=2;COUNT=4;BYDAY=TU,SU"
    monday = {"rrule": rule + ";WKST=MO"}
    assert fires(monday, utc(1997, 8, 1), n=10) == [
        utc(1997, 8, 5, 9),
        utc(1997, 8, 10, 9),
        utc(1997, 8, 19, 9),
        utc(1997, 8, 24, 9),
    ]
    sunday = {"rrule": rule + ";WKST=SU"}
    assert fires(sunday, utc(1997, 8, 1), n=10) == [
        utc(1997, 8, 5, 9),
        utc(1997, 8, 17, 9),
        utc(1997, 8, 19, 9),
        utc(1997, 8, 31, 9),
    ]


def test_rfc5545_third_tue_wed_or_thu():
    schedule = {"rrule": "DTSTART:19970904T090000\nRRULE:FREQ=MONTHLY;COUNT=3;BYDAY=TU,WE,TH;BYSETPOS=3"}
    assert fires(schedule, utc(1997, 9, 1), n=10) == [
        utc(1997, 9, 4, 9),
        utc(1997, 10, 7, 9),
        utc(1997, 11, 6, 9),
    ]


def test_rfc5545_second_to_last_monday():
    schedule = {"rrule": "DTSTART:19970922T090000\nRRULE:FREQ=MONTHLY;COUNT=6;BYDAY=-2MO"}
    assert fires(schedule, utc(1997, 9, 1), n=10) == [
        utc(1997, 9, 22, 9),
        utc(1997, 10, 20, 9),
        utc(1997, 11, 17, 9),
        utc(1997, 12, 22, 9),
        utc(1998, 1, 19, 9),
        utc(1998, 2, 16, 9),
    ]


def test_rfc5545_third_to_last_day():
    schedule = {"rrule": "DTSTART:19970928T090000\nRRULE:FREQ=MONTHLY;BYMONTHDAY=-3"}
    assert fires(schedule, utc(1997, 9, 1), n=4) == [
        utc(1997, 9, 28, 9),
        utc(1997, 10, 29, 9),
        utc(1997, 11, 28, 9),
        utc(1997, 12, 29, 9),
    ]


def test_rfc5545_friday_the_13th():
    schedule = {"rrule": "DTSTART:19970902T090000\nRRULE:FREQ=MONTHLY;BYDAY=FR;BYMONTHDAY=13"}
    assert fires(schedule, utc(1997, 9, 1), n=5) == [
        utc(1998, 2, 13, 9),
        utc(1998, 3, 13, 9),
        utc(1998, 11, 13, 9),
        utc(1999, 8, 13, 9),
        utc(2000, 10, 13, 9),
    ]


def test_rfc5545_twentieth_monday_of_the_year():
    schedule = {"rrule": "DTSTART:19970519T090000\nRRULE:FREQ=YEARLY;BYDAY=20MO"}
    assert fires(schedule, utc(1997, 1, 1), n=3) == [
        utc(1997, 5, 19, 9),
        utc(1998, 5, 18, 9),
        utc(1999, 5, 17, 9),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "DTSTART:20260101T000000\nRRULE:FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30",
        "DTSTART:20260101T000000\nRRULE:FREQ=DAILY;BYSETPOS=2",
        "DTSTART:20260105T000000\nRRULE:FREQ=DAILY;INTERVAL=7;BYDAY=TU",
        "DTSTART:20260101T000000\nRRULE:FREQ=MONTHLY;BYMONTHDAY=1;BYDAY=-1MO",
        "DTSTART:20260101T000000\nRRULE:FREQ=DAILY;UNTIL=20251231T000000",
    ],
)
def test_rrule_that_never_fires_returns_empty_quickly(text):
    began = time.perf_counter()
    assert fires({"rrule": text}, utc(2026, 1, 1), n=5) == []
    assert time.perf_counter() - began < 1.0

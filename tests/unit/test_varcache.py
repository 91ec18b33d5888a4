"""Tracked parameters: options parsing, SQL quoting, the SET that aligns a server."""

import pytest

from workers.varcache import Tracked, parse_options, quote_literal, server_set_query


def test_tracked_names_are_case_insensitive_and_canonical():
    t = Tracked(["IntervalStyle"])
    assert t.canonical("datestyle") == "DateStyle"
    assert t.canonical("TIMEZONE") == "TimeZone"
    assert t.canonical("intervalstyle") == "IntervalStyle"
    assert t.canonical("search_path") is None


@pytest.mark.parametrize("options,expected", [
    ("-c TimeZone=UTC", [("TimeZone", "UTC")]),
    ("-cDateStyle=ISO --application-name=x", [("DateStyle", "ISO"), ("application_name", "x")]),
    (r"-c search_path=a\ b", [("search_path", "a b")]),
    ("", []),
])
def test_parse_options(options, expected):
    assert parse_options(options) == expected


@pytest.mark.parametrize("options", ["-x 1", "-c", "--noequals", "foo"])
def test_parse_options_refuses_what_pgbouncer_refuses(options):
    with pytest.raises(ValueError, match="only '-c config=val' and '--config=val' are allowed"):
        parse_options(options)


def test_quote_literal():
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\b") == "E'a\\\\b'"


def test_server_set_query_only_for_differences():
    client = {"TimeZone": "UTC", "application_name": "a", "DateStyle": "ISO, MDY"}
    server = {"TimeZone": "utc", "application_name": "b", "DateStyle": "ISO, MDY"}
    assert server_set_query(client, server) == "SET application_name='a';"
    assert server_set_query(client, dict(client)) is None
    assert server_set_query({"IntervalStyle": "iso_8601"}, {}) == "SET IntervalStyle='iso_8601';"

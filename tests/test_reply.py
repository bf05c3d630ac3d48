"""Reply parsing: examples from real servers, then properties over all replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.delivery.reply import (
    DeliveryError,
    MalformedReply,
    Outcome,
    Reply,
    default_enhanced,
    ehlo_extensions,
    parse_line,
    parse_reply,
    size_limit,
)


def test_single_line_with_enhanced_code() -> None:
    r = parse_reply(["250 2.1.5 Ok\r\n"])
    assert r == Reply(250, "2.1.5", "Ok", ("Ok",))
    assert r.positive and not r.temporary and not r.permanent
    assert r.line() == "250 2.1.5 Ok"


def test_multiline_repeats_the_enhanced_code_once() -> None:
    r = parse_reply(
        [
            "550-5.1.1 The email account that you tried to reach does not exist.\r\n",
            "550-5.1.1 Please try double-checking the recipient's email\r\n",
            "550 5.1.1 address for typos. x1si123 - gsmtp\r\n",
        ]
    )
    assert r.code == 550 and r.enhanced == "5.1.1" and r.permanent
    assert r.text.startswith("The email account")
    assert "5.1.1" not in r.text
    assert r.line().count("5.1.1") == 1


def test_missing_enhanced_code_gets_class_default() -> None:
    assert parse_reply(["451 greylisted, try later"]).enhanced == "4.0.0"
    assert parse_reply(["554 go away"]).enhanced == "5.0.0"
    assert parse_reply(["250 ok"]).enhanced == "2.0.0"
    assert parse_reply(["354 go ahead"]).enhanced == ""


def test_enhanced_code_of_the_wrong_class_stays_text() -> None:
    r = parse_reply(["451 5.7.1 confused server"])
    assert r.enhanced == "4.0.0"
    assert r.text == "5.7.1 confused server"


def test_bare_code_and_empty_continuation() -> None:
    assert parse_reply(["250"]) == Reply(250, "2.0.0", "", ("",))
    assert parse_reply(["250-", "250 x"]).text == "x"


@pytest.mark.parametrize(
    "lines",
    [
        [],
        ["hello"],
        ["25 short"],
        ["250text"],
        ["650 not a class"],
        ["250-a", "251 b"],
        ["250 a", "250 b"],
        ["250-a"],
    ],
)
def test_malformed(lines: list[str]) -> None:
    with pytest.raises(MalformedReply):
        parse_reply(lines)


def test_ehlo_extensions_and_size() -> None:
    r = parse_reply(
        [
            "250-mx.example.test Hello",
            "250-PIPELINING",
            "250-SIZE 10240000",
            "250-8bitmime",
            "250-AUTH PLAIN LOGIN",
            "250 STARTTLS",
        ]
    )
    exts = ehlo_extensions(r)
    assert exts == {
        "PIPELINING": "",
        "SIZE": "10240000",
        "8BITMIME": "",
        "AUTH": "PLAIN LOGIN",
        "STARTTLS": "",
    }
    assert size_limit(exts) == 10240000
    assert size_limit({"SIZE": ""}) is None
    assert size_limit({"SIZE": "0"}) is None
    assert size_limit({}) is None


def test_outcome_from_replies() -> None:
    assert Outcome.of(parse_reply(["250 2.0.0 Ok"])).sent
    deferred = Outcome.of(parse_reply(["451 4.7.1 greylisted"]))
    assert deferred.temporary and deferred.reply == "451 4.7.1 greylisted"
    assert deferred.remote
    failed = Outcome.of(parse_reply(["550 no such user"]))
    assert failed.permanent and failed.enhanced == "5.0.0"
    soft = failed.softened()
    assert soft.temporary and soft.enhanced == "4.0.0" and soft.reply == failed.reply
    assert deferred.softened() is deferred
    odd = Outcome.of(parse_reply(["354 go ahead"]))
    assert odd.temporary and odd.enhanced == "4.5.0"


def test_delivery_error_carries_fields() -> None:
    err = DeliveryError(Outcome.perm("5.1.10", "null MX"))
    assert err.permanent and err.enhanced == "5.1.10" and err.reply == "null MX"
    assert str(err) == "null MX"


# --- properties -------------------------------------------------------------

codes = st.integers(min_value=200, max_value=599)
texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r\n"),
    max_size=60,
)
enhanced_tail = st.tuples(st.integers(0, 999), st.integers(0, 999))


@given(codes, st.lists(texts, min_size=1, max_size=6))
def test_any_wellformed_reply_parses(code: int, lines: list[str]) -> None:
    wire = [f"{code}-{t}\r\n" for t in lines[:-1]] + [f"{code} {lines[-1]}\r\n"]
    r = parse_reply(wire)
    assert r.code == code
    assert len(r.lines) == len(lines)
    assert r.temporary == (code // 100 == 4)
    assert r.permanent == (code // 100 == 5)
    assert r.enhanced.startswith(str(code // 100)) or r.enhanced == ""
    assert "\r" not in r.line() and "\n" not in r.line()


@given(codes, enhanced_tail, texts)
def test_enhanced_code_roundtrips(code: int, tail: tuple[int, int], text: str) -> None:
    klass = code // 100
    if klass == 3:
        return
    enhanced = f"{klass}.{tail[0]}.{tail[1]}"
    r = parse_reply([f"{code} {enhanced} {text}"])
    assert r.enhanced == enhanced
    assert r.text == text.strip() or r.text == text.lstrip()
    assert parse_reply([r.line()]).enhanced == enhanced


@given(codes)
def test_default_enhanced_matches_class(code: int) -> None:
    e = default_enhanced(code)
    assert e == ("" if code // 100 == 3 else f"{code // 100}.0.0")


@given(st.text(max_size=40))
def test_parse_line_never_crashes_unexpectedly(line: str) -> None:
    try:
        p = parse_line(line)
    except MalformedReply:
        return
    assert 200 <= p.code <= 599


@given(codes, texts)
def test_a_refusal_never_counts_as_sent(code: int, text: str) -> None:
    o = Outcome.refused(parse_reply([f"{code} {text}"]))
    assert o.status == ("failed" if code >= 500 else "deferred")
    assert o.enhanced[0] == ("5" if code >= 500 else "4")


@given(codes, st.lists(texts, min_size=1, max_size=4))
def test_outcome_status_follows_code_class(code: int, lines: list[str]) -> None:
    wire = [f"{code}-{t}" for t in lines[:-1]] + [f"{code} {lines[-1]}"]
    o = Outcome.of(parse_reply(wire))
    expected = {2: "sent", 3: "deferred", 4: "deferred", 5: "failed"}[code // 100]
    assert o.status == expected
    assert o.softened().status in ("sent", "deferred")

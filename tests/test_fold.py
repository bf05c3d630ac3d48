"""Folding of the header fields relayd adds: any input, no line over 998 octets."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.dkim import DKIMResult
from relayd.dkimverify import not_checked
from relayd.fold import LIMIT, MAX_BLANKS, WIDTH, fold, unfold
from relayd.policy.dmarc import DMARCResult
from relayd.policy.spf import SPFResult, received_spf_field
from relayd.smtpd import authresults
from relayd.smtpd.headers import TraceInfo, received

# Values as peers choose them: words, blanks, 8-bit, control characters, huge words.
ANY_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(" \t\r\n\x00é"),
    max_size=3000,
)
WORDY_TEXT = st.lists(
    st.text(
        st.characters(codec="utf-8", exclude_characters=" \t\r\n", exclude_categories=("Cc", "Cs")),
        min_size=1,
        max_size=120,
    )
    | st.sampled_from([" ", "\t", "  ", " \t "]),
    max_size=80,
).map("".join)


def lines(field: bytes) -> list[bytes]:
    assert field.endswith(b"\r\n")
    return field[:-2].split(b"\r\n")


def check_shape(field: bytes) -> None:
    """What every header line relayd writes must satisfy."""
    for line in lines(field):
        assert len(line) <= LIMIT
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line
        assert line.strip(b" \t"), "a line of only whitespace would end the header block"
    assert not lines(field)[0][:1].isspace()
    assert all(line[:1] in (b" ", b"\t") for line in lines(field)[1:])


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_any_value_folds_to_short_clean_lines(value: str) -> None:
    field = fold("X-Test", value)
    check_shape(field)
    # 8-bit only where the input had it: ASCII in, ASCII out.
    if value.isascii():
        assert field.isascii()


@settings(max_examples=300, deadline=None)
@given(WORDY_TEXT)
def test_unfolding_gives_the_value_back(value: str) -> None:
    """No word longer than a line, no huge blank run: folding only adds CRLFs."""
    field = fold("X-Test", value)
    check_shape(field)
    assert unfold(field) == f"X-Test: {value}".encode()
    # Lines stay within 78 octets where the words allow it (blanks that end the
    # value are kept on the last line as long as they fit under 998 octets).
    for line in lines(field):
        line = line.rstrip(b" \t")
        words = line.split()
        assert len(line) <= WIDTH or len(words) <= 1 or len(line) - len(words[-1]) <= WIDTH


def test_a_word_longer_than_a_line_is_cut_on_a_character_boundary() -> None:
    value = "é" * 2000  # 4000 octets of 2-octet characters
    field = fold("X-Test", value)
    check_shape(field)
    assert unfold(field).replace(b" ", b"") == b"X-Test:" + value.encode()


def test_long_blank_runs_become_one_space() -> None:
    field = fold("X-Test", "a" + " " * 5000 + "b")
    check_shape(field)
    assert unfold(field) == b"X-Test: a b"
    assert MAX_BLANKS < 998


def test_tab_starts_a_clause_line() -> None:
    assert fold("Received", "from a\tby b") == b"Received: from a\r\n\tby b\r\n"


def trace(helo: str, recipient: str | None) -> TraceInfo:
    return TraceInfo(
        helo=helo,
        client_ip="127.0.0.1",
        hostname="mail.relayd.test",
        queue_id="4F2A9C1B7D",
        recipient=recipient,
        esmtp=True,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        authenticated=False,
    )


@settings(max_examples=100, deadline=None)
@given(ANY_TEXT, st.none() | ANY_TEXT)
def test_received_any_helo_and_recipient(helo: str, recipient: str | None) -> None:
    check_shape(received(trace(helo, recipient), now=0))


def test_received_with_huge_helo_and_recipient() -> None:
    field = received(trace("h" * 5000, "r" * 3000 + "@example.org"), now=0)
    check_shape(field)
    assert unfold(field).startswith(b"Received: from hhh")
    assert b"by mail.relayd.test (relayd) with ESMTPS id 4F2A9C1B7D" in field


@settings(max_examples=100, deadline=None)
@given(ANY_TEXT, ANY_TEXT, ANY_TEXT)
def test_received_spf_any_helo_sender_explanation(helo: str, sender: str, why: str) -> None:
    result = SPFResult("fail", why, "mailfrom", sender.rpartition("@")[2])
    check_shape(received_spf_field(result, "mail.relayd.test", "192.0.2.7", helo, sender))


def test_received_spf_long_sender_keeps_every_key() -> None:
    sender = "a" * 900 + "@" + "b" * 900 + ".test"
    result = SPFResult("softfail", "x " * 600, "mailfrom", "b" * 900 + ".test")
    field = received_spf_field(result, "mail.relayd.test", "192.0.2.7", "h" * 2000, sender)
    check_shape(field)
    text = unfold(field).decode()
    for key in ("client-ip=", "envelope-from=", "helo=", "receiver=", "identity=mailfrom"):
        assert key in text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=8), ANY_TEXT)
def test_authentication_results_any_signatures(sigs: list[tuple[str, str]], domain: str) -> None:
    results = [DKIMResult(d, s, "fail", "body hash mismatch") for d, s in sigs]
    dmarc = DMARCResult("fail", "reject", domain)
    field = authresults.field("mail.relayd.test", None, [*results, not_checked(45)], dmarc)
    check_shape(field)
    assert field.isascii()


def test_authentication_results_many_results_stay_parseable() -> None:
    results = [DKIMResult(f"d{i}." + "x" * 300, "s" * 60, "temperror") for i in range(5)]
    field = authresults.field("mail.relayd.test", None, [*results, not_checked(45)])
    check_shape(field)
    text = unfold(field).decode()
    assert text.startswith("Authentication-Results: mail.relayd.test; dkim=temperror")
    assert "dkim=neutral (not checked: 45 more signatures" in text
    assert len(re.findall(r"dkim=", text)) == 6


CLAUSE_TEXT = st.lists(st.text(st.sampled_from("ab .[]():;-<>@x\t"), max_size=90), max_size=6).map(
    "\t".join
)


@settings(max_examples=300, deadline=None)
@given(CLAUSE_TEXT | WORDY_TEXT)
def test_the_short_path_folds_exactly_as_the_general_one(value: str) -> None:
    from unittest import mock

    from relayd import fold as folding

    quick = fold("Received", value)
    with mock.patch.object(folding, "_fold_short", lambda text, width: None):
        general = fold("Received", value)
    assert quick == general

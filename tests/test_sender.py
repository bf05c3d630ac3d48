"""Which MAIL FROM addresses an authenticated user may use (SPEC §3)."""

from __future__ import annotations

import pytest

from relayd.policy.sender import login_sender_verdict, owns, sender_verdict
from relayd.policy.verdict import Refuse
from relayd.users import ScryptParams, User, UserDB

ALICE = User("alice@example.com", ())
ALICE_DOMAIN = User("alice@example.com", ("*@example.com",))
APP = User("app1", ("noreply@example.org", "alerts-*@example.org"))
TAGGED = User("alice+team@example.com", ())


@pytest.mark.parametrize(
    ("user", "address", "owned"),
    [
        # the address itself, any case
        (ALICE, "alice@example.com", True),
        (ALICE, "alice@EXAMPLE.COM", True),
        (ALICE, "ALICE@Example.Com", True),
        # subaddresses
        (ALICE, "alice+tag@example.com", True),
        (ALICE, "Alice+Tag@example.com", True),
        (ALICE, "alice+a+b@example.com", True),
        (TAGGED, "alice+team@example.com", True),
        (TAGGED, "alice+team+x@example.com", True),
        (TAGGED, "alice@example.com", False),
        (TAGGED, "alice+other@example.com", False),
        # other people and other domains
        (ALICE, "bob@example.com", False),
        (ALICE, "alice@example.org", False),
        (ALICE, "alice@sub.example.com", False),
        (ALICE, "xalice@example.com", False),
        (ALICE, "alice.smith@example.com", False),
        (ALICE, "alice-tag@example.com", False),
        (ALICE, "bob+alice@example.com", False),
        # tricky spellings
        (ALICE, "alice@example.com.evil.test", False),
        (ALICE, "alice@example.com@evil.test", False),
        (ALICE, '"alice"@example.com', False),
        (ALICE, "alice@example.com.", False),
        (ALICE, " alice@example.com", False),
        (ALICE, "<alice@example.com>", False),
        (ALICE, "alice", False),
        (ALICE, "example.com", False),
        (ALICE, "@example.com", False),
        # allow_from patterns
        (ALICE_DOMAIN, "bob@example.com", True),
        (ALICE_DOMAIN, "BOB@EXAMPLE.COM", True),
        (ALICE_DOMAIN, '"bob smith"@example.com', True),
        (ALICE_DOMAIN, "bob@example.com.evil.test", False),
        (ALICE_DOMAIN, "bob@sub.example.com", False),
        (ALICE_DOMAIN, "bob@evilexample.com", False),
        # a bare name owns only its patterns
        (APP, "noreply@example.org", True),
        (APP, "NoReply@Example.ORG", True),
        (APP, "alerts-disk@example.org", True),
        (APP, "noreply+x@example.org", False),
        (APP, "alerts@example.org", False),
        (APP, "app1@example.org", False),
        (APP, "app1", False),
        (User("app1", ()), "app1@example.com", False),
    ],
)
def test_ownership(user: User, address: str, owned: bool) -> None:
    assert owns(user, address) is owned
    verdict = sender_verdict(user, address)
    assert (verdict is None) is owned


@pytest.mark.parametrize("null", ["", "<>"])
def test_null_sender_is_allowed_for_any_authenticated_user(null: str) -> None:
    assert owns(APP, null)
    assert sender_verdict(ALICE, null) is None


def test_refusal_is_553_naming_user_and_address() -> None:
    verdict = sender_verdict(ALICE, "ceo@example.com")
    assert verdict == Refuse(
        553,
        "5.7.1",
        "<ceo@example.com>: Sender address rejected: not owned by user alice@example.com",
    )
    assert verdict is not None
    assert not verdict.temporary
    assert verdict.reply().startswith("553 5.7.1 <ceo@example.com>: Sender address rejected")


def test_without_a_user_nothing_is_owned() -> None:
    assert not owns(None, "alice@example.com")
    assert not owns(None, "")


def test_login_is_checked_against_the_users_as_they_are_now() -> None:
    users = UserDB(ScryptParams(n=16, r=1, p=1))
    users.add("Alice@Example.com", "pw", ["*@example.org"])

    assert login_sender_verdict(users, "ALICE@example.com", "alice+x@example.com") is None
    assert login_sender_verdict(users, "alice@example.com", "bob@example.org") is None
    refused = login_sender_verdict(users, "alice@example.com", "bob@example.net")
    assert refused is not None
    assert refused.code == 553

    users.delete("alice@example.com")
    gone = login_sender_verdict(users, "Alice@example.com", "alice@example.com")
    assert gone == Refuse(
        553,
        "5.7.1",
        "<alice@example.com>: Sender address rejected: not owned by user alice@example.com",
    )
    assert login_sender_verdict(users, "alice@example.com", "") is not None

"""Which envelope senders an authenticated login may use (SPEC §3, MAIL FROM).

This is relayd's reject_sender_login_mismatch: a stolen or shared password
must not let one user send as another. The rules, all case-insensitive on
the whole address:

- a user named like an address (``alice@example.com``) owns that address
  and its subaddresses (``alice+tag@example.com``);
- every user owns the globs it was given with ``--allow-from``;
- a bare name (``app1``) owns only its globs.

Comparison is on the address exactly as the client wrote it, with no
unquoting: ``"alice"@example.com`` is not taken to be alice's (a quoted local
part is legal but nobody's mail client writes one for a plain name, and
accepting it would mean reimplementing RFC 5321 quoting just to widen what a
login may claim). A glob such as ``*@example.com`` still matches it, since
the whole domain is then the user's anyway.

The null sender ``<>`` is allowed for every authenticated user, as Postfix
does: it names no one, it is what read receipts and an application's own
bounces must use, and relayd never sends a bounce back to it.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from relayd.policy.verdict import Refuse, Verdict
from relayd.users import User, UserDB

_NULL_SENDERS = frozenset({"", "<>"})


def _is_own_address(name: str, address: str) -> bool:
    """``address`` is ``name`` or a ``local+tag`` subaddress of it (both lower-cased)."""
    if "@" not in name or "@" not in address:
        return False
    own_local, _, own_domain = name.rpartition("@")
    local, _, domain = address.rpartition("@")
    if domain != own_domain:
        return False
    return local == own_local or local.startswith(own_local + "+")


def owns(user: User | None, address: str) -> bool:
    """May this login use ``address`` (as in MAIL FROM, without the brackets)?

    No user (an unauthenticated session) owns nothing.
    """
    if user is None:
        return False
    address = address.lower()
    if address in _NULL_SENDERS:
        return True
    if _is_own_address(user.name.lower(), address):
        return True
    return any(fnmatchcase(address, pattern.lower()) for pattern in user.allow_from)


def _refuse(login: str, address: str) -> Refuse:
    """Postfix's wording, so log tools that know Postfix read it."""
    return Refuse(
        553,
        "5.7.1",
        f"<{address}>: Sender address rejected: not owned by user {login}",
    )


def sender_verdict(user: User, address: str) -> Verdict:
    """553 5.7.1 when an authenticated user claims a sender it does not own.

    Only for authenticated sessions: whether a client without a login may
    send at all is the listener's and the relay ACL's decision.
    """
    return None if owns(user, address) else _refuse(user.name, address)


def login_sender_verdict(users: UserDB, login: str, address: str) -> Verdict:
    """sender_verdict for the name a session authenticated as, in today's users.

    The users file can change between AUTH and MAIL; a login deleted since
    owns nothing, so an open session of a removed user can send no more.
    """
    user = users.get(login)
    if user is None:
        return _refuse(login.lower(), address)
    return sender_verdict(user, address)

"""The submission users file: who may AUTH, and which senders each may use.

The file is TOML that ``relayctl user ...`` writes and an operator can read::

    [users."alice@example.com"]
    hash = "$argon2id$v=19$m=32768,t=3,p=1$<salt base64>$<key base64>"
    allow_from = ["*@example.com"]

Passwords are kept only as Argon2id hashes (RFC 9106) in the PHC string
format, which carries its own parameters, so the cost can be raised later
without breaking existing entries. The default, ``t=3, m=32 MiB, p=1``, is
above OWASP's floor for Argon2id (t=2, 19 MiB) and costs about 80 ms of one
core per check on a small 2-core server: guessing offline is expensive, and
an AUTH stays well under the time a client waits anyway. RFC 9106's 64 MiB
profile would take about 160 ms there, and each of the concurrent checks
holds its memory, so it was not chosen.

Hashes written by earlier versions (``scrypt$N$r$p$salt$key``) still
verify. The daemon cannot rewrite them (the file is root's and read-only to
it), so on a successful login with such a hash it logs a warning naming the
user, ``relayctl user list`` marks the entry, and ``relayctl user passwd``
(or ``relayctl user test`` with the right password) stores it as Argon2id.

The daemon holds a ``UserStore``, which re-reads the file when it changes on
disk, so ``relayctl user add`` takes effect without a restart or reload.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import getpass
import grp
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import argon2
import tomli_w
from argon2.exceptions import InvalidHashError, VerificationError

from relayd import escape, workers
from relayd.log import event

FILE_MODE = 0o640
# The group relayd runs as (systemd/relayd.service Group=, relayd.sysusers):
# a new users file is readable by it and by nobody else.
DAEMON_GROUP = "relayd"
MAX_NAME_LENGTH = 254  # the longest forward-path RFC 5321 allows
# A hand-edited hash asking for more memory than this is a typo, not a policy.
MAX_SCRYPT_MEMORY = 1 << 30
MAX_ARGON2_MEMORY_KIB = 1 << 20
MAX_ARGON2_TIME_COST = 64
_NAME_PUNCTUATION = frozenset(".-_+@")
_HEADER = (
    "# relayd submission users; change with `relayctl user add|passwd|del|list`.\n"
    "# hash: $argon2id$v=19$m=KiB,t=passes,p=lanes$salt$key; allow_from: extra sender globs.\n"
)


class UserError(Exception):
    """A refused user operation; the message is ready to show an operator."""


class UserFileError(UserError):
    """The users file cannot be used; the message names the file, line and fix."""


@dataclass(frozen=True)
class ScryptParams:
    """scrypt cost: ``n`` (CPU/memory, a power of 2), block size ``r``, parallelism ``p``."""

    n: int = 2**15
    r: int = 8
    p: int = 1

    @property
    def maxmem(self) -> int:
        """Memory scrypt needs, with headroom; OpenSSL refuses to start below it."""
        return 128 * self.r * (self.n + self.p + 2) + (1 << 20)


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost: passes ``time_cost``, ``memory_kib`` KiB, ``parallelism`` lanes."""

    time_cost: int = 3
    memory_kib: int = 32 * 1024
    parallelism: int = 1

    def hasher(self) -> argon2.PasswordHasher:
        return argon2.PasswordHasher(
            time_cost=self.time_cost,
            memory_cost=self.memory_kib,
            parallelism=self.parallelism,
            hash_len=_KEY_LENGTH,
            salt_len=_SALT_LENGTH,
            type=argon2.Type.ID,
        )


# What relayctl writes. ScryptParams is still accepted to write legacy hashes
# (tests, and files shared with an older relayd), never the default.
HashParams = Argon2Params | ScryptParams
DEFAULT_PARAMS: HashParams = Argon2Params()
_KEY_LENGTH = 32
_SALT_LENGTH = 16


@dataclass(frozen=True)
class User:
    """What the rest of relayd may know about a user: never the hash."""

    name: str
    allow_from: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    hash: str
    allow_from: tuple[str, ...]
    tokens: tuple[str, ...] = ()  # API tokens as "ID:CREATED:SHA256", see new_token


# --- password hashes ---------------------------------------------------------


def _derive(password: str, salt: bytes, params: ScryptParams) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=params.maxmem,
        dklen=_KEY_LENGTH,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, params: HashParams = DEFAULT_PARAMS) -> str:
    """Salted hash, encoded with its parameters so they can be raised later."""
    if isinstance(params, Argon2Params):
        return params.hasher().hash(password)
    salt = secrets.token_bytes(_SALT_LENGTH)
    key = _derive(password, salt, params)
    return f"scrypt${params.n}${params.r}${params.p}${_b64(salt)}${_b64(key)}"


def hash_scheme(encoded: str) -> str:
    """ "argon2id" or "scrypt" (legacy): what an encoded hash is."""
    return "scrypt" if encoded.startswith("scrypt$") else "argon2id"


def _parse_argon2(encoded: str) -> argon2.Parameters:
    try:
        params = argon2.extract_parameters(encoded)
    except (InvalidHashError, ValueError) as exc:
        raise ValueError(
            'expected "$argon2id$v=19$m=KiB,t=passes,p=lanes$salt$key" '
            '(or a legacy "scrypt$N$r$p$salt$key")'
        ) from exc
    if params.type is not argon2.Type.ID:
        raise ValueError("only argon2id hashes are accepted")
    if params.memory_cost > MAX_ARGON2_MEMORY_KIB or params.time_cost > MAX_ARGON2_TIME_COST:
        raise ValueError(
            f"argon2id m={params.memory_cost} t={params.time_cost} asks for more than 1 GiB "
            f"or {MAX_ARGON2_TIME_COST} passes"
        )
    return params


def _parse_hash(encoded: str) -> tuple[ScryptParams, bytes, bytes]:
    """Split an encoded scrypt hash; ValueError says what is wrong with it."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError(
            'expected "$argon2id$v=19$m=KiB,t=passes,p=lanes$salt$key" '
            '(or a legacy "scrypt$N$r$p$salt$key")'
        )
    try:
        params = ScryptParams(int(parts[1]), int(parts[2]), int(parts[3]))
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError('expected "scrypt$N$r$p$salt$key" with numbers and base64') from exc
    if params.n < 2 or params.n & (params.n - 1) or params.r < 1 or params.p < 1:
        raise ValueError("scrypt N must be a power of 2 above 1, r and p at least 1")
    if params.maxmem > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt N={params.n} r={params.r} needs more than 1 GiB of memory")
    if not salt or not key:
        raise ValueError("empty salt or key")
    return params, salt, key


def validate_hash(encoded: str) -> None:
    """ValueError saying what is wrong with an encoded hash of either scheme."""
    if hash_scheme(encoded) == "scrypt":
        _parse_hash(encoded)
    else:
        _parse_argon2(encoded)


def check_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches; the compare takes the same time wherever it differs."""
    if hash_scheme(encoded) == "argon2id":
        _parse_argon2(encoded)
        try:
            return bool(_VERIFIER.verify(encoded, password))
        except (VerificationError, InvalidHashError):
            return False
    params, salt, key = _parse_hash(encoded)
    return hmac.compare_digest(_derive(password, salt, params), key)


# argon2-cffi's verify takes every cost from the hash itself.
_VERIFIER = argon2.PasswordHasher()
_DUMMY_HASHES: dict[HashParams, str] = {}


def _dummy_hash(params: HashParams) -> str:
    """A hash of a random password with ``params``, for users that do not exist."""
    dummy = _DUMMY_HASHES.get(params)
    if dummy is None:
        dummy = _DUMMY_HASHES[params] = hash_password(secrets.token_urlsafe(16), params)
    return dummy


# --- names and patterns ------------------------------------------------------


def _has_control(text: str) -> bool:
    return any(ch.isspace() or not ch.isprintable() for ch in text)


def normalize_name(name: str) -> str:
    """The stored (lower-cased) form of a login name, or UserError saying why not."""
    bad = [ch for ch in name if not (ch.isalnum() or ch in _NAME_PUNCTUATION)]
    if not name or len(name) > MAX_NAME_LENGTH:
        raise UserError(f"bad user name {name!r}: must be 1 to {MAX_NAME_LENGTH} characters")
    if bad:
        raise UserError(
            f"bad user name {name!r}: {bad[0]!r} not allowed; use letters, digits and . - _ + @"
        )
    if name.count("@") > 1 or name.startswith("@") or name.endswith("@"):
        raise UserError(
            f"bad user name {name!r}: use an address like alice@example.com "
            "or a bare name like app1"
        )
    return name.lower()


def normalize_pattern(pattern: str) -> str:
    """The stored (lower-cased) form of an allow_from glob, or UserError saying why not."""
    if not pattern or "@" not in pattern or _has_control(pattern):
        raise UserError(
            f"bad --allow-from pattern {pattern!r}: a glob on the whole address "
            "with an @ and no spaces, e.g. '*@example.com'"
        )
    return pattern.lower()


def _normalize_password(password: str) -> str:
    """Refuse passwords no SMTP client could ever send back to us."""
    if not password:
        raise UserError("empty password refused")
    if any(ch in password for ch in "\0\r\n"):
        raise UserError("password must not contain NUL or line breaks")
    return password


# --- the file ----------------------------------------------------------------


def _toml_line(message: str) -> tuple[int | None, str]:
    """tomllib puts "(at line N, column M)" at the end; move it where operators look."""
    found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if not found:
        return None, message
    return int(found[1]), f"{message[: found.start()]} (column {found[2]})"


def _header_line(text: str, raw_name: str) -> int | None:
    """Line of the ``[users."NAME"]`` table, so an error points at it."""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[users.") and stripped.endswith("]"):
            key = stripped[len("[users.") : -1].strip().strip("\"'")
            if key == raw_name:
                return number
    return None


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise UserFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise UserFileError(f"{path}: cannot read: {exc.strerror}") from exc


def _entry_from_toml(raw_name: str, value: Any) -> tuple[str, _Entry]:
    """One ``[users."NAME"]`` table; ValueError/UserError say which key is wrong."""
    name = normalize_name(raw_name)
    if not isinstance(value, dict):
        raise ValueError("expected a table with hash and allow_from")
    unknown = sorted(set(value) - {"hash", "allow_from", "tokens"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: hash, allow_from, tokens)")
    encoded = value.get("hash")
    if not isinstance(encoded, str):
        raise ValueError("hash: missing or not a string")
    try:
        validate_hash(encoded)
    except ValueError as exc:
        raise ValueError(f"hash: {exc}") from exc
    patterns = value.get("allow_from", [])
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ValueError('allow_from: expected a list of strings like ["*@example.com"]')
    tokens = value.get("tokens", [])
    if not isinstance(tokens, list) or not all(_stored_token_ok(t) for t in tokens):
        raise ValueError("tokens: expected entries made by `relayctl user token`")
    return name, _Entry(encoded, tuple(normalize_pattern(p) for p in patterns), tuple(tokens))


def _entries_from_toml(path: Path, text: str, data: dict[str, Any]) -> dict[str, _Entry]:
    unknown = sorted(set(data) - {"users"})
    if unknown:
        raise UserFileError(f"{path}: unknown key {unknown[0]!r}; the file holds only [users.NAME]")
    users = data.get("users", {})
    if not isinstance(users, dict):
        raise UserFileError(f'{path}: users: expected tables like [users."alice@example.com"]')
    entries: dict[str, _Entry] = {}
    for raw_name, value in users.items():
        where = _where(path, _header_line(text, raw_name))
        try:
            name, entry = _entry_from_toml(raw_name, value)
        except (ValueError, UserError) as exc:
            raise UserFileError(
                f'{where}: [users."{raw_name}"] {exc}; fix it by hand, or delete that '
                f"table and add the user again with `relayctl user add`"
            ) from exc
        if name in entries:
            raise UserFileError(
                f"{where}: user {raw_name!r} is listed twice (names ignore case); remove one"
            )
        entries[name] = entry
    return entries


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _set_ownership(fd: int, path: Path, group: str) -> str | None:
    """Owner, group and mode for the new version of ``path``; a note when they fall back.

    An existing file keeps its owner (when we are root), group and mode: the
    operator chose them. A new one gets mode 0640, owner root (relayctl runs
    as root) and the daemon's group, so the daemon can read it on a fresh
    install; without that group (a dev or test machine) it keeps the group
    of whoever runs relayctl, and the note says so.
    """
    root = os.geteuid() == 0
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    if st is not None:
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        try:
            os.fchown(fd, st.st_uid if root else -1, st.st_gid)
        except PermissionError as exc:
            raise UserError(
                f"{path}: cannot keep its group (gid {st.st_gid}); run as root or as a member "
                "of that group"
            ) from exc
        return None
    os.fchmod(fd, FILE_MODE)
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        mine = _group_name(os.getegid())
        return (
            f"group {group} (the daemon's) does not exist; {path} is group {mine} instead, "
            "make sure the daemon can read it"
        )
    try:
        os.fchown(fd, 0 if root else -1, gid)
    except PermissionError:
        mine = _group_name(os.getegid())
        return (
            f"cannot give {path} to group {group} without root; it is group {mine} instead, "
            f"run `chgrp {group} {path}` as root"
        )
    return None


def _write_atomically(path: Path, text: str, group: str = DAEMON_GROUP) -> str | None:
    """tmp in the same directory, fsync, rename, fsync dir: readers see old or new."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        note = _set_ownership(fd, path, group)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return note


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write runs of relayctl so two adds don't lose one.

    The lock is on the directory, so no lock file is left next to the users file.
    """
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot open directory: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class UserDB:
    """The users file in memory; every change is made here and then saved."""

    def __init__(self, params: HashParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._entries: dict[str, _Entry] = {}

    @classmethod
    def load(cls, path: Path | str, params: HashParams = DEFAULT_PARAMS) -> UserDB:
        """Read ``path``; a missing file is an empty db (no users yet, not an error)."""
        path = Path(path)
        db = cls(params)
        text = _read_text(path)
        if text is None:
            return db
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            line, message = _toml_line(str(exc))
            raise UserFileError(
                f"{_where(path, line)}: {message}; fix the TOML syntax there"
            ) from exc
        db._entries = _entries_from_toml(path, text, data)
        return db

    def save(self, path: Path | str, group: str = DAEMON_GROUP) -> str | None:
        """Write atomically; a new file is 0640 root:``group``, an existing one keeps
        its owner, group and mode. Returns a note when the group had to fall back.
        """
        path = Path(path)
        data = {
            "users": {name: _entry_table(entry) for name, entry in sorted(self._entries.items())}
        }
        try:
            return _write_atomically(path, _HEADER + tomli_w.dumps(data), group)
        except OSError as exc:
            raise UserError(f"{path}: cannot write: {exc.strerror}") from exc

    def add(self, name: str, password: str, allow_from: Iterable[str] = ()) -> User:
        """Add a new user; an existing one is an error so a typo can't reset a password."""
        key = normalize_name(name)
        if key in self._entries:
            raise UserError(f"user {key} exists already; use `relayctl user passwd {key}`")
        patterns = tuple(dict.fromkeys(normalize_pattern(p) for p in allow_from))
        encoded = hash_password(_normalize_password(password), self.params)
        self._entries[key] = _Entry(encoded, patterns)
        return User(key, patterns)

    def set_password(self, name: str, password: str) -> None:
        key = self._existing(name)
        encoded = hash_password(_normalize_password(password), self.params)
        self._entries[key] = replace(self._entries[key], hash=encoded)

    # -- API tokens (SPEC §10): random secrets, stored as their SHA-256 only

    def add_token(self, name: str, now: float) -> tuple[str, str]:
        """A new token for ``name``: (id, secret). Only the hash is kept."""
        key = self._existing(name)
        token_id, secret = new_token()
        stored = f"{token_id}:{int(now)}:{_token_digest(secret)}"
        entry = self._entries[key]
        self._entries[key] = replace(entry, tokens=(*entry.tokens, stored))
        return token_id, secret

    def token_list(self, name: str) -> list[tuple[str, int]]:
        """(id, created) of each of the user's tokens."""
        entry = self._entries[self._existing(name)]
        return [(t.split(":")[0], int(t.split(":")[1])) for t in entry.tokens]

    def revoke_token(self, name: str, token_id: str) -> None:
        key = self._existing(name)
        entry = self._entries[key]
        kept = tuple(t for t in entry.tokens if t.split(":")[0] != token_id)
        if len(kept) == len(entry.tokens):
            raise UserError(f"user {key} has no token {token_id}")
        self._entries[key] = replace(entry, tokens=kept)

    def token_owner(self, secret: str) -> str | None:
        """The user a bearer token belongs to, or None. Constant-time on the digest."""
        token_id = _token_id(secret)
        if token_id is None:
            return None
        digest = _token_digest(secret)
        for name, entry in self._entries.items():
            for stored in entry.tokens:
                sid, _, rest = stored.partition(":")
                if sid == token_id and hmac.compare_digest(rest.partition(":")[2], digest):
                    return name
        return None

    def delete(self, name: str) -> None:
        del self._entries[self._existing(name)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> User | None:
        """The user, or None; lookup ignores case like the rest of an address."""
        entry = self._entries.get(name.lower())
        return None if entry is None else User(name.lower(), entry.allow_from)

    def verify(self, name: str, password: str) -> bool:
        """Check a login; CPU-bound (see the module docstring), so call it off the loop.

        An unknown user still costs one hash, against a dummy hash made
        with the same parameters as new users get, so the reply time does
        not tell a guesser which names exist.
        """
        entry = self._entries.get(name.lower())
        if entry is None:
            check_password(password, _dummy_hash(self.params))
            return False
        return check_password(password, entry.hash)

    def legacy_hash(self, name: str) -> bool:
        """True when the user's hash is the old scrypt one (``relayctl user passwd`` fixes it)."""
        entry = self._entries.get(name.lower())
        return entry is not None and hash_scheme(entry.hash) == "scrypt"

    def upgrade_hash(self, name: str, password: str) -> bool:
        """Rehash a legacy entry with the current parameters; False if nothing changed.

        Only call it with a password that has just verified.
        """
        key = name.lower()
        entry = self._entries.get(key)
        if entry is None or hash_scheme(entry.hash) != "scrypt":
            return False
        self._entries[key] = replace(entry, hash=hash_password(password, self.params))
        return True

    def _existing(self, name: str) -> str:
        key = name.lower()
        if key not in self._entries:
            raise UserError(f"no such user: {name}")
        return key


_FileKey = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: no file


class UserStore:
    """The daemon's view of the users file, re-read whenever the file changes.

    A stat per lookup is far cheaper than the hash that follows it, and it
    makes ``relayctl user ...`` take effect at once. A file that fails to
    parse (say, half-edited by hand) keeps the users loaded before it, with
    one warning per broken version rather than one per login attempt.
    """

    def __init__(self, path: Path | str, params: HashParams = DEFAULT_PARAMS) -> None:
        self.path = Path(path)
        self.params = params
        self._db = UserDB(params)
        self._key: _FileKey | str = "unread"
        self._legacy_warned: set[str] = set()

    def current(self) -> UserDB:
        key = self._stat()
        if key != self._key:
            self._key = key
            self._reload()
        return self._db

    async def verify(self, name: str, password: str) -> bool:
        """Like UserDB.verify, in the password pool so other sessions keep moving.

        The pool (relayd.workers.HASH) has its own threads and a bounded
        queue, so password checks never wait behind DKIM or SPF work.
        """
        db = self.current()
        ok = await workers.HASH.run(db.verify, name, password)
        if ok and db.legacy_hash(name):
            self._warn_legacy(name.lower())
        return ok

    def _warn_legacy(self, name: str) -> None:
        """Once per user and process: the daemon may not rewrite the file itself."""
        if name in self._legacy_warned:
            return
        self._legacy_warned.add(name)
        event(
            "smtpd",
            f"warning: user {escape.printable(name)} still has a scrypt password hash; "
            f"run `relayctl user passwd {escape.printable(name)}` (or `relayctl user test`) "
            "to store it as argon2id",
            level=logging.WARNING,
        )

    def _stat(self) -> _FileKey | str:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"error: {exc.strerror}"
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload(self) -> None:
        try:
            db = UserDB.load(self.path, self.params)
        except UserError as exc:
            event(
                "smtpd",
                f"warning: {exc}; keeping the {len(self._db.names())} users loaded before",
                level=logging.WARNING,
            )
            return
        self._db = db
        if self._key is None:
            event("smtpd", f"users file {self.path} does not exist yet: no submission users")
        else:
            event("smtpd", f"users file {self.path}: {len(db.names())} users")


# --- API tokens -----------------------------------------------------------------

_TOKEN_PREFIX = "rly_"


def new_token() -> tuple[str, str]:
    """(id, secret): the secret carries its id, so a lookup needs no scan of hashes."""
    token_id = secrets.token_hex(4)
    return token_id, f"{_TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def _token_id(secret: str) -> str | None:
    if not secret.startswith(_TOKEN_PREFIX) or len(secret) > 200:
        return None
    token_id, sep, _ = secret[len(_TOKEN_PREFIX) :].partition("_")
    return token_id if sep and len(token_id) == 8 else None


def _token_digest(secret: str) -> str:
    """SHA-256 is enough: a token is 256 random bits, not a password someone chose."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def _stored_token_ok(value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = value.split(":")
    return len(parts) == 3 and len(parts[0]) == 8 and parts[1].isdigit() and len(parts[2]) == 64


def _entry_table(entry: _Entry) -> dict[str, Any]:
    table: dict[str, Any] = {"hash": entry.hash, "allow_from": list(entry.allow_from)}
    if entry.tokens:
        table["tokens"] = list(entry.tokens)
    return table


def cmd_user_token(
    path: Path | str, name: str, *, revoke: str | None = None, listing: bool = False
) -> tuple[str, str] | list[tuple[str, int]] | None:
    """``relayctl user token NAME [--list | --revoke ID]``."""
    if listing:
        return UserDB.load(path).token_list(name)
    with _locked(Path(path)):
        db = UserDB.load(path)
        if revoke is not None:
            db.revoke_token(name, revoke)
            db.save(path)
            return None
        created = db.add_token(name, time.time())
        db.save(path)
        return created


# --- relayctl user ... ---------------------------------------------------------


def cmd_user_add(
    path: Path | str,
    name: str,
    password: str,
    allow_from: Iterable[str] = (),
    *,
    params: HashParams = DEFAULT_PARAMS,
    group: str = DAEMON_GROUP,
) -> str | None:
    """``relayctl user add NAME [--allow-from PATTERN ...]``.

    Creates the file, when missing, 0640 root:``group`` (SPEC §9); returns a
    note for the operator when that group could not be used.
    """
    with _locked(Path(path)):
        db = UserDB.load(path, params)
        db.add(name, password, allow_from)
        return db.save(path, group)


def cmd_user_passwd(
    path: Path | str, name: str, password: str, *, params: HashParams = DEFAULT_PARAMS
) -> None:
    """``relayctl user passwd NAME``; also rehashes with the current parameters."""
    with _locked(Path(path)):
        db = UserDB.load(path, params)
        db.set_password(name, password)
        db.save(path)


def cmd_user_del(path: Path | str, name: str) -> None:
    """``relayctl user del NAME``."""
    with _locked(Path(path)):
        db = UserDB.load(path)
        db.delete(name)
        db.save(path)


def cmd_user_list(path: Path | str) -> list[User]:
    """``relayctl user list``: users by name, without their hashes."""
    db = UserDB.load(path)
    return [user for name in db.names() if (user := db.get(name)) is not None]


def cmd_user_legacy(path: Path | str) -> list[str]:
    """Users whose password is still a scrypt hash (``relayctl user list`` marks them)."""
    db = UserDB.load(path)
    return [name for name in db.names() if db.legacy_hash(name)]


def cmd_user_upgrade(path: Path | str, name: str, password: str) -> bool:
    """After ``relayctl user test`` verified ``password``: store a legacy hash as argon2id."""
    with _locked(Path(path)):
        db = UserDB.load(path)
        if not (db.legacy_hash(name) and db.verify(name, password)):
            return False
        db.upgrade_hash(name, password)
        db.save(path)
        return True


def read_password(
    stdin: bool,
    *,
    stream: TextIO | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
) -> str:
    """One line from stdin (``--password-stdin``), or a prompt typed twice.

    Only the line break is stripped from stdin: spaces may be part of a password.
    """
    if stdin:
        line = (stream or sys.stdin).readline()
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        password = prompt("Password: ")
        if password and prompt("Retype password: ") != password:
            raise UserError("passwords do not match")
    return _normalize_password(password)

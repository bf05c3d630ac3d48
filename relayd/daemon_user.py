"""Can the daemon's user read a file? Asked by `relayd --check-config` run as root.

relayd.service runs the daemon as the user ``relayd``, while the operator
runs ``relayd --check-config`` as root, who can read everything. A file
root wrote ``0640 root:root`` passes the check and then stops the daemon
at start; so, run as root on a host with the ``relayd`` user, the check
also asks whether that user could open each file the config names (the
mode bits of the file and of each directory on the way; ACLs are not
consulted).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DAEMON_USER", "DaemonUser", "daemon_user"]

# User= in systemd/relayd.service.
DAEMON_USER = "relayd"


@dataclass(frozen=True)
class DaemonUser:
    name: str
    uid: int
    gid: int
    groups: frozenset[int]

    def _allowed(self, st: os.stat_result, bit_owner: int, bit_group: int, bit_other: int) -> bool:
        if st.st_uid == self.uid:
            return bool(st.st_mode & bit_owner)
        if st.st_gid in self.groups:
            return bool(st.st_mode & bit_group)
        return bool(st.st_mode & bit_other)

    def cannot_read(self, path: Path) -> str | None:
        """Why this user could not open ``path`` for reading; None if it could.

        Only files that exist are judged (a missing file is reported elsewhere).
        """
        path = Path(os.path.abspath(path))
        try:
            st = path.stat()
        except OSError:
            return None
        for directory in reversed(path.parents):
            try:
                dst = directory.stat()
            except OSError:
                return None
            if not self._allowed(dst, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                return (
                    f"the daemon's user {self.name} cannot reach {str(path)!r}: the directory "
                    f"{str(directory)!r} is {_describe(dst)}; fix: chgrp {self.name} "
                    f"{directory} && chmod g+x {directory}"
                )
        if not self._allowed(st, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
            return (
                f"the daemon's user {self.name} cannot read {str(path)!r} ({_describe(st)}); "
                f"fix: chgrp {self.name} {path} && chmod g+r {path}"
            )
        return None


def _describe(st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.S_IMODE(st.st_mode):04o} {owner}:{group}"


def daemon_user(name: str = DAEMON_USER) -> DaemonUser | None:
    """The daemon's user when this process is root and that user exists, else None.

    Not root: the check already runs with at most the rights the daemon has
    (or as the daemon's user itself). No such user: not installed as a service.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = {entry.pw_gid}
    with contextlib.suppress(OSError):
        groups.update(os.getgrouplist(name, entry.pw_gid))
    return DaemonUser(name, entry.pw_uid, entry.pw_gid, frozenset(groups))

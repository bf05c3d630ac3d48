"""The answer every policy check gives: accept, or an SMTP reply refusing.

Policy modules are plain functions of plain data returning a Verdict, so
they are tested without sockets; the session turns a refusal into its reply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refuse:
    """Refuse this step with ``code enhanced text``; 4xx is temporary."""

    code: int
    enhanced: str
    text: str

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


Verdict = Refuse | None  # None: go on

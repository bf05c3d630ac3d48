"""The API's one error type: an HTTP status and the SMTP reply it stands for."""

from __future__ import annotations

from typing import Any

from relayd.policy.verdict import Refuse

# SPEC section 10: which HTTP status a refusal becomes, by its SMTP reply.
_STATUS_BY_REPLY = {
    "553": 403,  # sender not owned
    "550": 403,  # From: not owned, suppressed
    "554": 400,
    "501": 400,
    "552": 413,
    "450": 429,  # rate limit
    "452": 503,
    "451": 503,
    "421": 429,
    "454": 429,
}


class ApiError(Exception):
    """An answer other than 202: HTTP ``status``, and the SMTP reply it means."""

    def __init__(self, status: int, code: int, enhanced: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.enhanced, self.message = status, code, enhanced, message

    @classmethod
    def of(cls, refusal: Refuse) -> ApiError:
        status = _STATUS_BY_REPLY.get(str(refusal.code), 400)
        return cls(status, refusal.code, refusal.enhanced, refusal.text)

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "enhanced": self.enhanced, "message": self.message}}

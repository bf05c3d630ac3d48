"""The rate limiter and AUTH guard a process uses: shared through Redis, or its own."""

from __future__ import annotations

from relayd.config import Config
from relayd.policy.authguard import AuthGuard
from relayd.policy.ratelimit import RateLimiter
from relayd.policy.shared_counts import SharedCounts
from relayd.policy.shared_counts import SharedRateLimiter as HostRateLimiter


def counters(config: Config, shared: SharedCounts | None) -> tuple[RateLimiter, AuthGuard]:
    """With ``[cluster] redis``: counted across nodes (locally while it is down).

    Otherwise rates are counted in ``shared``, the segment every process of
    this host counts in (relayd.policy.shared_counts), or by this process
    alone without one.

    The Redis client (about 16 MB once imported) is loaded only when a
    cluster is configured, so a single node does not carry it.
    """
    local_guard = AuthGuard.in_spool(config.spool.path, config.auth)
    if config.cluster.redis is None:
        if shared is None:
            return RateLimiter(config.rate_limits), local_guard
        return HostRateLimiter(config.rate_limits, shared), local_guard
    from relayd.cluster.auth import SharedAuthGuard
    from relayd.cluster.limits import SharedRateLimiter
    from relayd.cluster.store import Store

    store = Store(config.cluster.redis)
    return SharedRateLimiter(config.rate_limits, store), SharedAuthGuard(local_guard, store)

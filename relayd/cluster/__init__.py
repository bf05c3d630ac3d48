"""Counters shared by several relayd nodes through Redis (SPEC section 11).

Each node keeps its own spool; what must be counted across nodes is kept in
Redis (or Valkey) with one atomic Lua script per decision: message rate
limits (``limits``) and wrong-password counts (``auth``). When the store
cannot be reached, a node counts locally (the classes fall back to the
single-node implementations they extend), says so in the log at most once
a minute, tries Redis again after ``RETRY_AFTER`` seconds, and never
refuses mail because of it (``store``).
"""

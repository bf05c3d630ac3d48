"""relayd: a lightweight, self-hosted mail transfer agent and relay daemon."""

__version__ = "0.1.0"

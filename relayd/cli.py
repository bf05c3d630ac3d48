"""The ``relayd`` command: check a config, or run the daemon in the foreground.

Exit statuses follow sysexits: 0 fine, 1 ``--check-config`` found problems,
78 (EX_CONFIG) the daemon cannot start on its config, so systemd's
``RestartPreventExitStatus=78`` stops a restart loop.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from relayd import __version__
from relayd.config import DEFAULT_PATH, Config, ConfigError, check_files, load_config

EX_CONFIG = 78


DEV_PATH = Path("var/relayd.toml")  # what `make run` writes, in a source checkout


def config_path(arg: str | None) -> Path:
    """``--config`` beats ``$RELAYD_CONFIG`` beats /etc/relayd.toml (SPEC §1).

    Extension: where /etc/relayd.toml does not exist but ./var/relayd.toml
    does (a checkout started with `make run`), that one is used, so the
    README's commands work as written on a developer's machine.
    """
    if arg:
        return Path(arg)
    env = os.environ.get("RELAYD_CONFIG")
    if env:
        return Path(env)
    if not DEFAULT_PATH.exists() and DEV_PATH.is_file():
        return DEV_PATH
    return DEFAULT_PATH


def load_checked(path: Path) -> tuple[Config | None, list[str], list[str]]:
    """The config and its (errors, warnings); config is None when it did not parse."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        if exc.partial is None:  # not even TOML: nothing more to look at
            return None, exc.problems, []
        file_errors, file_warnings = check_files(exc.partial)
        return None, _merged(exc.problems, file_errors), file_warnings
    errors, warnings = check_files(config)
    return config, errors, list(config.warnings) + warnings


def _merged(*groups: list[str]) -> list[str]:
    """Problem lines of several checks in file order (by line number), each once."""
    lines = list(dict.fromkeys(line for group in groups for line in group))
    return sorted(lines, key=_line_number)


def _line_number(problem: str) -> int:
    # "relayd: PATH:LINE: ..." -- the path may itself hold colons, the line does not.
    head = problem.split(": ", 2)[1] if problem.count(": ") >= 2 else ""
    number = head.rpartition(":")[2]
    return int(number) if number.isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayd", description="relayd mail relay daemon")
    parser.add_argument(
        "--config", metavar="PATH", help=f"config file (default {DEFAULT_PATH}, or $RELAYD_CONFIG)"
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config and the files it names, then exit 0 or 1",
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    args = parser.parse_args(argv)
    path = config_path(args.config)
    config, errors, warnings = load_checked(path)
    for line in warnings:
        print(line, file=sys.stderr)
    for line in errors:
        print(line, file=sys.stderr)
    if args.check_config:
        if not errors:
            print(f"relayd: {path}: configuration OK")
        return 1 if errors else 0
    if errors or config is None:
        return EX_CONFIG
    from relayd import daemon

    return daemon.run(config)


if __name__ == "__main__":
    sys.exit(main())

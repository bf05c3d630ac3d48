#!/bin/sh
# Remove what systemd/install.sh installed, keeping the data.
#
#   sudo sh systemd/uninstall.sh
#   DESTDIR=/tmp/stage sh systemd/uninstall.sh
#
# Removed: the units (stopped and disabled first), the sysusers.d and
# tmpfiles.d entries, the PREFIX/bin links, /usr/sbin/sendmail and /usr/bin/mailq
# when they are relayd's, and the /opt/relayd virtualenv.
# Kept, so that mail and settings survive a reinstall: the queue in
# /var/spool/relayd, /etc/relayd.toml, /etc/relayd/ (users, TLS, DKIM keys)
# and the relayd user that owns the spool.
#
# Environment: DESTDIR and PREFIX as for install.sh.
set -eu

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}

VENV=/opt/relayd/venv
UNITDIR=/etc/systemd/system
SYSUSERSDIR=/usr/lib/sysusers.d
TMPFILESDIR=/usr/lib/tmpfiles.d
SPOOL=/var/spool/relayd
CONFDIR=/etc/relayd
CONFIG=/etc/relayd.toml
UNITS="relayd.service relayd.socket relayd-submission.socket relayd-submissions.socket"

say() { printf 'uninstall.sh: %s\n' "$*"; }
die() { printf 'uninstall.sh: error: %s\n' "$*" >&2; exit 1; }

check() {
    case $DESTDIR in
        '' | /*) ;;
        *) DESTDIR=$(pwd)/$DESTDIR ;;
    esac
    if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
        die "run as root (or set DESTDIR=dir)"
    fi
}

systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

stop_units() {
    if [ -n "$DESTDIR" ]; then
        say "would run: systemctl disable --now $UNITS"
    elif systemd_running; then
        say "running: systemctl disable --now $UNITS"
        # shellcheck disable=SC2086
        systemctl disable --now $UNITS || say "(some units were not loaded)"
    fi
}

remove_files() {
    for u in $UNITS; do
        rm -f "$DESTDIR$UNITDIR/$u"
    done
    rm -f "$DESTDIR$SYSUSERSDIR/relayd.conf" "$DESTDIR$TMPFILESDIR/relayd.conf"
    say "removed the units, sysusers.d and tmpfiles.d entries"
    if [ -d "$DESTDIR$UNITDIR/relayd.service.d" ]; then
        say "kept your drop-ins in $UNITDIR/relayd.service.d"
    fi
}

# Only links that point into our venv: never delete another program.
remove_links() {
    for cmd in relayd relayctl relayd-sendmail; do
        remove_link "$PREFIX/bin/$cmd" "$VENV/bin/$cmd"
    done
    remove_link /usr/sbin/sendmail "$VENV/bin/relayd-sendmail"
    remove_link /usr/bin/mailq "$VENV/bin/relayd-sendmail"
}

# remove_link PATH TARGET -- only when PATH is our link to TARGET.
remove_link() {
    link=$DESTDIR$1
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$2" ]; then
        rm -f "$link"
        say "removed $1"
    elif [ -e "$link" ] || [ -L "$link" ]; then
        say "left $1 alone: it is not a link to $2"
    fi
}

remove_venv() {
    rm -rf -- "$DESTDIR$VENV"
    rmdir -- "$DESTDIR$(dirname "$VENV")" 2>/dev/null || true
    say "removed $VENV"
}

reload_systemd() {
    if [ -n "$DESTDIR" ]; then
        say "would run: systemctl daemon-reload"
    elif systemd_running; then
        systemctl daemon-reload
    fi
}

kept() {
    echo
    echo "Kept (remove them yourself once the queue is empty and you are sure):"
    printf '  %-24s %s\n' "$SPOOL/" "the mail queue, possibly with undelivered mail" \
        "$CONFIG" "your configuration" \
        "$CONFDIR/" "submission users, TLS certificates, DKIM keys" \
        "user and group relayd" "owner of the spool"
    echo "To remove everything:"
    echo "  rm -rf $SPOOL $CONFDIR $CONFIG && userdel relayd"
}

main() {
    check
    stop_units
    remove_files
    remove_links
    remove_venv
    reload_systemd
    kept
}

main "$@"

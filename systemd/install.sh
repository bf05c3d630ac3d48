#!/bin/sh
# Install relayd from this source tree as a systemd service.
#
#   sudo sh systemd/install.sh                  # onto this machine
#   DESTDIR=/tmp/stage sh systemd/install.sh    # into a staging directory
#
# What it does: a virtualenv in /opt/relayd/venv with relayd installed into
# it (so relayd's dependencies never mix with the system's Python), links
# PREFIX/bin/relayd, relayctl and relayd-sendmail to it (and /usr/sbin/sendmail
# and /usr/bin/mailq when no other MTA owns them), the systemd units, the
# sysusers.d/tmpfiles.d entries, the relayd user, the spool and /etc/relayd,
# and /etc/relayd.toml from etc/relayd.toml unless that file already exists.
# Running it again upgrades relayd in place and keeps the config.
#
# Environment:
#   DESTDIR   install under this directory instead of /. Nothing outside it
#             is touched: creating the user, changing owners and systemctl
#             are printed ("would run: ...") instead of done.
#   PREFIX    where the command links go: PREFIX/bin (default /usr/local).
#   PYTHON    interpreter for the virtualenv (default python3; 3.11 or newer).
#   PIP_ARGS  extra words for `pip install`, e.g. for an offline install:
#             PIP_ARGS="--no-index --find-links /path/to/wheels"
set -eu

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
PYTHON=${PYTHON:-python3}
PIP_ARGS=${PIP_ARGS:-}

# Fixed locations: the unit files name them, so they do not follow PREFIX.
VENV=/opt/relayd/venv
UNITDIR=/etc/systemd/system
SYSUSERSDIR=/usr/lib/sysusers.d
TMPFILESDIR=/usr/lib/tmpfiles.d
SPOOL=/var/spool/relayd
CONFDIR=/etc/relayd
CONFIG=/etc/relayd.toml
UNITS="relayd.service relayd.socket relayd-submission.socket relayd-submissions.socket"

SRC=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# Change the running system, or under DESTDIR only say what would be done.
system() {
    if [ -n "$DESTDIR" ]; then
        say "would run: $*"
    else
        say "running: $*"
        "$@"
    fi
}

systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

check() {
    case $DESTDIR in
        '' | /*) ;;
        *) DESTDIR=$(pwd)/$DESTDIR ;;
    esac
    for f in pyproject.toml etc/relayd.toml systemd/relayd.sysusers systemd/relayd.tmpfiles; do
        [ -f "$SRC/$f" ] || die "$SRC/$f is missing; run this from a relayd source tree"
    done
    for u in $UNITS; do
        [ -f "$SRC/systemd/$u" ] || die "$SRC/systemd/$u is missing"
    done
    if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
        die "run as root (or set DESTDIR=dir to stage the files there)"
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "$PYTHON is missing or older than Python 3.11 (set PYTHON=...)"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
        die "$PYTHON cannot create virtualenvs; on Debian: apt install python3-venv"
}

# A venv records its own path; a staged one is fixed up to work once the
# tree is copied from DESTDIR to /.
relocate_venv() {
    for f in "$DESTDIR$VENV"/bin/* "$DESTDIR$VENV/pyvenv.cfg"; do
        if [ -f "$f" ] && [ ! -L "$f" ] && grep -qF "$DESTDIR$VENV" "$f"; then
            sed -i "s|$DESTDIR$VENV|$VENV|g" "$f"
        fi
    done
}

install_venv() {
    say "installing relayd into the virtualenv $VENV"
    mkdir -p "$DESTDIR$VENV"
    "$PYTHON" -m venv "$DESTDIR$VENV"
    # PIP_ARGS is a list of words on purpose.
    # shellcheck disable=SC2086
    "$DESTDIR$VENV/bin/python" -m pip install --disable-pip-version-check $PIP_ARGS "$SRC"
    [ -z "$DESTDIR" ] || relocate_venv
}

install_links() {
    mkdir -p "$DESTDIR$PREFIX/bin"
    for cmd in relayd relayctl relayd-sendmail; do
        ln -sfn "$VENV/bin/$cmd" "$DESTDIR$PREFIX/bin/$cmd"
        say "linked $PREFIX/bin/$cmd -> $VENV/bin/$cmd"
    done
}

# /usr/sbin/sendmail and /usr/bin/mailq, unless another MTA owns them: its
# package would fight over the files, and it may be the operator's choice.
install_mta_links() {
    for path in /usr/sbin/sendmail /usr/bin/mailq; do
        target=$(readlink "$DESTDIR$path" 2>/dev/null || true)
        if [ -e "$DESTDIR$path" ] || [ -L "$DESTDIR$path" ]; then
            if [ "$target" != "$VENV/bin/relayd-sendmail" ]; then
                say "kept $path: it belongs to another MTA (${target:-a file});" \
                    "relayd's is $PREFIX/bin/relayd-sendmail"
                continue
            fi
        fi
        mkdir -p "$DESTDIR$(dirname "$path")"
        ln -sfn "$VENV/bin/relayd-sendmail" "$DESTDIR$path"
        say "linked $path -> $VENV/bin/relayd-sendmail"
    done
}

install_units() {
    install -d -m 0755 "$DESTDIR$UNITDIR" "$DESTDIR$SYSUSERSDIR" "$DESTDIR$TMPFILESDIR"
    for u in $UNITS; do
        install -m 0644 "$SRC/systemd/$u" "$DESTDIR$UNITDIR/$u"
    done
    install -m 0644 "$SRC/systemd/relayd.sysusers" "$DESTDIR$SYSUSERSDIR/relayd.conf"
    install -m 0644 "$SRC/systemd/relayd.tmpfiles" "$DESTDIR$TMPFILESDIR/relayd.conf"
    say "installed the units in $UNITDIR, sysusers.d and tmpfiles.d entries (relayd.conf)"
}

create_user() {
    if [ -n "$DESTDIR" ]; then
        say "would run: systemd-sysusers $SYSUSERSDIR/relayd.conf (create user relayd)"
    elif command -v systemd-sysusers >/dev/null 2>&1; then
        system systemd-sysusers "$SYSUSERSDIR/relayd.conf"
    elif getent passwd relayd >/dev/null; then
        say "user relayd exists"
    else
        system useradd --system --user-group --home-dir "$SPOOL" --no-create-home \
            --shell /usr/sbin/nologin --comment "relayd mail relay" relayd
    fi
}

# make_dir MODE OWNER:GROUP PATH -- the same entries as relayd.tmpfiles.
make_dir() {
    install -d -m "$1" "$DESTDIR$3"
    chmod "$1" "$DESTDIR$3"
    system chown "$2" "$3"
}

make_dirs() {
    make_dir 0750 relayd:relayd "$SPOOL"
    make_dir 0750 root:relayd "$CONFDIR"
    make_dir 0750 root:relayd "$CONFDIR/tls"
    make_dir 0750 root:relayd "$CONFDIR/dkim"
}

install_config() {
    if [ -e "$DESTDIR$CONFIG" ] || [ -L "$DESTDIR$CONFIG" ]; then
        say "keeping the existing $CONFIG (see etc/relayd.toml for new keys)"
        return
    fi
    install -d -m 0755 "$DESTDIR$(dirname "$CONFIG")"
    install -m 0640 "$SRC/etc/relayd.toml" "$DESTDIR$CONFIG"
    system chown root:relayd "$CONFIG"
    say "wrote $CONFIG from etc/relayd.toml"
}

reload_systemd() {
    if [ -n "$DESTDIR" ]; then
        say "would run: systemctl daemon-reload"
    elif systemd_running; then
        system systemctl daemon-reload
        if systemctl is-active --quiet relayd.service; then
            say "relayd is running the old version: systemctl restart relayd"
        fi
    else
        say "systemd is not running here; skipped systemctl daemon-reload"
    fi
}

next_steps() {
    cat <<EOF

relayd is installed. Next steps (docs/install.md has the details):
  2. Edit $CONFIG: hostname; delete the port 25 listener if relayd only
     sends (the domain's MX is elsewhere); uncomment [[dkim.key]].
  3. Put the TLS certificate and key where [tls] points ($CONFDIR/tls/,
     0640 root:relayd); with Let's Encrypt, a certbot deploy hook copies
     them there and runs 'relayctl reload'.
  4. Add submission users:      relayctl user add alice@example.com
     Create the DKIM key:       relayctl dkim keygen example.com s1
  5. Check the config:          relayd --check-config
  6. Publish DNS records: SPF, the DKIM TXT record keygen printed, DMARC,
     and ask your provider for the PTR (reverse DNS) of this host.
  7. Start it:                  systemctl enable --now relayd
     Optional socket activation (then no capability is needed):
       systemctl enable --now relayd-submission.socket relayd-submissions.socket
EOF
}

main() {
    check
    [ -z "$DESTDIR" ] || say "staging into DESTDIR=$DESTDIR; the running system is not changed"
    install_venv
    install_links
    install_mta_links
    install_units
    create_user
    make_dirs
    install_config
    reload_systemd
    next_steps
}

main "$@"

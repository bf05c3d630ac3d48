"""The log lines an operator greps for (SPEC section 9), read back from a real relayd.

Every refused command has a ``NOQUEUE: reject:`` line as Postfix writes it,
the disconnect line counts ``auth=1/3`` (succeeded/tried), and each accepted
message logs its ``message-id=<...>`` under its queue id.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
from pathlib import Path

from support.certs import client_context
from support.relayd_proc import Relayd, raw_session, send


def test_refused_mail_from_is_logged_as_noqueue_reject(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        with raw_session(r.port("inbound")) as c:
            assert c.reply().startswith("220")
            assert c.cmd("EHLO client.test").startswith("250")
            reply = c.cmd("MAIL FROM:<bad address@x>")
            assert reply.startswith("5")
            assert c.cmd("NOSUCH thing").startswith("500")
            c.cmd("QUIT")
        text = r.wait_log("reject: MAIL from")
        line = next(ln for ln in text.splitlines() if "reject: MAIL from" in ln)
        assert "NOQUEUE: reject: MAIL from unknown[127.0.0.1]: " + reply[:3] in line
        assert "from=<bad address@x>" in line
        assert "helo=<client.test>" in line
        assert "reject: UNKNOWN from unknown[127.0.0.1]: 500" in r.wait_log("reject: UNKNOWN")
        assert "ehlo=1 mail=0/1 unknown=0/1 quit=1 commands=2/4" in r.wait_log("disconnect")
        assert r.stop() == 0


def test_disconnect_counts_succeeded_of_tried(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.add_user("app1", "secret-pw", "*@app.example")
        r.start()
        with r.smtp("submission") as s:
            s.ehlo("client.test")
            s.starttls(context=client_context())
            s.ehlo("client.test")
            for password in ("wrong-pw", "wrong-again", "secret-pw"):
                s.user, s.password = "app1", password
                with contextlib.suppress(smtplib.SMTPAuthenticationError):
                    s.auth("PLAIN", s.auth_plain)
            s.mail("x@app.example")
            s.rcpt("not an address")
            s.rcpt("y@dest.example")
            s.rset()
        text = r.wait_log("disconnect from")
        line = next(ln for ln in text.splitlines() if "disconnect from" in ln)
        assert " auth=1/3 " in line, line
        assert " rcpt=1/2 " in line, line
        assert " ehlo=2 " in line, line
        assert re.search(r" commands=\d+/\d+$", line), line
        assert r.stop() == 0


def test_accepted_message_logs_its_message_id(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        message = (
            b"From: a@sender.example\r\nMessage-ID:\r\n <abc.123@sender.example>\r\n"
            b"Subject: x\r\n\r\nbody\r\n"
        )
        with r.smtp() as s:
            s.ehlo("client.test")
            qid = send(s, "a@sender.example", ["b@example.com"], message)
        line = r.wait_log("message-id=")
        assert f"{qid}: message-id=<abc.123@sender.example>" in line
        assert r.stop() == 0

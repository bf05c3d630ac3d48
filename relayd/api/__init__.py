"""The HTTP API (SPEC section 10): apps send mail with a POST instead of SMTP.

- ``compose``: the JSON body (or a whole ``message/rfc822``) into the bytes
  of one message, with the standard library's ``email`` package.
- ``submit``: that message through the same rules as authenticated
  submission (sender and ``From:`` ownership, suppression, rate limits,
  DKIM) into the spool; the caller answers 202 only after the commit.
- ``server``: the aiohttp application, its credentials (a submission user's
  password or a bearer token from ``relayctl user token``) and its bounds.
- ``ledger``: what ``GET /v1/messages/ID`` says after a message has left the
  queue.
"""

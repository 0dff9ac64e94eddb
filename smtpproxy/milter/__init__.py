"""Milter mode: the same plugin chain, served to Postfix or Sendmail over the milter protocol.

``smtpproxy milter -c config.yaml`` listens on ``milter.listen`` (``inet:host:port`` or
``unix:/path``); the MTA sends each SMTP event, the chain decides, and verdicts and
message edits go back as milter replies and modification actions. See
``docs/deploy-milter.md``.
"""

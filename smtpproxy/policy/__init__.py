"""Postfix SMTP access policy delegation (``check_policy_service``): the fourth front end."""

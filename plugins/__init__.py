"""First-party plugins. Installed as ``smtpproxy_plugins`` and found through the
``smtpproxy.plugins`` entry point group, exactly like a third-party package's plugins."""

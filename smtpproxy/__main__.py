from smtpproxy.cli import main

raise SystemExit(main())

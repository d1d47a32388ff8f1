"""``python -m gradkit``: the same command line as ``gradkit``."""

from gradkit._cli import main

raise SystemExit(main())

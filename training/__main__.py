"""`python -m training ...` and `accelerate launch -m training ...` run the `ulmfit` command line."""

from .cli import main

raise SystemExit(main())

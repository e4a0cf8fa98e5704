"""`python -m ulmfit ...` and `accelerate launch -m ulmfit ...` run the `ulmfit` command line."""

from .cli import main

raise SystemExit(main())

"""`python -m loadgen`: see `loadgen.cli`."""

from __future__ import annotations

from loadgen.cli import main

raise SystemExit(main())

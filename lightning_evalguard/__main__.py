"""``python -m lightning_evalguard`` is the ``evalguard`` console script."""

from lightning_evalguard.cli import main

raise SystemExit(main())

"""``python -m zembed`` is the ``zembed`` command (used by ``zembed up`` for its children)."""

from zembed.cli import main

main()

"""``python -m worker`` runs the CLI (used to start child workers with the same interpreter)."""

from worker.cli.main import main

main()

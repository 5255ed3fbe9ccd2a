"""The `imgcls-hpo` command line (app.py) and the live view of a running search (progress.py).
Commands import what they need when they run, so that `--help` answers at once."""

from hpo.cli.app import app, main

__all__ = ["app", "main"]

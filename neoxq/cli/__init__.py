"""The `neoxq` command: thin typer commands that parse and forward to library functions (which own
the defaults), and one place (`main`) that turns errors and signals into exit codes."""

from .app import app, main

__all__ = ["app", "main"]

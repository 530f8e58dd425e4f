"""Subcommands of the ``embedkit`` CLI, one module per door; see :mod:`embedkit.cli`."""

"""Exceptions that the CLI turns into one clear line and exit code 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user (config, files, structures): one readable message, exit code 2."""

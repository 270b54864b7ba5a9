"""Exceptions that the CLI turns into one clear line and exit code 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user (config, files, structures): one readable message, exit code 2."""


class ModelBreakdown(Exception):
    """The potential under test misbehaved (non-finite energies, atoms collapsed, no energy
    minimum): a finding about the model, reported as a failed criterion, not as bad input."""

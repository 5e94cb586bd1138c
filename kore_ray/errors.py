"""Errors a user can act on: each names what was wrong and where."""


class KoreError(Exception):
    """Base class for errors kore-ray reports to the user (the CLI prints them without a trace)."""


class InputError(KoreError):
    """Bad user input: a file, row or field that does not fit its schema."""


class ModelError(KoreError):
    """A model path or model file that cannot be used."""

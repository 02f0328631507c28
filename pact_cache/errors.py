"""Typed errors. The library raises these; the CLI prints ``str(err)`` as one line and exits non-zero.

Every message names where the problem is (file, row, part), what is wrong, and how to fix it.
"""


class PactError(Exception):
    """Base class for every error pact-cache raises on bad input or state."""


class DatasetError(PactError):
    """A dataset file or row is malformed."""


class ModelError(PactError):
    """A model or tokenizer cannot be found, loaded or used."""


class TokensError(PactError):
    """A safety-token file is malformed or does not fit the model."""


class CacheError(PactError):
    """A cache is malformed, corrupt, or does not match what it is used with."""


class OutputExistsError(PactError):
    """The output folder already holds something this command must not overwrite."""


class StorageError(CacheError):
    """A storage location or its options cannot work (a malformed endpoint, options of the wrong type)."""

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


def preview(value, width: int = 60) -> str:
    """``value`` for an error message, never longer than ``width`` characters and never expanded past a
    few items: a value a sender controls (a YAML alias bomb, a megabyte string, an integer of 400 digits)
    is shown by its type and a cut preview, so a message costs nothing whatever the input."""
    import math
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        digits = int(math.log10(abs(value))) + 1
        digits -= 10 ** (digits - 1) > abs(value)  # the float logarithm rounds 99...9 up
        return f"<an integer of {digits} digits>"
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 2, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = width
    try:
        text = r.repr(value)
    except Exception:  # a value whose repr fails (an integer past the interpreter's digit limit, ...)
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= width else text[: width - 3] + "..."

"""pact_cache/errors.py: the typed errors and :func:`preview`, how a value a sender controls appears in a message."""

import pytest

from pact_cache.errors import CacheError, DatasetError, ModelError, PactError, StorageError, TokensError, preview


def test_every_error_is_a_pact_error():
    for cls in (CacheError, DatasetError, ModelError, TokensError, StorageError):
        assert issubclass(cls, PactError)
    assert issubclass(StorageError, CacheError)


@pytest.mark.parametrize(
    "value, want",
    [
        ("short", "'short'"),
        (3, "3"),
        (None, "None"),
        (10**400 - 1, "<an integer of 400 digits>"),
        (-(10**100), "<an integer of 101 digits>"),
        (2**64, "<an integer of 20 digits>"),
        (2**63, "9223372036854775808"),
    ],
)
def test_preview_shows_small_values_as_they_are_and_huge_integers_by_size(value, want):
    assert preview(value) == want


def test_preview_is_bounded_whatever_the_value():
    bomb = ["lol"] * 9
    for _ in range(8):  # 9 ** 9 strings, if anything expanded it
        bomb = [bomb] * 9
    for value in ("x" * 10**6, bomb, {"k" * 500: "v" * 500}, list(range(10**5)), b"\0" * 10**6, 1.5e300):
        assert len(preview(value)) <= 60
    assert len(preview("y" * 1000, width=20)) <= 20

    class Broken:
        def __repr__(self):
            raise RuntimeError("no repr")

    assert preview(Broken()).startswith("<Broken")  # reprlib names the type of a value whose repr fails

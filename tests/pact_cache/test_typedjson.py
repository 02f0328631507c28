"""pact_cache/typedjson.py: strict JSON at the edge, canonical hashing, and bounded counting of parsed values."""

import pytest
import yaml
from hostile import yaml_alias_bomb

from pact_cache.errors import CacheError
from pact_cache.typedjson import canonical_json, count_values, hash_identity, load_json


def test_load_json_is_strict_and_names_the_line():
    assert load_json(b'{"a": [1, 2.5, "x"]}', "f.json") == {"a": [1, 2.5, "x"]}
    for data, needle in (
        (b'{"a": NaN}', "non-finite numbers are not allowed"),
        (b"{\n\n\xff}", "f.json:3: invalid UTF-8"),
        (b'{"a": 1,}', "f.json:1: invalid JSON"),
        (b"[" * 100_000, "nested too deeply"),
    ):
        with pytest.raises(CacheError, match=needle):
            load_json(data, "f.json")


def test_canonical_json_and_identity_do_not_depend_on_key_order():
    assert canonical_json({"b": 1, "a": [2]}) == canonical_json({"a": [2], "b": 1}) == b'{"a":[2],"b":1}'
    assert hash_identity("k", {"a": 1, "b": 2}) == hash_identity("k", {"b": 2, "a": 1})
    assert hash_identity("k", {"a": 1}) != hash_identity("k", {"a": 1.0})  # type-tagged
    assert hash_identity("k", {"a": 1}) != hash_identity("other", {"a": 1})


def test_count_values_stops_at_its_limit_on_an_alias_bomb():
    assert (
        count_values({"a": [1, 2], "b": {"c": None}}, 100) == 9
    )  # the mapping, 2 keys, 2 values, 2 items, a key, a value
    text = yaml_alias_bomb()
    bomb = yaml.safe_load(text)  # cheap: the aliases are the same objects
    assert count_values(bomb, 10_000) == 10_001  # counted up to the limit and one more, no further

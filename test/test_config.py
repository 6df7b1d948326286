"""Typed configuration: unknown keys and wrong types are rejected with a useful message."""
from dataclasses import dataclass
from typing import Literal

import pytest

from icnet_ros.config import ConfigError, config_from_dict, load_config, parse_overrides


@dataclass(frozen=True)
class Example:
    lr: float = 0.01
    iterations: int = 10
    branch: Literal["sub4", "sub24", "sub124"] = "sub124"
    crop: tuple[int, int] = (64, 64)
    amp: bool = True


def test_defaults_file_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# comment\nlr: 0.02\niterations: 5\n")
    config = load_config(Example, path, ["iterations=7", "crop=[32, 48]"])
    assert config == Example(lr=0.02, iterations=7, crop=(32, 48))


@pytest.mark.parametrize("data, message", [
    ({"learning_rate": 1}, r"unknown key\(s\) \['learning_rate'\]; allowed keys: \['lr'"),
    ({"iterations": 1.5}, "iterations: expected an integer"),
    ({"branch": "sub8"}, r"not one of the allowed values \['sub4', 'sub24', 'sub124'\]"),
    ({"crop": [1, 2, 3]}, "expected 2 values"),
    ({"amp": "yes"}, "expected true or false"),
])
def test_bad_values_are_rejected_with_the_reason(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(Example, data)


def test_override_syntax():
    assert parse_overrides(["a=1", "b=x", "c=[1, 2]"]) == {"a": 1, "b": "x", "c": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])

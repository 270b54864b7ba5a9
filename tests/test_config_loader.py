"""The YAML loader: one readable line per problem, with dotted keys and line numbers."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field

from mlipctl.config.base import InputPath, StrictModel
from mlipctl.config.loader import (
    ConfigError,
    load_config,
    parse_override,
    parse_yaml,
    validate_config,
)
from mlipctl.errors import UserInputError


class Adam(StrictModel):
    kind: Literal["adam"] = Field(default="adam", description="Adam.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Step size.")


class SGD(StrictModel):
    kind: Literal["sgd"] = Field(default="sgd", description="SGD.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="Momentum.")


class Training(StrictModel):
    epochs: int = Field(default=10, ge=1, description="Epochs.")
    optimizer: Annotated[Adam | SGD, Field(discriminator="kind")] = Field(
        default_factory=Adam, description="Optimiser."
    )


class Toy(StrictModel):
    data: InputPath = Field(description="Data file.")
    training: Training = Field(default_factory=Training, description="Training.")


def _write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def _problems(tmp_path, text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(Toy, _write(tmp_path, text), **kw)
    return info.value.problems


def test_valid_config_loads(tmp_path):
    data = tmp_path / "d.xyz"
    data.write_text("x")
    cfg = load_config(Toy, _write(tmp_path, f"data: {data}\ntraining:\n  epochs: 3\n"))
    assert cfg.training.epochs == 3 and cfg.training.optimizer.kind == "adam"


def test_unknown_key_has_line_and_suggestion(tmp_path):
    probs = _problems(tmp_path, "data: x\ntraining:\n  epohcs: 3\n", check_files=False)
    assert len(probs) == 1
    assert probs[0].startswith("training.epohcs (line 3): unknown key; did you mean 'epochs'?")


def test_unknown_key_inside_union_variant(tmp_path):
    text = "data: x\ntraining:\n  optimizer:\n    kind: adam\n    learning_rat: 0.1\n"
    probs = _problems(tmp_path, text, check_files=False)
    assert probs == [
        "training.optimizer.learning_rat (line 5): unknown key; did you mean 'learning_rate'? "
        "Allowed keys here: kind, learning_rate."
    ]


def test_flow_mapping_without_space_is_explained(tmp_path):
    probs = _problems(tmp_path, "data: x\ntraining: {zzz:3}\n", check_files=False)
    assert len(probs) == 1
    assert probs[0].startswith("training.zzz:3 (line 2): unknown key. (YAML reads 'key:value'")
    assert probs[0].endswith("Allowed keys here: epochs, optimizer.")


def test_wrong_type_and_out_of_range_each_one_line(tmp_path):
    text = "data: x\ntraining:\n  epochs: many\n  optimizer: {kind: sgd, momentum: 1.5}\n"
    probs = _problems(tmp_path, text, check_files=False)
    assert len(probs) == 2
    assert probs[0].startswith("training.epochs (line 3): Input should be a valid integer")
    assert "'many'" in probs[0]
    assert probs[1].startswith("training.optimizer.momentum (line 4): Input should be less than 1")


def test_bad_union_tag(tmp_path):
    probs = _problems(
        tmp_path, "data: x\ntraining:\n  optimizer: {kind: lamb}\n", check_files=False
    )
    assert len(probs) == 1
    assert "training.optimizer (line 3): unknown kind 'lamb'" in probs[0]
    assert "'adam'" in probs[0] and "'sgd'" in probs[0]


def test_missing_key_and_missing_file(tmp_path):
    assert _problems(tmp_path, "training: {epochs: 2}\n") == ["data: required key is missing"]
    probs = _problems(tmp_path, "data: nowhere.xyz\n")
    assert len(probs) == 1
    assert probs[0].startswith("data (line 1): file not found: nowhere.xyz")


def test_missing_file_not_checked_for_templates(tmp_path):
    cfg = validate_config(Toy, {"data": "nowhere.xyz"}, check_files=False)
    assert str(cfg.data) == "nowhere.xyz"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "config file is empty"),
        ("# only a comment\n", "config file is empty"),
        ("a: [1, 2\n", "is not valid YAML at line"),
        ("- 1\n- 2\n", "must be a YAML mapping"),
        ("just a string", "must be a YAML mapping"),
    ],
)
def test_not_yaml_or_empty(tmp_path, text, needle):
    with pytest.raises(UserInputError, match=needle):
        load_config(Toy, _write(tmp_path, text))


def test_binary_and_missing_config_file(tmp_path):
    b = tmp_path / "b.yaml"
    b.write_bytes(b"\x00\xff\xfe\x00garbage")
    with pytest.raises(UserInputError, match="not text"):
        load_config(Toy, b)
    with pytest.raises(UserInputError, match="config file not found"):
        load_config(Toy, tmp_path / "nope.yaml")


def test_unsafe_yaml_tags_rejected():
    with pytest.raises(UserInputError, match="not valid YAML"):
        parse_yaml("a: !!python/object/apply:os.system ['echo hi']\n")


def test_overrides():
    assert parse_override("training.epochs=5") == ("training.epochs", 5)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("x=hello") == ("x", "hello")
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        parse_override("novalue")


def test_override_applied_and_validated(tmp_path):
    p = _write(tmp_path, "data: x\n")
    cfg = load_config(Toy, p, {"training.epochs": 7}, check_files=False)
    assert cfg.training.epochs == 7
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(Toy, p, {"training.epochs": 0}, check_files=False)

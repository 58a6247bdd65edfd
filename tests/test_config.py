"""Config loading: YAML -> dataclasses, overrides, unknown keys are errors."""

from dataclasses import dataclass, field

import pytest

from sirf_ddip.config import load_config, parse_overrides
from sirf_ddip.errors import ConfigError


@dataclass
class Inner:
    rank: int = 4
    alpha: float = 8.0


@dataclass
class Outer:
    beta: float = 0.01
    steps: int = 200
    use_mr: bool = True
    name: str = "x"
    lora: Inner = field(default_factory=Inner)


def test_defaults_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("beta: 0.5\nlora:\n  rank: 8\n")
    cfg = load_config(Outer, p)
    assert cfg.beta == 0.5 and cfg.steps == 200 and cfg.lora.rank == 8 and cfg.lora.alpha == 8.0


def test_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(Outer, None, ["beta=1e-3", "use_mr=false", "lora.rank=2", "steps=10"])
    assert cfg.beta == pytest.approx(1e-3) and cfg.use_mr is False and cfg.lora.rank == 2 and cfg.steps == 10
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("betta: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*betta"):
        load_config(Outer, p)
    with pytest.raises(ConfigError, match=r"lora\.rnak"):
        load_config(Outer, None, ["lora.rnak=3"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="steps"):
        load_config(Outer, None, {"steps": "many"})
    with pytest.raises(ConfigError, match="use_mr"):
        load_config(Outer, None, {"use_mr": "perhaps"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])

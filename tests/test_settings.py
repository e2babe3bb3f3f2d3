"""The one settings model: coercion, bounds, and the documented merge order."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggufrun.errors import ConfigError
from ggufrun.settings import Settings, coerce, resolve


def test_merge_order_defaults_entry_config_env_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[defaults]\nn_ctx = 2048\ntemperature = 0.5\ntop_k = 7\n")
    env = {"GGUFRUN_TEMPERATURE": "0.3", "GGUFRUN_TOP_P": "0.5"}
    s = resolve({"n_ctx": 8192, "seed": 5, "top_k": 3}, {"top_p": "0.9", "n_gpu_layers": "-1"}, config_path=cfg, environ=env)
    assert s.seed == 5  # entry only
    assert s.n_ctx == 2048  # config beats entry
    assert s.top_k == 7  # config beats entry
    assert s.temperature == 0.3  # env beats config
    assert s.top_p == 0.9  # cli beats env
    assert s.n_gpu_layers == -1
    assert s.batch_size == Settings().batch_size  # untouched default


def test_none_means_not_given(tmp_path: Path) -> None:
    s = resolve({"n_ctx": 1024}, {"n_ctx": None}, config_path=tmp_path / "missing.toml", environ={})
    assert s.n_ctx == 1024


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("temperature", "-1", ">= 0"),
        ("temperature", "nan", "not a number"),
        ("n_gpu_layers", "-2", ">= -1"),
        ("n_ctx", "lots", "expected int"),
        ("n_ctx", 1.5, "expected int"),
        ("flash_attn", "maybe", "on, off, auto"),
        ("top_p", "1.5", "<= 1"),
        ("bogus", "1", "Unknown setting"),
    ],
)
def test_bad_values_name_key_value_and_origin(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        coerce(key, value, "command line")
    assert fragment in str(err.value)
    assert "command line" in str(err.value) or "Unknown" in str(err.value)


def test_flash_attn_is_case_insensitive() -> None:
    assert coerce("flash_attn", "ON") == "on"


def test_malformed_config_names_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[defaults]\nn_ctx = = 3\n")
    with pytest.raises(ConfigError) as err:
        resolve(config_path=cfg, environ={})
    assert str(cfg) in str(err.value) and "line 2" in str(err.value)


def test_bad_env_value_is_reported_as_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment"):
        resolve(config_path=tmp_path / "none.toml", environ={"GGUFRUN_N_CTX": "-5"})

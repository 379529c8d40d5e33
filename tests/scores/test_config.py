"""Prior config schema: bundled YAMLs, overrides, unknown keys and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from scores.config import ConfigError, PriorConfig, load_prior_config, prior_config_from_dict, prior_config_to_dict
from scores.model import ScoreModel
from scores.networks import count_parameters

PRIOR_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "prior"


def test_bundled_configs_load_with_documented_sizes() -> None:
    tiny = load_prior_config(PRIOR_CONFIGS / "tiny.yaml")
    source = load_prior_config(PRIOR_CONFIGS / "source_brain.yaml")
    assert 40_000 < count_parameters(ScoreModel.from_config(tiny.network)) < 60_000
    params = count_parameters(ScoreModel.from_config(source.network))
    assert 2_000_000 < params and 4 * params < 25_000_000  # float32 safetensors under 25 MB
    assert source.data.site == "source_brain" and source.train.lr == pytest.approx(2e-4)


def test_overrides_and_dict_round_trip() -> None:
    cfg = load_prior_config(PRIOR_CONFIGS / "tiny.yaml", ["train.steps=7", "network.channel_mults=[1,2,4]"])
    assert cfg.train.steps == 7 and cfg.network.channel_mults == [1, 2, 4]
    assert prior_config_from_dict(prior_config_to_dict(cfg)) == cfg
    assert load_prior_config() == PriorConfig()


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["train.no_such_key=1"], r"tiny\.yaml: override key 'train\.no_such_key'"),
        (["train.steps=many"], r"override key 'train\.steps'"),
        (["sde.kind=subvp"], r"key 'sde\.kind' is 'subvp', expected one of"),
        (["train.batch_size=0"], r"key 'train\.batch_size' is 0, expected a positive number"),
        (["sde.sigma_max=0.001"], r"'sde\.sigma_max' must be larger"),
    ],
)
def test_bad_overrides_name_file_and_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        load_prior_config(PRIOR_CONFIGS / "tiny.yaml", overrides)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_prior_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("network: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot be parsed as YAML"):
        load_prior_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("network:\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: key 'network\.depth'"):
        load_prior_config(unknown)

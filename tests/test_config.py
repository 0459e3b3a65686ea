import pytest

from afmkit.config import SIZES, ModelConfig, get_size
from afmkit.errors import UserError


def test_afm_on_device_parameter_counts_match_the_published_ones():
    config = get_size("afm-on-device")
    # AFM report: about 2.58B non-embedding and 0.15B embedding parameters.
    assert config.non_embedding_params == pytest.approx(2.58e9, rel=0.01)
    assert config.embedding_params == pytest.approx(0.15e9, rel=0.02)


def test_smollm2_size_has_135m_parameters():
    assert get_size("smollm2-135m").total_params == pytest.approx(134.5e6, rel=0.001)


def test_every_registered_size_round_trips_through_a_dict():
    for config in SIZES.values():
        assert ModelConfig.from_dict(config.to_dict()) == config


def test_unknown_size_lists_the_known_ones():
    with pytest.raises(UserError, match="afm-on-device"):
        get_size("afm-huge")


def test_inconsistent_heads_are_refused():
    with pytest.raises(UserError, match="multiple of n_kv_heads"):
        get_size("test-tiny").replace(n_heads=5)


def test_qk_norm_position_is_checked():
    with pytest.raises(UserError, match="qk_norm_position must be one of before_rope, after_rope"):
        get_size("test-tiny").replace(qk_norm_position="between")

import pytest

from lori import LoRIConfig


def test_defaults_are_the_lori_recipe():
    c = LoRIConfig()
    assert (c.r, c.alpha, c.scaling, c.block, c.dropout, c.sparsity, c.dist) == (
        32,
        64.0,
        2.0,
        (32, 32),
        0.0,
        0.9,
        "uniform",
    )
    assert c.target_modules == "all-linear"
    assert LoRIConfig(r=8).block == (32, 8)
    assert LoRIConfig(r=8).alpha == 16


def test_round_trips_through_a_dict():
    c = LoRIConfig(r=16, alpha=8, target_modules=["q_proj"], block=(1, 1), seed=2**64 - 1, dropout=0.05)
    d = c.to_dict()
    assert d["block"] == [1, 1] and d["seed"] == 2**64 - 1
    assert LoRIConfig.from_dict(d) == c


def test_negative_seed_is_its_uint64():
    assert LoRIConfig(seed=-1).seed == 2**64 - 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive int"),
        (dict(r=8.0), "r must be a positive int"),
        (dict(alpha=-1), "alpha must be a positive"),
        (dict(alpha=float("inf")), "alpha must be a positive"),
        (dict(target_modules="("), "not a regular expression"),
        (dict(target_modules=[""]), "target_modules must be 'all-linear', a regular expression or a list"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(block=(32, 5)), "LoRIConfig.block: block column size br=5 must divide r=32"),
        (dict(dist="normal"), "dist must be one of"),
        (dict(seed=2**64), "LoRIConfig.seed"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    ],
)
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRIConfig(**kwargs)


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match=r"unknown LoRIConfig fields \['rank'\]"):
        LoRIConfig.from_dict({"rank": 8})

import pytest

from hiftune import HiFTConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"units_per_group": 0}, "units_per_group must be >= 1"),
        ({"units_per_group": 1.5}, "units_per_group must be an integer"),
        ({"order": "sideways"}, "order must be one of bottom2up, top2down, random"),
        ({"offload": "cloud"}, "offload must be one of none, host, disk"),
        ({"precision": "fp8"}, "precision must be one of fp32, bf16, fp16"),
        ({"units": {"a": "embed.*"}}, "must be a non-empty list of regexes"),
        ({"units": {}}, "units must be a non-empty mapping"),
        ({"offload_dir": "/tmp/x"}, "only used with offload='disk'"),
        ({"init_loss_scale": 0}, "init_loss_scale must be > 0"),
        ({"units": {"a": [".*"]}, "blocks": "layers"}, "not both"),
    ],
)
def test_bad_values_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HiFTConfig(**kwargs)


def test_defaults_and_to_dict():
    cfg = HiFTConfig()
    assert (cfg.units_per_group, cfg.order, cfg.offload, cfg.precision) == (
        1,
        "bottom2up",
        "host",
        "fp32",
    )
    d = HiFTConfig(units={"a": (".*",)}).to_dict()
    assert d["units"] == {"a": [".*"]}

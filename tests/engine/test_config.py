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
        ({"group_by": "bytes"}, "group_by must be one of count, size"),
        ({"max_unit_params": 0}, "max_unit_params must be 'auto', None or an integer >= 1"),
        ({"max_unit_params": "block"}, "max_unit_params must be"),
        ({"max_unit_params": True}, "max_unit_params must be"),
        ({"max_unit_params": 2.5e6}, "max_unit_params must be"),
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
    assert (cfg.group_by, cfg.max_unit_params) == ("count", "auto")
    for budget in ("auto", None, 1):
        assert HiFTConfig(max_unit_params=budget).max_unit_params == budget
    d = HiFTConfig(units={"a": (".*",)}).to_dict()
    assert d["units"] == {"a": [".*"]}

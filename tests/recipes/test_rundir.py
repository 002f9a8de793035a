"""Who owns the process group: the recipe destroys the one it created, never the caller's."""

import pytest
import torch.distributed as dist

from hiftune.recipes.rundir import owned_process_group


def _init(tmp_path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )


@pytest.fixture(autouse=True)
def _no_group_left():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_group_created_inside_is_destroyed_on_the_way_out(tmp_path):
    with owned_process_group():
        _init(tmp_path)
        assert dist.is_initialized()
    assert not dist.is_initialized()


def test_a_group_created_inside_is_destroyed_after_an_error_too(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), owned_process_group():
        _init(tmp_path)
        raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_the_callers_group_is_kept(tmp_path):
    _init(tmp_path)
    with owned_process_group():
        pass
    assert dist.is_initialized()

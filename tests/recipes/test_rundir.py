"""The output directory's lock, and who owns the process group: the recipe destroys the one it
created, never the caller's."""

import os

import pytest
import torch.distributed as dist

from hiftune.errors import UserError
from hiftune.recipes.rundir import LOCK, OutputDir, owned_process_group


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


# --- OutputDir: the lock --------------------------------------------------------------------------


def test_the_lock_file_is_held_during_the_run_and_removed_after_it(tmp_path):
    out = tmp_path / "run"
    with OutputDir(out):
        assert (out / LOCK).read_text() == f"{os.getpid()}\n"
        (out / "model.safetensors").write_bytes(b"0")
        with (
            pytest.raises(UserError, match="is in use by another hiftune train run"),
            OutputDir(out),
        ):
            pass
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    with OutputDir(out):  # the next run takes the directory
        assert (out / LOCK).is_file()
    assert not (out / LOCK).exists()


def test_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"), OutputDir(out):
        raise RuntimeError("boom")
    assert not out.exists()


def test_a_lock_file_left_by_a_killed_run_is_taken_over_and_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("12345\n")  # what kill -9 leaves: the file, no lock on it
    with OutputDir(out):
        assert (out / LOCK).read_text() == f"{os.getpid()}\n"
    assert list(out.iterdir()) == []

"""Fault injection into the engine: failing page-outs, bad checkpoints, fp16 divergence, half
weights left behind by a closed optimizer, temporary directories of killed processes."""

import copy
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hiftune import HiFTConfig, HiFTOptimizer
from hiftune.engine.guards import DivergedError
from hiftune.engine.state import paging, tempdirs
from hiftune.engine.state.paging import DiskStore
from hiftune.engine.state.store import KeepStore
from tinymodels import TinyLM, lm_loss, snapshot, train_steps

# --- 6: a failed page-out loses nothing ------------------------------------------------------


class FullDiskStore(KeepStore):
    """A store whose ``put`` fails, like a write to a full disk, while ``full`` is set."""

    def __init__(self):
        super().__init__()
        self.full = False

    def put(self, key, tensors):
        if self.full:
            raise OSError(28, "No space left on device")
        super().put(key, tensors)


def _adamw(store=None, precision="fp32", offload="none", tmp=None):
    torch.manual_seed(0)
    model = TinyLM()
    extra = {"offload_dir": str(tmp)} if tmp is not None else {}
    cfg = HiFTConfig(precision=precision, offload=offload, **extra)
    return model, HiFTOptimizer(model, torch.optim.AdamW, cfg, store=store, lr=1e-2)


def _same_state(a, b):
    """Whether two HiFTOptimizer state dicts hold the same values."""
    assert a["hift"] == b["hift"]
    for ga, gb in zip(a["groups"], b["groups"], strict=True):
        sa, sb = ga["optimizer"]["state"], gb["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            assert sa[i].keys() == sb[i].keys()
            assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])
        assert all(
            torch.equal(x, y) for x, y in zip(ga["masters"] or [], gb["masters"] or [], strict=True)
        )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_failed_page_out_keeps_the_state_and_a_retry_continues_exactly(batches, precision):
    model, opt = _adamw(precision=precision)
    train_steps(model, opt, batches[:8])
    reference_state = copy.deepcopy(opt.state_dict())
    train_steps(model, opt, batches[8:])
    reference = snapshot(model)

    store = FullDiskStore()
    model, opt = _adamw(store, precision=precision)
    train_steps(model, opt, batches[:7])  # past a cycle (k = 6): every group has Adam state
    store.full = True
    lm_loss(model, batches[7]).backward()
    with pytest.raises(OSError, match="No space left"):
        opt.step()
    opt.zero_grad()
    # The step counted, and the state it could not page out is still there: a checkpoint now
    # holds exactly what an undisturbed run holds.
    _same_state(opt.state_dict(), reference_state)
    store.full = False  # space freed: training goes on, and the next step pages it out
    train_steps(model, opt, batches[8:])
    assert len(store._data) == opt.num_groups  # all paged out again between steps
    for n, p in snapshot(model).items():
        assert torch.equal(p, reference[n]), n


def test_a_full_disk_at_page_out_loses_no_state(batches, tmp_path, monkeypatch):
    model, opt = _adamw(offload="disk", tmp=tmp_path / "a")
    train_steps(model, opt, batches)
    reference = snapshot(model)

    model, opt = _adamw(offload="disk", tmp=tmp_path / "b")
    train_steps(model, opt, batches[:7])
    real_save = paging.save_file

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")  # the disk filled up half-way through the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paging, "save_file", full)
    lm_loss(model, batches[7]).backward()
    with pytest.raises(RuntimeError, match=r"could not write optimizer state.*No space left"):
        opt.step()
    opt.zero_grad()
    assert not list((tmp_path / "b").glob("*.tmp"))  # no partial file left
    monkeypatch.setattr(paging, "save_file", real_save)
    train_steps(model, opt, batches[8:])
    for n, p in snapshot(model).items():
        assert torch.equal(p, reference[n]), n
    opt.close()


def test_a_failed_write_behind_keeps_the_tensors_in_memory(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paging, "save_file", full)
    data = {"state.0.exp_avg": torch.randn(4, 3)}
    store = DiskStore(tmp_path, write_behind=True)
    store.put(0, {k: v.clone() for k, v in data.items()})
    store.prefetch(0)
    assert torch.equal(store.peek(0)["state.0.exp_avg"], data["state.0.exp_avg"])
    with pytest.raises(RuntimeError, match="No space left"):
        store.get(0)  # the failure is reported once...
    back = store.get(0)  # ...and the tensors were never lost
    assert torch.equal(back["state.0.exp_avg"], data["state.0.exp_avg"])
    assert 0 not in store
    sync = DiskStore(tmp_path / "sync")
    with pytest.raises(RuntimeError, match="No space left"):
        sync.put(1, dict(data))
    assert 1 not in sync and sync.resident_bytes() == 0  # the caller kept them
    store.close()
    sync.close()


# --- 11: load_state_dict validates everything before it changes anything ---------------------


def test_a_checkpoint_with_other_shapes_is_refused_up_front(batches):
    torch.manual_seed(0)
    small = HiFTOptimizer(TinyLM(vocab=32), torch.optim.AdamW, lr=1e-2)
    model = TinyLM(vocab=40)  # the same parameter names, other embedding and head shapes
    opt = HiFTOptimizer(model, torch.optim.AdamW, lr=1e-2)
    with pytest.raises(ValueError, match=r"embed.weight has shape \[32, 16\] in it, \[40, 16\]"):
        opt.load_state_dict(small.state_dict())


def test_a_checkpoint_of_another_optimizer_class_is_refused(tiny_lm, batches):
    sgd = HiFTOptimizer(TinyLM(), torch.optim.SGD, lr=0.1, momentum=0.9)
    train_steps(sgd.model, sgd, batches[:6])
    adamw = HiFTOptimizer(tiny_lm, torch.optim.AdamW, lr=1e-2)
    with pytest.raises(ValueError, match=r"state of torch\.optim\.sgd.SGD.*steps with torch.optim"):
        adamw.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match=r"state of torch\.optim\.adamw\.AdamW"):
        sgd.load_state_dict(adamw.state_dict())


def test_a_damaged_checkpoint_is_refused_before_anything_changes(tiny_lm, batches):
    # The paper's split (6 units, 6 groups), so that the damaged values below are simple.
    opt = HiFTOptimizer(tiny_lm, torch.optim.AdamW, HiFTConfig(max_unit_params=None), lr=1e-2)
    train_steps(tiny_lm, opt, batches[:8])
    good = opt.state_dict()
    before = copy.deepcopy(good)

    def damaged(change):
        sd = copy.deepcopy(good)
        change(sd)
        return sd

    cases = {
        "queue position 6 is not one of the 6 groups": lambda sd: sd["hift"].update(position=6),
        "queue position -1": lambda sd: sd["hift"].update(position=-1),
        "cycle count": lambda sd: sd["hift"].update(cycle=-2),
        "not a permutation": lambda sd: sd["hift"].update(order=[0, 0, 1, 2, 3, 4]),
        "holds 5 group states": lambda sd: sd["groups"].pop(),
        # the last group only: a half-way load would already have replaced the others
        "param groups of sizes": lambda sd: sd["groups"][-1]["optimizer"]["param_groups"][0][
            "params"
        ].pop(),
        "names parameters": lambda sd: sd["groups"][-1]["optimizer"]["state"].update({99: {}}),
    }
    for message, change in cases.items():
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(damaged(change))
        _same_state(opt.state_dict(), before)


def test_state_dicts_without_class_and_shapes_still_load(batches):
    model, opt = _adamw()
    train_steps(model, opt, batches[:8])
    old = opt.state_dict()
    del old["hift"]["shapes"], old["hift"]["optimizer_class"]  # as written before they were
    reference = copy.deepcopy(opt.state_dict())
    _, fresh = _adamw()
    fresh.load_state_dict(old)
    _same_state(fresh.state_dict(), reference)


def test_old_mixed_precision_dicts_are_still_checked_by_their_masters(batches):
    torch.manual_seed(0)
    small = HiFTOptimizer(TinyLM(vocab=32), torch.optim.SGD, HiFTConfig(precision="bf16"), lr=0.1)
    old = small.state_dict()
    del old["hift"]["shapes"]
    opt = HiFTOptimizer(TinyLM(vocab=40), torch.optim.SGD, HiFTConfig(precision="bf16"), lr=0.1)
    with pytest.raises(ValueError, match=r"master weight of embed.weight is \[32, 16\]"):
        opt.load_state_dict(old)


# --- 12: close() gives the fp32 weights back --------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_close_restores_fp32_weights_from_the_masters(batches, precision):
    torch.manual_seed(0)
    model = TinyLM()
    model.pos.weight.requires_grad_(False)  # a weight HiFT casts but never trains
    pos = model.pos.weight.detach().clone()
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(precision=precision), lr=1e-2)
    for ids in batches[:8]:
        opt.scale_loss(lm_loss(model, ids)).backward()
        opt.step()
        opt.zero_grad()
    sd = opt.state_dict()
    masters = {
        n: m
        for names, g in zip(sd["hift"]["groups"], sd["groups"], strict=True)
        for n, m in zip(names, g["masters"], strict=True)
    }
    opt.close()
    opt.close()  # a second close changes nothing
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32, n
        if n in masters:
            assert torch.equal(p, masters[n]), n  # the fp32 masters, not the rounded weights
    torch.testing.assert_close(model.pos.weight, pos, atol=1e-2, rtol=1e-2)
    # Wrapped again in fp32, the model trains fp32 weights.
    fp32 = HiFTOptimizer(model, torch.optim.AdamW, lr=1e-2)
    train_steps(model, fp32, batches[:2])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_close_keeps_a_half_precision_model_in_half_precision(batches):
    # A model that was bf16 before HiFT gets its trained weights back in bf16, not fp32.
    torch.manual_seed(0)
    model = TinyLM().to(torch.bfloat16)
    opt = HiFTOptimizer(model, torch.optim.AdamW, HiFTConfig(precision="bf16"), lr=1e-2)
    train_steps(model, opt, batches[:4])
    opt.close()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# --- 4: an fp16 master beyond the fp16 range stops training clearly ---------------------------


def test_fp16_weights_never_overflow_into_inf(batches):
    torch.manual_seed(0)
    model = TinyLM()
    cfg = HiFTConfig(precision="fp16", init_loss_scale=1.0)
    opt = HiFTOptimizer(model, torch.optim.SGD, cfg, lr=0.1)
    opt.scale_loss(lm_loss(model, batches[0])).backward()
    opt.step()
    opt.zero_grad()
    checkpoint = copy.deepcopy(opt.state_dict())
    for g in opt.param_groups:
        g["lr"] = 1e12  # diverges: the next update takes the masters far beyond 65504
    weights = snapshot(model)
    opt.scale_loss(lm_loss(model, batches[1])).backward()
    # A DivergedError: a FloatingPointError, and a UserError (hiftune train: one line, exit 2).
    with pytest.raises(DivergedError, match=r"diverged.*beyond what float16 weights hold"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, weights[n]), n  # the last weights
    # The optimizer stops rather than skip every later step: it neither steps nor saves...
    opt.scale_loss(lm_loss(model, batches[2])).backward()
    with pytest.raises(RuntimeError, match="stopped: training diverged"):
        opt.step()
    with pytest.raises(RuntimeError, match="stopped"):
        opt.state_dict()
    # ...until a checkpoint loads.
    opt.zero_grad()
    opt.load_state_dict(checkpoint)
    train_steps(model, opt, batches[2:4])
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


# --- 1: temporary state directories of dead processes are removed ----------------------------


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_directories_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"hiftune-state-{_dead_pid()}-abc"
    mine = tmp_path / f"hiftune-state-{os.getpid()}-def"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = tmp_path / f"hiftune-state-{sleeper.pid}-ghi"
    # a dead pid whose lock is held: a live process in another pid namespace sharing /tmp
    hidden = tmp_path / f"hiftune-state-{_dead_pid()}-jkl"
    unrelated = tmp_path / "hiftune-state-notapid"
    for d in (dead, mine, alive, hidden, unrelated):
        d.mkdir()
        (d / "group_0000.safetensors").write_bytes(b"x")
    fd = tempdirs._lock(hidden / tempdirs.LOCK_NAME, blocking=True)
    try:
        store = DiskStore()
        assert store.directory.name.startswith(f"hiftune-state-{os.getpid()}-")
        assert not dead.exists()
        assert mine.exists() and alive.exists() and hidden.exists() and unrelated.exists()
        directory = store.directory
        store.close()
        assert not directory.exists()
    finally:
        os.close(fd)
        sleeper.kill()
        sleeper.wait()


def test_the_state_directory_of_a_killed_process_is_removed_by_the_next(tmp_path, monkeypatch):
    script = (
        "import os, signal, torch\n"
        "from hiftune.engine.state.paging import DiskStore\n"
        "store = DiskStore()\n"
        "store.put(0, {'a': torch.ones(3)})\n"
        "print(store.directory, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == -signal.SIGKILL
    left = Path(proc.stdout.strip())
    assert left.parent == tmp_path and (left / "group_0000.safetensors").exists()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    store = DiskStore()
    assert not left.exists()
    store.close()

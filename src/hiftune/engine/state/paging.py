"""Where the tensors of inactive groups live: in place, in host memory, or on disk.

HiFT trains one group per step, so the optimizer state (and, in mixed precision, the fp32 master
weights) of every other group is idle. A :class:`StateStore` holds those idle tensors, keyed by
group index, and hands them back on the training device when their group becomes active again.
Stores deal in flat ``{name: tensor}`` dicts and know nothing about optimizers.

The optimizer drives a store with three calls per step: ``put`` the group it just stepped,
``prefetch`` the group that trains next (so the copy or file read overlaps the forward and
backward pass), and ``get`` that group when its step comes.

Sharded tensors (``DTensor``, e.g. the optimizer state of an FSDP2 model's parameters) are stored
as their local shard and rebuilt on the way back (:func:`to_local` / :func:`from_local`), so each
rank keeps only its own shard, on host or disk.

This module holds the disk store and :func:`make_store`; the interface, the byte counter and the
in-place store live in :mod:`.store`, the host store in :mod:`.host`.
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
import sys
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .host import HostStore
from .store import (
    KeepStore,
    ShardSpec,
    StateStore,
    Tensors,
    from_local,
    tensor_bytes,
    to_local,
)
from .tempdirs import OwnedDir, make_owned_temp_dir

logger = logging.getLogger(__name__)


class DiskStore(StateStore):
    """``offload="disk"``: tensors live in one safetensors file per group.

    Reads run on a background thread, so a prefetch loads the next group's file while the current
    step computes. Writes go through the same thread, in submission order, so a read always sees
    the latest write; by default :meth:`put` waits for its write, because a write still in flight
    keeps the group's tensors in memory while the next group trains (``write_behind=True`` trades
    that memory for time). Each file is written to a temporary name and renamed into place, so a
    crash never leaves a file that loads as garbage. Files are removed by :meth:`close` (also
    called when the store is garbage-collected or the interpreter exits).

    Freed memory goes back to the operating system (with glibc) after each write and before each
    read (on the background thread) and in :meth:`get`, so neither paged-out state nor the freed
    activations of the backward pass stay resident as heap holes the next tensors do not fit.

    A failed write (a full disk, say) loses nothing: without write-behind :meth:`put` raises and
    the caller keeps its tensors; with write-behind the tensors stay in memory, the error is
    raised once by the next :meth:`get` of that group (or :meth:`flush`), and the one after
    returns them from memory.

    Args:
        directory: Where to write. ``None`` creates a temporary directory
            (``<tmp>/hiftune-state-<pid>-*``), removed on close; making one also removes those
            that processes killed before their cleanup left behind (see :mod:`.tempdirs`).
        write_behind: Return from :meth:`put` before the file is written (:meth:`flush` waits).
        release_memory: Give freed memory back to the operating system as described above
            (``False`` keeps glibc's default: a higher resident set, but steps about 10% faster on
            a CPU, since memory used again need not be faulted in again).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        write_behind: bool = False,
        release_memory: bool = True,
    ) -> None:
        self._owned: OwnedDir | None = None
        if directory is None:
            self._owned = make_owned_temp_dir("hiftune-state-")
            self.directory = self._owned.path
        else:
            self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create offload_dir {self.directory}: {e}") from None
        self.write_behind = write_behind
        self.release_memory = release_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hiftune-disk")
        # key -> (pending write, its size); never the tensors, which the write thread releases
        self._writes: dict[int, tuple[Future[None], int]] = {}
        self._reads: dict[int, Future[Tensors]] = {}
        self._devices: dict[int, dict[str, torch.device]] = {}
        self._specs: dict[int, dict[str, ShardSpec]] = {}
        # key -> host tensors whose write failed: kept, so that no state is lost
        self._unwritten: dict[int, Tensors] = {}
        self._finalizer = weakref.finalize(self, _cleanup, self._pool, self.directory, self._owned)

    def path(self, key: int) -> Path:
        """The file that holds group ``key``."""
        return self.directory / f"group_{key:04d}.safetensors"

    def put(self, key: int, tensors: Tensors) -> None:
        # Copy to host now (cheap on CPU, a device sync on CUDA), write in the background.
        tensors, specs = to_local(tensors)
        host = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        previous = self._writes.pop(key, None)
        if previous is not None:
            wait([previous[0]])  # superseded: its outcome no longer matters
        self._reads.pop(key, None)
        self._unwritten.pop(key, None)
        self._devices[key] = {k: v.device for k, v in tensors.items()}
        self._specs[key] = specs
        self._writes[key] = (
            self._pool.submit(
                _write, host, self.path(key), key, self._unwritten, self.release_memory
            ),
            tensor_bytes(host),
        )
        del host  # the write thread holds the only reference now, and drops it when done
        if not self.write_behind:
            try:
                self._wait_write(key)
            except BaseException:
                # The caller still holds the tensors: forget the key rather than keep a copy.
                self._unwritten.pop(key, None)
                del self._devices[key]
                del self._specs[key]
                raise

    def prefetch(self, key: int) -> None:
        if key in self._devices and key not in self._reads and key not in self._unwritten:
            self._reads[key] = self._pool.submit(
                _load_if_written, self.path(key), key, self._unwritten, self.release_memory
            )

    def get(self, key: int) -> Tensors:
        if key not in self._devices:
            return {}
        # The backward pass freed the activations: give them back before the step allocates.
        if self.release_memory:
            _release_free_memory()
        self._wait_write(key)  # a failed write-behind is raised here, once; its tensors stay
        if key in self._unwritten:
            self._reads.pop(key, None)
            tensors = self._unwritten.pop(key)
        else:
            self.prefetch(key)
            tensors = self._reads.pop(key).result()
        devices = self._devices.pop(key)
        moved = {k: v.to(devices[k], non_blocking=True) for k, v in tensors.items()}
        return from_local(moved, self._specs.pop(key, {}))

    def peek(self, key: int) -> Tensors:
        if key not in self._devices:
            return {}
        entry = self._writes.get(key)
        if entry is not None:
            wait([entry[0]])  # a failure stays pending, for get() or flush() to raise
        if key in self._unwritten:
            return from_local(dict(self._unwritten[key]), self._specs.get(key, {}))
        return from_local(_load(self.path(key)), self._specs.get(key, {}))

    def flush(self) -> None:
        """Waits for every pending write (re-raising a failed one) and prefetch read.

        A failed read is not raised here but by the :meth:`get` that wants its tensors.
        """
        for key in list(self._writes):
            self._wait_write(key)
        wait(self._reads.values())

    def __contains__(self, key: int) -> bool:
        return key in self._devices

    def resident_bytes(self) -> int:
        pending = sum(n for f, n in self._writes.values() if not f.done())
        loaded = sum(
            tensor_bytes(f.result()) for f in self._reads.values() if f.done() and not f.exception()
        )
        return pending + loaded + tensor_bytes(list(self._unwritten.values()))

    def close(self) -> None:
        self._finalizer()

    def _wait_write(self, key: int) -> None:
        entry = self._writes.pop(key, None)
        if entry is not None:
            entry[0].result()  # re-raises a failed write (disk full, permissions) here


def make_store(offload: str, directory: str | None = None) -> StateStore:
    """Builds the store for ``HiFTConfig.offload``."""
    if offload == "none":
        return KeepStore()
    if offload == "host":
        return HostStore()
    if offload == "disk":
        return DiskStore(directory)
    raise ValueError(f"offload must be one of none, host, disk; got {offload!r}")


def _write(
    tensors: Tensors, path: Path, key: int, unwritten: dict[int, Tensors], release: bool
) -> None:
    # Runs on the write thread. On failure the tensors go to ``unwritten`` instead of being lost.
    try:
        _atomic_save(tensors, path)
    except BaseException:
        unwritten[key] = tensors
        raise
    # Dropped before the future completes (the pool keeps a task's arguments until after that):
    # else a group held only here outlives put() while the caller allocates the next one.
    tensors.clear()
    if release:
        _release_free_memory()  # the group paged out before this one is gone by now


def _load_if_written(path: Path, key: int, unwritten: dict[int, Tensors], release: bool) -> Tensors:
    # Runs on the same thread after the write of ``key``: if that failed there is no file to read.
    # A read starts when a group becomes active, just after the previous group's state was freed.
    if release:
        _release_free_memory()
    return {} if key in unwritten else _load(path)


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # glibc's; musl has none
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()  # None where the C library has none


def _release_free_memory() -> None:
    # glibc keeps freed memory in its heaps for reuse, and once a large block (a logits tensor,
    # a group's state) has been freed it serves every block up to that size (at most 32 MiB)
    # from a heap instead of a mapping of its own. Paging frees a whole group's state every step,
    # and the next group's tensors have other sizes, so the holes rarely fit and the resident set
    # kept growing: by ~280 MiB of free heap over a cycle of SmolLM2-135M with bf16 state on
    # disk. malloc_trim(0) hands the free pages back, also those inside a heap (a few ms; what
    # costs more is faulting them in again when reused). Nothing to do with another C library.
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _atomic_save(tensors: Tensors, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports its own I/O errors as the latter
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"hiftune could not write optimizer state to {path}: {e}") from e


#: safetensors >= 0.8 can read on the calling thread (``backend="pread"``); older ones only map.
_HAS_PREAD = "backend" in inspect.signature(load_file).parameters


def _load(path: Path) -> Tensors:
    try:
        # Read the bytes here, on the background thread: the default mmap backend would defer
        # the reads to page faults in whichever thread touches the tensors first (the step).
        if _HAS_PREAD:
            return load_file(str(path), backend="pread")
        return {k: v.clone() for k, v in load_file(str(path)).items()}
    except FileNotFoundError:
        raise RuntimeError(
            f"optimizer state file {path} is missing: it was deleted while training ran"
        ) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise RuntimeError(f"optimizer state file {path} is corrupt or unreadable: {e}") from e


def _cleanup(pool: ThreadPoolExecutor, directory: Path, owned: OwnedDir | None) -> None:
    pool.shutdown(wait=True)
    if owned is not None:
        owned.remove()
    else:
        for f in directory.glob("group_*.safetensors*"):
            f.unlink(missing_ok=True)

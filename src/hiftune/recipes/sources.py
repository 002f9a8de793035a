"""The user's data through the ``datasets`` library: files, ``save_to_disk`` directories, the Hub.

``--data`` takes

* one or several local files, or a glob (``"data/*.jsonl"``): JSON lines or JSON (``.jsonl``,
  ``.json``), CSV (``.csv``; ``.tsv`` tab-separated), Parquet (``.parquet``) or plain text
  (``.txt``: one example per line, in a ``text`` field), each optionally compressed (``.gz``,
  ``.bz2``, ``.xz``, ``.zst``). All the files together are one ``train`` split. CSV fields are read
  as text, as a CSV file has no types (labels are compared as text anyway, see
  :func:`hiftune.recipes.data.normalize_label`), and ``NA`` or an empty cell stays text.
* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``);
* any other directory: ``datasets.load_dataset(directory)``, whose conventions decide the splits
  (``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl``, ``data/train-*.parquet``, ...);
* a Hugging Face Hub dataset id (``name`` or ``org/name``; ``data_config`` names a configuration),
  loaded the way ``datasets`` always does: from its cache (``HF_HOME``, ``HF_DATASETS_CACHE``),
  downloading what is missing unless ``HF_HUB_OFFLINE`` is set.

:func:`choose_splits` then picks the training split and the evaluation split(s): the data's own
``validation`` (or ``valid``, ``val``, ``dev``, ``test``) split when it has one, else a seeded
held-out fraction of the training split; :func:`describe_splits` says in one line what was used.
Every failure is a :class:`DataError` of one line.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import lzma
import math
import random
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .file_lines import first_bad_json_line, first_non_utf8

logger = logging.getLogger(__name__)

#: File suffix -> (``datasets`` builder, extra builder options).
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    # A CSV file has no types: every field is read as text (see _load_files), and "NA" or
    # "null" stay as written.
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"keep_default_na": False, "sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
#: Compression suffixes ``datasets`` reads transparently, with their names for messages.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
#: Names of evaluation splits, in order of preference, when ``eval_split`` is not given.
EVAL_NAMES = ("validation", "valid", "val", "dev", "test")
#: Seed of every held-out split; fixed so that the held-out examples never depend on ``--seed``.
SPLIT_SEED = 1234


class DataError(UserError):
    """The data cannot be read or does not fit the task (a user error)."""


@dataclass
class Loaded:
    """What :func:`load_data` read.

    Attributes:
        splits: Split name -> ``datasets.Dataset``.
        source: How to name the data in messages (a file, ``3 files``, ``Hub dataset org/x``).
    """

    splits: dict[str, Any]
    source: str


def load_data(
    data: str | Sequence[str], config_name: str | None = None, verbose: bool = False
) -> Loaded:
    """Reads ``--data`` with ``datasets`` (see the module docstring for what it may be).

    Args:
        data: A path, a glob, a list of paths, a directory or a Hub dataset id.
        config_name: The Hub dataset's configuration (``load_dataset``'s ``name``).
        verbose: Keep ``datasets``' own logging and progress bars.

    Raises:
        DataError: If a file does not exist or cannot be read, a glob matches nothing, the files
            are of an unknown or mixed format, the data is empty, or a Hub id cannot be loaded.
    """
    paths = [data] if isinstance(data, str) else list(data)
    with _quiet_datasets(verbose):
        if len(paths) == 1:
            first = Path(paths[0]).expanduser()
            if first.is_dir():
                loaded = _load_directory(first)
            elif not first.exists() and _looks_like_hub_id(paths[0]):
                loaded = _load_hub(paths[0], config_name)
            else:
                loaded = _load_files(_expand(paths))
        else:
            loaded = _load_files(_expand(paths))
    if not any(len(ds) for ds in loaded.splits.values()):
        raise DataError(f"{loaded.source} holds no examples")
    return loaded


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one local data file as dicts (read by :func:`load_data`).

    Raises:
        DataError: As :func:`load_data`.
    """
    loaded = load_data(str(path))
    return [row for ds in loaded.splits.values() for row in ds.to_list()]


def data_identity(data: str | Sequence[str] | None) -> str | list[str] | None:
    """``data`` as a run's identity records it: local paths resolved, a Hub id as it is."""
    if data is None:
        return None
    if not isinstance(data, str):
        return [str(Path(d).expanduser().resolve()) for d in data]
    path = Path(data).expanduser()
    if not path.exists() and _looks_like_hub_id(data):
        return data
    return str(path.resolve())


def _looks_like_hub_id(value: str) -> bool:
    """Whether ``value`` has the form of a Hub id (``name``, ``org/name``), not of a file path."""
    parts = value.split("/")
    return (
        1 <= len(parts) <= 2
        and all(p and p not in (".", "..") and not p.startswith("~") for p in parts)
        and not _has_glob(value)
        and _format_of(Path(value))[0] is None
    )


def _has_glob(value: str) -> bool:
    return any(c in value for c in "*?[")


def _format_of(path: Path) -> tuple[str | None, str | None]:
    """The data format suffix (a key of :data:`FORMATS`) and compression suffix of ``path``."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    kind = suffixes[-1] if suffixes and suffixes[-1] in FORMATS else None
    return kind, compression


def _expand(paths: Sequence[str]) -> list[Path]:
    """The files ``paths`` name (globs expanded, sorted), each checked to exist and be readable."""
    files: list[Path] = []
    for p in paths:
        if _has_glob(p):
            matches = sorted(Path(m) for m in glob.glob(str(Path(p).expanduser()), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"no data file matches {p}")
            files.extend(matches)
            continue
        path = Path(p).expanduser()
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        if path.is_dir():
            raise DataError(f"{path} is a directory; give it alone, or give files")
        files.append(path)
    for path in files:
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    return files


def _load_files(files: list[Path]) -> Loaded:
    import datasets

    kinds = {}
    for f in files:
        kind, _ = _format_of(f)
        if kind is None:
            raise DataError(
                f"{f}: unknown data format; use {', '.join(FORMATS)} files "
                f"(optionally {', '.join(COMPRESSIONS)}), a directory or a Hub dataset id"
            )
        kinds[kind] = f
    if len(kinds) > 1:
        raise DataError(f"the data files mix formats ({', '.join(kinds)}); give files of one kind")
    builder, options = FORMATS[next(iter(kinds))]
    source = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0].name}, ...)"
    if any(f.stat().st_size == 0 for f in files) and len(files) == 1:
        raise DataError(f"{source} holds no examples")
    data_files = [str(f) for f in files]
    try:
        dd = datasets.load_dataset(builder, data_files=data_files, **options)
        if builder == "csv" and any(
            v != datasets.Value("string") for v in dd["train"].features.values()
        ):
            # Read again with every column as text, as written (pandas would make "007" 7).
            text = datasets.Features({c: datasets.Value("string") for c in dd["train"].features})
            dd = datasets.load_dataset(builder, data_files=data_files, features=text, **options)
    except _read_errors() as e:  # datasets wraps the readers' own exceptions (pandas, arrow, gzip)
        raise _explain(e, files, source) from e
    if builder == "json":
        _check_utf8(dd, files, source)
    return Loaded(dict(dd), source)


def _check_utf8(splits: Mapping[str, Any], files: list[Path], source: str) -> None:
    """Refuses text that is not UTF-8, which pyarrow's JSON reader keeps as it is.

    Such a string fails only when it is read, far from the file, with a bare traceback.

    Raises:
        DataError: Naming the file and line of the first byte that is not UTF-8.
    """
    import pyarrow

    for ds in splits.values():
        try:
            ds.data.table.validate(full=True)
        except pyarrow.ArrowInvalid as e:
            raise _not_utf8(files, source, _first(e)) from None


def _not_utf8(files: list[Path], source: str, reason: str) -> DataError:
    """The error for content that is not UTF-8: the file and line where it is, if found."""
    for f in files:
        compression = _format_of(f)[1]
        found = first_non_utf8(f, compression)
        if found is not None:
            line, column, why = found
            what = {None: "", ".gz": " (gunzipped)"}.get(compression, " (decompressed)")
            return DataError(
                f"{f}: line {line}{what} is not UTF-8 text (byte {column} of the line: {why}); "
                "save the file as UTF-8"
            )
    return DataError(f"{source} is not UTF-8 text ({reason}); save it as UTF-8")


def _load_directory(path: Path) -> Loaded:
    import datasets

    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except _read_errors() as e:
        raise _explain(e, [], str(path)) from e
    if isinstance(loaded, datasets.Dataset):  # one split saved on its own
        return Loaded({"train": loaded}, str(path))
    return Loaded(dict(loaded), str(path))


def _load_hub(name: str, config_name: str | None) -> Loaded:
    import datasets

    try:
        dd = datasets.load_dataset(name, config_name)
    except _read_errors() as e:  # not found, no network and not cached, a missing config name
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"--data {name!r} is not a local file or directory; tried the Hugging Face Hub: "
            f"{reason}"
        ) from e
    what = f"Hub dataset {name}" + (f" ({config_name})" if config_name else "")
    return Loaded(dict(dd), what)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What ``datasets`` raises for data it cannot read or find (not for a bug of ours)."""
    import datasets
    import pyarrow

    return (
        datasets.exceptions.DatasetsError,  # DatasetGenerationError wraps the readers' errors
        pyarrow.ArrowException,
        OSError,  # FileNotFoundError, ConnectionError, a gzip error
        ValueError,  # "corresponds to no data", a missing config name
        StopIteration,  # an empty JSON file
    )


def _explain(error: BaseException, files: list[Path], source: str) -> DataError:
    """One line for a reading failure, from the innermost cause ``datasets`` wrapped."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    compression = next((c for f in files if (c := _format_of(f)[1]) is not None), None)
    one = str(files[0]) if len(files) == 1 else source
    for e in chain:
        if isinstance(e, (EOFError, zlib.error, lzma.LZMAError)) or type(e).__name__ in (
            "BadGzipFile",
            "ZstdError",
        ):
            kind = COMPRESSIONS.get(compression or "", "compressed")
            return DataError(f"{one} is not a valid {kind} file: {_first(e)}")
        if isinstance(e, OSError) and compression == ".bz2" and "Invalid data stream" in str(e):
            return DataError(f"{one} is not a valid bzip2 file: {_first(e)}")
        if isinstance(e, UnicodeDecodeError):
            return _not_utf8(files, one, f"byte {e.start}: {e.reason}")
        if type(e).__name__ == "CastError":
            return DataError(f"the files of {source} do not all have the same fields")
        # datasets' words for a file with a header but no rows, or with nothing at all.
        if isinstance(e, StopIteration) or "corresponds to no data" in str(e):
            return DataError(f"{source} holds no examples")
    from datasets.exceptions import DatasetsError

    # The reader's own error, not datasets' wrapper around it (nor a fallback reader's error).
    reason = next((e for e in chain if not isinstance(e, DatasetsError)), chain[-1])
    if files and _format_of(files[0])[0] in (".jsonl", ".json"):
        return _json_error(files, source, _first(reason))
    return DataError(f"cannot read {source}: {_first(reason)}")


def _json_error(files: list[Path], source: str, reason: str) -> DataError:
    """A JSON reading failure at the physical line of the file, where it can be found.

    pyarrow's own ``in row N`` counts from 0, without blank lines, within 10 MiB blocks: the
    line is found by reading the file again (:func:`.file_lines.first_bad_json_line`).
    """
    for f in files:
        found = first_bad_json_line(f, _format_of(f)[1])
        if found is not None:
            return DataError(f"{f}: line {found[0]} is {found[1]}")
    return DataError(f"cannot read {source}: {reason}")


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_datasets(verbose: bool) -> Iterator[None]:
    """Silences ``datasets``' logging and progress bars while loading, then restores them.

    Every failure becomes one :class:`DataError` line; ``datasets`` would log it a second time.
    """
    if verbose:
        yield
        return
    import datasets

    level = datasets.logging.get_verbosity()
    bars = datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


# --- splits -------------------------------------------------------------------------------------


@dataclass
class Chosen:
    """The splits a run uses (see :func:`choose_splits`).

    Attributes:
        train: The training examples.
        eval: The evaluation examples.
        also: The extra evaluation split of ``also_eval`` (``None`` without it).
        notes: ``train`` / ``eval`` / ``also`` -> where the examples came from, for the report.
        names: ``train`` / ``eval`` / ``also`` -> the split's name (a held-out one's is the name
            it was asked for, or ``validation``).
    """

    train: Any
    eval: Any
    also: Any = None
    notes: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)


def choose_splits(
    splits: Mapping[str, Any],
    *,
    train_split: str = "train",
    eval_split: str | None = None,
    also_eval: str | None = None,
    eval_fraction: float = 0.1,
    seed: int = SPLIT_SEED,
) -> Chosen:
    """Picks the training and evaluation splits; holds some out if the data has none.

    Args:
        splits: Split name -> dataset (anything with ``len`` and ``select``).
        train_split: The split to train on (the only split, if the data has one under another
            name and ``train_split`` is the default).
        eval_split: The split to evaluate on; ``None``: the first of :data:`EVAL_NAMES` the data
            has (other than ``also_eval``).
        also_eval: Another split to evaluate the fine-tuned model on.
        eval_fraction: If the data has no split besides the training one, each evaluation split
            asked for is this fraction of it (at least one example), held out with ``seed``.
        seed: The held-out shuffle's seed.

    Raises:
        DataError: If a named split is not in the data (listing its splits), or too few
            examples remain to hold any out.
    """
    names = list(splits)
    if train_split not in splits:
        if len(splits) == 1 and train_split == "train":
            train_split = names[0]
        else:
            raise DataError(
                f"the data has no split {train_split!r}; its splits are: {_list(names)}"
            )
    train = splits[train_split]
    others = [n for n in names if n != train_split]
    if eval_split is None:
        found = [n for n in EVAL_NAMES if n in others and n != also_eval]
        if found:
            eval_split = found[0]
        elif not others:
            eval_split = "test" if also_eval == "validation" else "validation"
        else:
            raise DataError(
                f"the data has no evaluation split ({_list(EVAL_NAMES)}); its splits are "
                f"{_list(names)}: choose one with --eval-split"
            )
    wanted = {"eval": eval_split, **({"also": also_eval} if also_eval else {})}
    chosen: dict[str, Any] = {}
    notes: dict[str, str] = {}
    missing = []
    for role, name in wanted.items():
        if name in others:
            chosen[role] = splits[name]
            notes[role] = f"{name!r} split"
        elif others or name == train_split:
            raise DataError(
                f"the data has no split {name!r} to evaluate on; its splits are: {_list(names)}"
            )
        else:
            missing.append(role)
    notes["train"] = f"{train_split!r} split"
    if missing:
        n = max(1, math.floor(len(train) * eval_fraction))
        if len(train) - n * len(missing) < 1:
            raise DataError(
                f"only {len(train)} examples: too few to hold out {len(missing)} x {n} "
                "for evaluation and keep some to train on"
            )
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        start = 0
        for role in missing:
            chosen[role] = train.select(sorted(order[start : start + n]))
            notes[role] = (
                f"{wanted[role]!r}: {eval_fraction:g} of {train_split!r} held out (seed {seed})"
            )
            start += n
        train = train.select(sorted(order[start:]))
        notes["train"] = f"{train_split!r} split without the held-out examples"
    roles = {"train": train_split, **wanted}
    return Chosen(train, chosen["eval"], chosen.get("also"), notes, roles)


def describe_splits(
    notes: Mapping[str, str], used: Mapping[str, int], total: Mapping[str, int]
) -> str:
    """One line for the report: how many examples of which split each role used.

    Args:
        notes: Role -> where its examples came from (:attr:`Chosen.notes`).
        used: Role -> examples used.
        total: Role -> examples available.
    """
    parts = []
    for role in ("train", "eval", "also"):
        if role not in used:
            continue
        n, of = used[role], total[role]
        how = (", seeded subset" if role == "train" else ", the first ones") if n < of else ""
        count = f"{n:,}" if n == of else f"{n:,} of {of:,}"
        parts.append(f"{role}: {count} ({notes.get(role, '')}{how})")
    return "; ".join(parts)


def _list(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"

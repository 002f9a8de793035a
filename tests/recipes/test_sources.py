"""Reading ``--data`` through ``datasets``: every source, the splits, and the errors."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest

from hiftune.recipes import sources as S
from hiftune.recipes.config import TrainRecipeConfig
from recipes.hubcache import write_jsonl

ROWS = [{"text": f"example {i}", "label": i % 2} for i in range(30)]


pytestmark = pytest.mark.usefixtures("datasets_cache")


def rows_of(loaded: S.Loaded, split: str = "train") -> list[dict]:
    return loaded.splits[split].to_list()


# --- every source -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv", "parquet", "jsonl.gz", "csv.bz2"])
def test_every_local_file_format(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"data.{kind}"
    if kind.startswith("jsonl"):
        body = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    elif kind == "json":
        body = json.dumps(ROWS).encode()
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
        body = b""
    else:
        sep = "\t" if kind == "tsv" else ","
        lines = [f"text{sep}label"] + [f"{r['text']}{sep}{r['label']}" for r in ROWS]
        body = "\n".join(lines).encode()
    if body:
        compress = {"gz": gzip.compress, "bz2": bz2.compress}.get(kind.rsplit(".", 1)[-1])
        path.write_bytes(compress(body) if compress else body)
    loaded = S.load_data(str(path))
    assert list(loaded.splits) == ["train"] and loaded.source == str(path)
    expected = ROWS
    if "csv" in kind or kind == "tsv":  # a CSV file has no types: its fields are text
        expected = [{"text": r["text"], "label": str(r["label"])} for r in ROWS]
    assert rows_of(loaded) == expected


def test_csv_fields_stay_as_written(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nNA,007\nnull,1.50\n,1\n")
    assert S.read_records(path) == [
        {"text": "NA", "label": "007"},
        {"text": "null", "label": "1.50"},
        {"text": "", "label": "1"},
    ]


def test_text_files_are_one_example_per_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n")
    assert S.read_records(path) == [{"text": "first line"}, {"text": "second line"}]


def test_several_files_and_a_glob_are_one_training_split(tmp_path: Path) -> None:
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", ROWS[10 * i : 10 * (i + 1)])
    listed = S.load_data([str(tmp_path / f"part-{i}.jsonl") for i in range(3)])
    globbed = S.load_data(str(tmp_path / "part-*.jsonl"))
    assert rows_of(listed) == rows_of(globbed) == ROWS
    assert globbed.source == "3 files (part-0.jsonl, ...)"


def test_save_to_disk_directories(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:20]),
        validation=datasets.Dataset.from_list(ROWS[20:]),
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    loaded = S.load_data(str(tmp_path / "dict"))
    assert rows_of(loaded, "validation") == ROWS[20:] and rows_of(loaded) == ROWS[:20]
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert rows_of(S.load_data(str(tmp_path / "one"))) == ROWS  # one split: the training one


def test_a_directory_of_data_files_has_their_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS[:25])
    write_jsonl(tmp_path / "validation.jsonl", ROWS[25:])
    loaded = S.load_data(str(tmp_path))
    assert sorted(loaded.splits) == ["train", "validation"]
    assert rows_of(loaded, "validation") == ROWS[25:]


def test_hub_dataset_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recipes.hubcache import HubCache

    hub = HubCache(tmp_path, monkeypatch)
    hub.add_dataset("org/sentiment", {"train": ROWS[:25], "test": ROWS[25:]})
    hub.add_dataset("org/two", {"train": ROWS[:5], "test": ROWS[5:7]}, config="small")
    hub.add_dataset("org/two", {"train": ROWS[:3], "test": ROWS[3:4]}, config="tiny")
    loaded = S.load_data("org/sentiment")
    assert loaded.source == "Hub dataset org/sentiment"
    assert rows_of(loaded) == ROWS[:25] and rows_of(loaded, "test") == ROWS[25:]
    small = S.load_data("org/two", config_name="small")
    assert rows_of(small) == ROWS[:5] and small.source == "Hub dataset org/two (small)"
    with pytest.raises(
        S.DataError,
        match=r"^--data 'org/absent' is not a local file .* tried the Hugging Face Hub: ",
    ):
        S.load_data("org/absent")
    with pytest.raises(S.DataError, match=r"tried the Hugging Face Hub: .*configurations.*small"):
        S.load_data("org/two")  # which configuration?


def test_identity_resolves_paths_but_keeps_hub_ids(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert S.data_identity("d.jsonl") == str(tmp_path / "d.jsonl")
    assert S.data_identity(["d.jsonl"]) == [str(tmp_path / "d.jsonl")]
    assert S.data_identity("org/name") == "org/name" and S.data_identity(None) is None


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.jsonl", None, r"data file .*missing\.jsonl does not exist"),
        ("empty.jsonl", "", "holds no examples"),
        ("blank.jsonl", "\n", "holds no examples"),
        ("header.csv", "t,y\n", "holds no examples"),
        ("bad.jsonl", "{not json}\n", r"bad\.jsonl: line 1 is not valid JSON"),
        ("data.xlsx", "x", "unknown data format"),
        ("d.csv.gz", "text,label\na,1\n", "is not a valid gzip file"),
    ],
)
def test_bad_files_are_one_line(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(S.DataError, match=match) as info:
        S.load_data(str(path))
    assert "\n" not in str(info.value)


def test_paths_globs_and_formats_are_checked_before_reading(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(S.DataError, match=r"no data file matches .*\*\.jsonl"):
        S.load_data(str(tmp_path / "*.jsonl"))
    a, b = write_jsonl(tmp_path / "a.jsonl", ROWS), tmp_path / "b.csv"
    b.write_text("text,label\nx,1\n")
    with pytest.raises(S.DataError, match=r"mix formats \(\.jsonl, \.csv\)"):
        S.load_data([str(a), str(b)])
    write_jsonl(tmp_path / "c.jsonl", [{"other": 1}])
    with pytest.raises(S.DataError, match="do not all have the same fields"):
        S.load_data([str(a), str(tmp_path / "c.jsonl")])
    real_open = Path.open

    def unreadable(self: Path, *args, **kwargs):  # the tests run as root: chmod would not do
        if self.name == "a.jsonl":
            raise PermissionError(13, "Permission denied")
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", unreadable)
    with pytest.raises(S.DataError, match=r"cannot read .*a\.jsonl: Permission denied"):
        S.load_data(str(a))


def test_a_missing_local_looking_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    # A name with a data suffix, or more than two path parts, is a file that is missing.
    for value in ("train.jsonl", "data/train/x", str(tmp_path / "nope")):
        with pytest.raises(S.DataError, match="does not exist"):
            S.load_data(value)


# --- splits ------------------------------------------------------------------------------------


def dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_the_data_s_own_evaluation_split_is_used() -> None:
    splits = {
        "train": dataset(ROWS[:20]),
        "test": dataset(ROWS[20:25]),
        "validation": dataset(ROWS[25:]),
    }
    chosen = S.choose_splits(splits)
    assert chosen.eval.to_list() == ROWS[25:] and len(chosen.train) == 20  # validation first
    chosen = S.choose_splits(splits, also_eval="validation")
    assert chosen.eval.to_list() == ROWS[20:25] and chosen.also.to_list() == ROWS[25:]
    assert chosen.notes == {
        "eval": "'test' split",
        "also": "'validation' split",
        "train": "'train' split",
    }
    assert chosen.names == {"train": "train", "eval": "test", "also": "validation"}
    assert (
        S.choose_splits({"train": splits["train"], "dev": splits["test"]}).notes["eval"]
        == "'dev' split"
    )
    with pytest.raises(
        S.DataError,
        match="no split 'valid' to evaluate on; its splits are: train, test, validation",
    ):
        S.choose_splits(splits, eval_split="valid")
    with pytest.raises(S.DataError, match="no split 'main'"):
        S.choose_splits(splits, train_split="main")
    with pytest.raises(S.DataError, match="no evaluation split"):
        S.choose_splits({"train": splits["train"], "extra": splits["test"]})


def test_held_out_evaluation_split_is_seeded_and_disjoint() -> None:
    data = {"train": dataset(ROWS)}
    a = S.choose_splits(data, eval_fraction=0.2)
    b = S.choose_splits(data, eval_fraction=0.2)
    assert a.eval.to_list() == b.eval.to_list() and len(a.eval) == 6 and len(a.train) == 24
    texts = lambda ds: {r["text"] for r in ds.to_list()}  # noqa: E731
    assert texts(a.eval) | texts(a.train) == texts(data["train"])
    assert not texts(a.eval) & texts(a.train)
    assert a.notes["eval"] == "'validation': 0.2 of 'train' held out (seed 1234)"
    other = S.choose_splits(data, eval_fraction=0.2, seed=7)
    assert texts(other.eval) != texts(a.eval)
    both = S.choose_splits(data, also_eval="validation")  # two held-out parts, 3 each
    assert (len(both.eval), len(both.also), len(both.train)) == (3, 3, 24)
    assert not texts(both.eval) & texts(both.also)
    assert both.notes["eval"].startswith("'test'")
    assert both.names == {"train": "train", "eval": "test", "also": "validation"}
    with pytest.raises(S.DataError, match="too few to hold out"):
        S.choose_splits({"train": dataset(ROWS[:1])})


def test_describe_splits() -> None:
    notes = {"train": "'train' split", "eval": "'test' split"}
    line = S.describe_splits(notes, {"train": 1600, "eval": 500}, {"train": 8570, "eval": 1000})
    assert line == (
        "train: 1,600 of 8,570 ('train' split, seeded subset); eval: 500 of 1,000 ('test' split, "
        "the first ones)"
    )
    assert S.describe_splits(notes, {"train": 9, "eval": 1}, {"train": 9, "eval": 1}) == (
        "train: 9 ('train' split); eval: 1 ('test' split)"
    )


def test_model_and_data_options_reach_the_config(tmp_path: Path) -> None:
    from hiftune.cli import parse_args
    from hiftune.cli.train import config_from_args

    def parse(*argv: str) -> TrainRecipeConfig:
        return config_from_args(parse_args(["train", *argv]))

    cfg = parse(
        "--model", "org/model", "--revision", "v1", "--trust-remote-code", "--dtype", "bf16",
        "--data", "a.jsonl", "b.jsonl", "--data-config", "small", "--data-split", "main",
        "--eval-split", "dev", "--eval-fraction", "0.25", "--train-samples", "all",
        "--eval-samples", "40", "--messages-field", "conv", "--completion-field", "answer",
    )  # fmt: skip
    assert (cfg.model, cfg.revision, cfg.trust_remote_code, cfg.dtype) == (
        "org/model",
        "v1",
        True,
        "bf16",
    )
    assert (cfg.data, cfg.data_config, cfg.data_split) == (["a.jsonl", "b.jsonl"], "small", "main")
    assert (cfg.eval_split, cfg.eval_fraction, cfg.train_samples, cfg.eval_samples) == (
        "dev",
        0.25,
        "all",
        40,
    )
    assert (cfg.messages_field, cfg.completion_field) == ("conv", "answer")
    default = parse("--data", "a.jsonl")
    assert (default.data, default.train_samples, default.eval_split, default.dtype) == (
        "a.jsonl",
        None,
        None,
        "fp32",
    )
    for bad, match in (
        ({"eval_fraction": 1.0}, "eval_fraction must be in"),
        ({"train_samples": 0}, "train_samples must be an integer >= 1"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"eval_split": "test", "also_eval": "test"}, "also_eval must be another split"),
        ({"data": []}, "data must be one or more paths"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainRecipeConfig(**bad)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        # pyarrow said "in row 2": rows from 0, the blank line skipped; the editor's line is 4.
        ("d.jsonl", b'{"t": "a"}\n{"t": "b"}\n\n{"t": "c" "u": 1}\n', "line 4 is not valid JSON"),
        ("d.jsonl", b'{"t": "a"}\n[1, 2]\n', "line 2 is a JSON array, not an object"),
        ("d.json", b'[{"t": "a"},\n {"t": "b"}\n {"t": "c"}]\n', "line 3 is Expecting ','"),
        ("d.jsonl.gz", gzip.compress(b'{"t": "a"}\n{"t": \n'), "line 2 is not valid JSON"),
        # pyarrow keeps bytes that are not UTF-8 (they used to fail later, with a traceback).
        ("d.jsonl", b'{"t": "a"}\n{"t": "caf\xe9"}\n', r"line 2 is not UTF-8 text \(byte 11 of"),
        ("d.csv", b"t,y\na,1\nb,0\nc\xe9,1\n", r"d\.csv: line 4 is not UTF-8 text \(byte 2 of"),
    ],
)  # fmt: skip
def test_a_broken_row_is_named_by_its_line(
    tmp_path: Path, name: str, content: bytes, match: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(S.DataError, match=match) as info:
        S.load_data(str(path))
    assert str(info.value).startswith(str(path)) or str(info.value).startswith("cannot read")

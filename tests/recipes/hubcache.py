"""A temporary Hugging Face cache for the tests: models and datasets placed under Hub ids.

Nothing is downloaded: a model directory saved in the test is copied into the hub cache layout
(``hub/models--org--name/snapshots/<commit>/`` with ``refs/main``), and a dataset prepared in the
test into the layout ``datasets`` reads offline (``datasets/org___name/<config>/0.0.0/<hash>/``).
``HF_HOME`` and ``HF_HUB_OFFLINE=1`` are set for subprocesses; ``huggingface_hub`` and
``datasets`` read them once at import, so their copies are patched for this process too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest


class HubCache:
    """An empty ``HF_HOME`` in ``root``, in offline mode, for the rest of the test.

    Args:
        root: A temporary directory.
        monkeypatch: The test's monkeypatch (undoes everything afterwards).
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import datasets
        import huggingface_hub

        self.home = root / "hf-home"
        self.hub = self.home / "hub"
        self.datasets = self.home / "datasets"
        self.hub.mkdir(parents=True)
        self.datasets.mkdir()
        monkeypatch.setenv("HF_HOME", str(self.home))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(self.hub))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", self.datasets)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def add_model(self, repo_id: str, directory: Path) -> str:
        """Places the files of ``directory`` in the cache as ``repo_id``'s ``main``; its commit."""
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo = self.hub / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        shutil.copytree(directory, snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return commit

    def add_dataset(
        self,
        repo_id: str,
        splits: Mapping[str, Sequence[Mapping[str, Any]]],
        config: str = "default",
    ) -> None:
        """Places rows as the Hub dataset ``repo_id`` (configuration ``config``), as ``datasets``
        leaves a dataset it downloaded once: prepared Arrow files and their ``dataset_info.json``."""
        import datasets

        work = self.home.parent / f"prepare-{repo_id.replace('/', '-')}-{config}"
        work.mkdir()
        files = {}
        for split, rows in splits.items():
            files[split] = str(work / f"{split}.jsonl")
            Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=str(work))
        builder.download_and_prepare()
        name = repo_id.split("/")[-1]
        target = self.datasets / repo_id.replace("/", "___") / config / "0.0.0" / ("0" * 16)
        target.mkdir(parents=True)
        for f in Path(builder.cache_dir).iterdir():
            if f.suffix == ".arrow":  # json-train.arrow -> <name>-train.arrow
                shutil.copy(f, target / f.name.replace("json-", f"{name}-", 1))
        info = json.loads((Path(builder.cache_dir) / "dataset_info.json").read_text())
        info.update(config_name=config, builder_name=name, dataset_name=name)
        (target / "dataset_info.json").write_text(json.dumps(info))
        shutil.rmtree(work)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Writes ``rows`` as a JSON Lines file at ``path`` and returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

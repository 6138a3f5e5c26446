"""raygpt data pipeline: corpus -> byte-level BPE -> packed Parquet token shards -> loader.

Public API (import from here or the submodules):
    DataConfig, DataError                      (config)
    data_pipeline.prepare.prepare(cfg, *, overwrite=False, planned=None) -> Manifest
                                               (`python -m data_pipeline.prepare`; not re-exported
                                               here: the submodule has the same name)
    data_pipeline.prepare.plan_prepare(cfg, *, overwrite=False) -> PlannedPrepare
                                               (its checks and listing without Ray, no writes)
    Manifest                                   (manifest; Manifest.load(out_dir))
    TokenShards, DistributedLoader, sample_id_at (loader)
    default_prompt(data_dir, n_tokens)         (prompt: the sample's default prompt)
    train_tokenizer, load_tokenizer, eos_id    (tokenizer)
    iter_documents, list_work_units, Document, WorkUnit (sources)

Heavy modules (ray, torch) are imported only when their names are used.
"""

from __future__ import annotations

import importlib
from typing import Any

from data_pipeline.config import EOS_TOKEN, DataConfig, DataError
from data_pipeline.manifest import Manifest

_LAZY = {
    "TokenShards": "data_pipeline.loader",
    "DistributedLoader": "data_pipeline.loader",
    "sample_id_at": "data_pipeline.loader",
    "default_prompt": "data_pipeline.prompt",
    "train_tokenizer": "data_pipeline.tokenizer",
    "load_tokenizer": "data_pipeline.tokenizer",
    "eos_id": "data_pipeline.tokenizer",
    "iter_documents": "data_pipeline.sources",
    "list_work_units": "data_pipeline.sources",
    "Document": "data_pipeline.sources",
    "WorkUnit": "data_pipeline.sources",
}

__all__ = ["EOS_TOKEN", "DataConfig", "DataError", "Manifest", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")

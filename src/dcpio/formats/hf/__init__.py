"""Hugging Face safetensors storage for DCP: save in the layout the hub and ``transformers`` load; load hub folders.

Layout written (facts as in torch's ``hf_storage``, so torch's reader, ``safetensors`` and ``transformers`` load it):

* ``model-0000i-of-0000N.safetensors`` per file index of ``fqn_to_index_mapping`` (one ``model-00001-of-00001``
  without it) and ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), written last.
* ``save_distributed=True``: every rank writes ``shard-0000r-model-0000i-of-0000N.safetensors`` with its own chunks;
  each file's ``__metadata__`` carries ``DCP_SHARDING_INFO`` (JSON: fqn -> ``{"saved_offsets": [...]}``),
  ``DCP_VERSION`` and ``format: pt``. With ``enable_consolidation`` those go under ``sharded/`` and the coordinator
  then writes full tensors beside it (:func:`consolidate_safetensors_files`).

The package: :mod:`~dcpio.formats.hf.common` (names, header entries, the checksummed write),
:mod:`~dcpio.formats.hf.writer`, :mod:`~dcpio.formats.hf.reader` and :mod:`~dcpio.formats.hf.consolidate`.
"""

from dcpio.formats.hf.common import INDEX_NAME, digests_metadata, list_files, tensor_digest
from dcpio.formats.hf.consolidate import consolidate_safetensors_files, consolidate_safetensors_files_on_every_rank
from dcpio.formats.hf.reader import HuggingFaceLoadPlanner, HuggingFaceStorageReader, _HFStorageInfo
from dcpio.formats.hf.writer import HuggingFaceStorageWriter

__all__ = [
    "INDEX_NAME",
    "HuggingFaceLoadPlanner",
    "HuggingFaceStorageReader",
    "HuggingFaceStorageWriter",
    "_HFStorageInfo",
    "consolidate_safetensors_files",
    "consolidate_safetensors_files_on_every_rank",
    "digests_metadata",
    "list_files",
    "tensor_digest",
]

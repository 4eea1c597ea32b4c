"""Extraction, the library under `simsearch extract`: `Trainer.predict` streams per-rank shards to disk,
then one merge writes the store.

Every item has a key (a file's relative path, size, mtime and ctime; a dataset's split and index) and
every vector is stored beside its key: in each shard (safetensors metadata) and in items.jsonl. A
vector is reused only when its key and the run's fingerprint (model, preprocessing, seed, dtype,
data source) match; nothing is matched by position. So:

- a killed run (kill -9, a preempted SLURM job) started again embeds only the items no complete
  shard of the same fingerprint holds, even if the folder changed in between;
- an extraction into the run.dir of a store of the same fingerprint embeds only new or changed
  items, drops removed ones and reuses the rest (incremental), giving the store a fresh run gives.

The new store is written in `run.dir/.staging/` and swapped in with manifest.json last; until then
the previous store stays readable, whatever happens to the run. One run at a time holds run.dir/.lock.

The package: `shards` (per-rank shards by key), `assembly` (the plan and the store written from it), `run`
(`extract_store`: the lock, the Trainer, rank 0's write).
"""

from simsearch.extraction.run import extract_store

__all__ = ["extract_store"]

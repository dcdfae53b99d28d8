"""Sharded WebDataset data for gentrain.

Writing shards:

- ``data_shards.build``: ``build_shards(source, out_dir, ...)`` writes deterministic tars and
  ``manifest.json`` from the sources of ``data_shards.sources``.

Reading them (shard bytes -> this rank's and worker's samples -> decode -> batch):

- ``data_shards.specs``: ``resolve_shards`` (directory, brace pattern, glob, URL, list ->
  shard URLs) and ``find_manifest``.
- ``data_shards.remote``: shards from ``https://``, ``s3://`` and ``pipe:``, streamed with
  read-ahead, retried and resumed where they stopped (the forms of ``data.shards`` it reads
  are in its docstring).
- ``data_shards.tars``: ``read_shard`` and the bulk index of plain local tars (``ShardTable``,
  whose samples are records: tuples of ``Record``'s fields).
- ``data_shards.decode``: bytes -> images, labels and points (fast decoders, PIL fallback).
- ``data_shards.samples``: a raw sample -> (value, label): images, points, or pairs
  (``KEY.src.*`` + ``KEY.tgt.*``).
- ``data_shards.batcher``: values -> batch dicts, in place (shared-memory slabs in workers).
- ``data_shards.stream``: ``ShardStream``: rank/worker-split, shuffled, decoded, batched,
  never-ending and exactly resumable.
- ``data_shards.loader``: ``make_loader`` (the DataLoader, its workers and their exit) and
  ``batch_to_float``.
- ``data_shards.slabs``: the workers' batches through reused shared memory.
- ``data_shards.options``: ``StreamOptions``, which configures all of the above.
- ``data_shards.errors``: ``NoValidSamples``, ``BadSample`` and the skip reasons.

Nothing is imported here so that building shards does not pay for importing torch.
"""

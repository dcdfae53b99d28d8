"""Sharded WebDataset data for gentrain.

- ``data_shards.build``: ``build_shards(source, out_dir, ...)`` writes deterministic tars and
  ``manifest.json`` from ``digits``, ``stacked-digits``, ``ring8``, ``grid25`` or ``folder:PATH``.
- ``data_shards.stream``: ``resolve_shards``, ``ShardStream``, ``make_loader``,
  ``batch_to_float``: rank/worker-split, shuffled, decoded, batched and never-ending.
- ``data_shards.decode``: single-sample decoding and the ``BadSample`` skip reasons.
- ``data_shards.tars``: ``read_shard`` and the bulk index of plain local tars (``ShardTable``).

Nothing is imported here so that building shards does not pay for importing torch.
"""

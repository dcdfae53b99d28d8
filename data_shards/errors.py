"""Errors of the data layer that callers act on (kept free of heavy imports)."""


class NoValidSamples(RuntimeError):
    """A whole pass over a slot's shards gave no usable sample: training cannot go on."""

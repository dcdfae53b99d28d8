"""What goes wrong in the data layer: the error callers act on, and the reasons a sample is skipped.

Kept free of heavy imports (no numpy, no torch): the launcher and the configs read it.

A bad sample never raises out of the stream: it is skipped and counted under one of the
reasons below, reported in the ``skipped`` dict of the next batch (see data_shards.stream).
"""

# Skip reasons, as they appear in a batch's ``skipped`` dict.
DECODE_ERROR = "decode_error"  # the payload does not decode (corrupt, truncated, wrong format)
BAD_LABEL = "bad_label"  # .cls is not a non-negative ASCII integer
TOO_LARGE = "too_large"  # the header announces more than max_pixels pixels
TRUNCATED_TAR = "truncated_tar"  # a sample cut off by the end of its shard, or a corrupt header mid-archive
MISSING_IMAGE = "missing_image"  # a sample without the payload the stream needs (.png/.npy/...)
UNREADABLE_SHARD = "unreadable_shard"  # the shard could not be opened at all, or (remote) the rest of it after retries
DUPLICATE_MEMBER = "duplicate_member"  # two members with the same key and extension in a row
MISSING_SOURCE = "missing_source"  # a paired sample with a target image (KEY.tgt.*) but no input (KEY.src.*)
MISSING_TARGET = "missing_target"  # a paired sample with an input image (KEY.src.*) but no target (KEY.tgt.*)

SKIP_REASONS = (DECODE_ERROR, BAD_LABEL, TOO_LARGE, TRUNCATED_TAR, MISSING_IMAGE, UNREADABLE_SHARD, DUPLICATE_MEMBER,
                MISSING_SOURCE, MISSING_TARGET)


class NoValidSamples(RuntimeError):
    """A whole pass over a slot's shards gave no usable sample: training cannot go on."""


class BadSample(Exception):
    """A sample that must be skipped; ``reason`` is one of the skip reasons above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ShardError(Exception):
    """A shard that could not be read to its end; ``reason`` is a skip reason. ``cut_key`` is
    the key of the sample whose member data the damage cut off, where it did (None where the
    damage is at a header, or the shard could not be opened)."""

    def __init__(self, reason: str, url: str, detail: str, cut_key: str | None = None):
        super().__init__(f"{reason}: {url}: {detail}")
        self.reason = reason
        self.cut_key = cut_key

"""Reading one CSV shard: base64 images (raw or PNG) decoded fast, every row judged once.

A shard is a table export: a header row with ``image_id``, ``label`` and ``image`` (any order,
other columns ignored). ``image`` is base64 of either the 784 raw bytes of a 28x28 grayscale
image or a PNG file. Bad rows are skipped and listed by ``file:line``; a file that cannot be
used at all raises :class:`DataError`. Where things are:

- :mod:`.reader`: :func:`read_shard`, lines, quoting, line limits, the general per-line reader;
- :mod:`.rows`: the one verdict on a row (:class:`ShardBuilder`), :class:`Shard`, :class:`BadRow`;
- :mod:`.fast`: the numpy fast path for the usual rows; it defers every other line to the reader;
- :mod:`.codecs`: the image field, raw or PNG (sizes checked from the header before decoding);
- :mod:`.hashing`: the sha256 of the bytes read, on a worker thread.
"""

from .codecs import IMAGE_BYTES, IMAGE_SIDE, decode_image, encode_image
from .reader import MAX_LINE_BYTES, read_shard
from .rows import (
    EXCERPT_CHARS,
    NO_LABEL,
    REQUIRED_COLUMNS,
    WARN_FIRST,
    BadRow,
    DataError,
    HeaderError,
    Shard,
    describe,
)

__all__ = [
    "IMAGE_BYTES", "IMAGE_SIDE", "MAX_LINE_BYTES", "EXCERPT_CHARS", "NO_LABEL", "REQUIRED_COLUMNS", "WARN_FIRST",
    "BadRow", "DataError", "HeaderError", "Shard", "decode_image", "describe", "encode_image", "read_shard",
]

"""One reader, one verdict: the fast path and the general reader agree row for row.

Hypothesis mutates shards of real MNIST rows (bad ids and labels, broken and PNG-looking
images, quotes, blank, short and overlong lines, CRLF, a BOM, non-UTF-8 bytes) and reads each
with the fast path on and off, and with small read blocks (so lines straddle blocks): the rows,
the bad-row list (line, column, reason), the counts and the fingerprint must be identical.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hostile import HEADER, b64_raw, png_bytes
from mnist_edge import shards
from mnist_edge.shards import DataError, reader

ROWS = 24
SMALL_LINE_LIMIT = 3000  # instead of 64 KiB, so overlong lines stay cheap to make

IDS = ["", "x", "+5", "-3", " 7 ", "\u0663", "1" * 19, "9" * 18, "007", "1_0", "5.0"]
LABELS = ["", "10", "-1", "a", "\u0663", " 3", "07", "3.0", "+4", "9", "0"]
QUOTED = ['"x', '"a,b"', '"a""b"', 'x"y', '"ok" ', '""']
CHARS = ["!", "=", '"', ",", "\u00e9", "\r", "\x00", "A", "/", "+", " "]


@pytest.fixture(scope="module")
def base_rows(mnist5k) -> list[list[str]]:
    images, labels = mnist5k
    pick = np.random.default_rng(11).permutation(len(labels))[:ROWS]
    out = []
    for k, i in enumerate(pick):
        image = b64_raw(images[i]) if k % 6 else base64.b64encode(png_bytes(images[i])).decode()
        out.append([str(1000 + k), str(labels[i]), image, "2024-01-01", "", "lab"])
    return out


def png_like_raw(image: str) -> str:
    blob = bytearray(base64.b64decode(image))
    if len(blob) == 784:
        blob[:8] = b"\x89PNG\r\n\x1a\n"
    return base64.b64encode(bytes(blob)).decode()


def mutate(row: list[str], kind: str, value) -> str:
    """One mutated line (without its newline)."""
    row = list(row)
    if kind == "id":
        row[0] = value
    elif kind == "label":
        row[1] = value
    elif kind == "char":
        at, char = value
        at %= len(row[2])
        row[2] = row[2][:at] + char + row[2][at + 1 :]
    elif kind == "truncate":
        row[2] = row[2][: value % len(row[2])]
    elif kind == "png-like":
        row[2] = png_like_raw(row[2])
    elif kind == "quote":
        row[5] = value
    elif kind == "quote-all":
        return ",".join(f'"{field}"' for field in row)
    elif kind == "blank":
        return " " * value
    elif kind == "short":
        return ",".join(row[:value])
    elif kind == "long":
        row[5] = "y" * (SMALL_LINE_LIMIT + value)
    elif kind == "spaces":
        row[2] = f" {row[2]} "
    return ",".join(row)


def kind(name: str, values: st.SearchStrategy | None = None) -> st.SearchStrategy:
    return st.tuples(st.just(name), st.none() if values is None else values)


MUTATION = st.one_of(
    kind("id", st.sampled_from(IDS)), kind("label", st.sampled_from(LABELS)),
    kind("char", st.tuples(st.integers(0, 1100), st.sampled_from(CHARS))), kind("truncate", st.integers(0, 1100)),
    kind("png-like"), kind("quote", st.sampled_from(QUOTED)), kind("quote-all"), kind("blank", st.integers(0, 2)),
    kind("short", st.integers(0, 2)), kind("long", st.integers(0, 5000)), kind("spaces"),
)
MUTATIONS = st.lists(st.tuples(st.integers(0, ROWS - 1), MUTATION).map(lambda m: (m[0], *m[1])),
                     min_size=1, max_size=12)
KNOWN = [  # always run: one of each kind of row that once got two verdicts, or nearly did
    [(1, "quote", '"x'), (2, "quote", '"ok" '), (3, "png-like", None), (4, "id", ""), (5, "label", "07")],
    [(1, "long", 4000), (7, "blank", 0), (8, "short", 2), (9, "char", (1047, "="))],
    [(1, "id", "\u0663"), (2, "label", "\u0663"), (3, "spaces", None), (4, "truncate", 1044)],
]


def shard_bytes(base: list[list[str]], mutations, crlf: bool, bom: bool, latin1: bool, final_newline: bool) -> bytes:
    lines = [",".join(row) for row in base]
    for index, name, value in mutations:
        lines[index] = mutate(base[index], name, value)
    newline = "\r\n" if crlf else "\n"
    text = newline.join([HEADER, *lines]) + (newline if final_newline else "")
    blob = text.encode("utf-8")
    if latin1:
        blob = blob.replace(b"lab", b"l\xe9b", 1)
    return (b"\xef\xbb\xbf" if bom else b"") + blob


def outcome(path: Path, fast: bool, labels_required: bool):
    """Everything a read decides, comparable with ==; or the error it raised."""
    try:
        shard = shards.read_shard(path, labels_required, fast=fast)
    except DataError as error:
        return ("error", str(error))
    return (shard.image_ids.tolist(), shard.labels.tolist(), shard.images.tobytes(), shard.rows_skipped,
            shard.bad_rows, shard.sha256)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(mutations=KNOWN[0], crlf=False, bom=False, latin1=False, final_newline=True, labels_required=True,
         block=reader.BLOCK_BYTES)
@example(mutations=KNOWN[1], crlf=True, bom=True, latin1=False, final_newline=False, labels_required=False, block=997)
@example(mutations=KNOWN[2], crlf=False, bom=False, latin1=False, final_newline=True, labels_required=True,
         block=4096)
@given(mutations=MUTATIONS, crlf=st.booleans(), bom=st.booleans(), latin1=st.booleans(),
       final_newline=st.booleans(), labels_required=st.booleans(),
       block=st.sampled_from([997, 4096, reader.BLOCK_BYTES]))
def test_fast_and_general_readers_give_the_same_verdict(base_rows, mutations, crlf, bom, latin1, final_newline,
                                                        labels_required, block):
    content = shard_bytes(base_rows, mutations, crlf, bom, latin1, final_newline)
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        path = Path(folder) / "s.csv"
        path.write_bytes(content)
        patch.setattr(reader, "MAX_LINE_BYTES", SMALL_LINE_LIMIT)
        reference = outcome(path, fast=False, labels_required=labels_required)
        patch.setattr(reader, "BLOCK_BYTES", block)
        assert outcome(path, fast=True, labels_required=labels_required) == reference
        assert outcome(path, fast=False, labels_required=labels_required) == reference
    if reference[0] != "error":
        kept = len(reference[1])
        blank = sum(1 for _, name, _value in mutations if name == "blank")
        assert kept + reference[3] <= ROWS and kept + reference[3] >= ROWS - blank - 8


def test_a_label_of_10_is_a_bad_row_on_both_paths(base_rows, tmp_path):
    """A label just past 9 is refused by the general reader, and the fast path gives the same verdict."""
    content = shard_bytes(base_rows, [(3, "label", "10")], False, False, False, True)
    path = tmp_path / "s.csv"
    path.write_bytes(content)
    general = outcome(path, fast=False, labels_required=True)
    assert general[3] == 1 and general[4][0].reason == "label 10 is out of range 0-9"
    assert outcome(path, fast=True, labels_required=True) == general



@pytest.mark.parametrize("body_break", [False, True], ids=["decoded-in-one-call", "lookup-table"])
@pytest.mark.parametrize("at, char, reason", [
    (1044, "!", "image is not valid base64 (Only base64 data is allowed)"),
    (1045, "=", ("image is not valid base64 (Invalid base64-encoded string: number of data characters (1045) "
                 "cannot be 1 more than a multiple of 4)")),
    (1046, "A", "image has 785 bytes, expected 784 raw bytes (28x28) or a PNG"),
    (1047, "A", "image is not valid base64 (Discontinuous padding not allowed)"),
])
def test_a_raw_image_broken_in_its_last_four_characters_is_a_bad_row_on_both_paths(base_rows, tmp_path, at, char,
                                                                                   reason, body_break):
    """The fast path checks the last quad (``xy==``) apart from the body; a break there is not a raw image.

    With ``body_break`` another row's body is all invalid characters, so the block is decoded by the
    lookup table instead of the one-call decoder, and both breaks must still be found: the fast path skips
    exactly the rows the general reader skips, for the same reasons.
    """
    raw = [row for row in base_rows if len(row[2]) == 1048][:8]
    assert raw[3][2][-2:] == "=="
    lines = [",".join(row) for row in raw]
    lines[3] = mutate(raw[3], "char", (at, char))
    expected = [(5, "image", reason)]
    if body_break:
        lines[5] = ",".join([*raw[5][:2], "!" * 1044 + raw[5][2][-4:], *raw[5][3:]])
        expected.append((7, "image", "image is not valid base64 (Only base64 data is allowed)"))
    path = tmp_path / "s.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    general = outcome(path, fast=False, labels_required=True)
    assert general[0] == [int(row[0]) for k, row in enumerate(raw) if k != 3 and not (body_break and k == 5)]
    assert [(b.line, b.column, b.reason) for b in general[4]] == expected
    assert outcome(path, fast=True, labels_required=True) == general


@pytest.mark.parametrize("last_byte", [1, 0x5A, 0xA5, 0xFF])
def test_the_last_pixel_of_a_raw_image_is_decoded_exactly_on_both_paths(mnist5k, tmp_path, last_byte):
    """Every value of an image's last byte reads back exactly on both paths. Real MNIST images end in a 0
    pixel, so this sets the last byte to values whose bits all matter."""
    images, labels = mnist5k
    pixels = images[:3].reshape(3, -1).copy()
    assert (pixels[:, -1] == 0).all()
    pixels[:, -1] = [last_byte, 0, 255 - last_byte]
    lines = [f"{10 + k},{labels[k]},{base64.b64encode(pixels[k].tobytes()).decode()},,," for k in range(3)]
    path = tmp_path / "s.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    for fast in (True, False):
        shard = shards.read_shard(path, fast=fast)
        assert shard.rows_skipped == 0
        assert shard.images.reshape(3, -1).tobytes() == pixels.tobytes()


@pytest.mark.parametrize("field, value, reason", [
    ("id", "1:", "image_id '1:' is not an integer"),
    ("id", ":", "image_id ':' is not an integer"),
    ("label", ":", "label ':' is not an integer 0-9"),
])
def test_the_byte_after_9_is_not_a_digit_on_the_fast_path(base_rows, tmp_path, field, value, reason):
    """':' is the ASCII byte after '9': an id or label holding it is a bad row on the fast path as on the
    general one, never a digit worth 10."""
    raw = [row for row in base_rows if len(row[2]) == 1048][:4]
    lines = [",".join(row) for row in raw]
    lines[1] = mutate(raw[1], field, value)
    path = tmp_path / "s.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n")
    general = outcome(path, fast=False, labels_required=True)
    column = "image_id" if field == "id" else "label"
    assert [(b.line, b.column, b.reason) for b in general[4]] == [(3, column, reason)]
    assert general[0] == [int(raw[k][0]) for k in (0, 2, 3)]
    assert outcome(path, fast=True, labels_required=True) == general


@pytest.mark.parametrize("header, short, after, reason", [
    ("image_id,note,label,image", "5,x", "6,4,{img1},{img2}", "row has 2 fields, expected at least 4"),
    ("note,image,image_id,label", "m,{img1},5", None, "row has 3 fields, expected at least 4"),
], ids=["borrows-from-the-next-line", "last-line-one-field-short"])
def test_a_short_line_is_a_bad_row_on_the_fast_path_too(mnist5k, tmp_path, header, short, after, reason):
    """A line with too few commas must not be given fields it does not have.

    Borrowing: with an unchecked column between image_id and label, the field that crosses the newline
    is that column, so only the comma count keeps ``5,x`` from taking the next line's label and image.
    One short, last in its block: its missing label would be read as its image_id field again (``5``).
    Either way the fast path skips the short line, as the general reader does.
    """
    images, labels = mnist5k
    img = {f"img{k}": b64_raw(images[k]) for k in range(3)}
    first = "1,n,{label},{img0}" if header.startswith("image_id") else "n,{img0},1,{label}"
    lines = [header, first.format(label=labels[0], **img), short.format(**img)]
    expected = [(3, None, reason)]
    if after is not None:
        lines.append(after.format(**img))
        expected.append((4, "label", "label of 1048 characters is not an integer 0-9"))
    path = tmp_path / "s.csv"
    path.write_text("\n".join(lines) + "\n")
    general = outcome(path, fast=False, labels_required=True)
    assert general[0] == [1] and general[1] == [labels[0]]
    assert [(b.line, b.column, b.reason) for b in general[4]] == expected
    assert outcome(path, fast=True, labels_required=True) == general

"""Field by field: which column a quoting error is in, what a header or a value is shown as, and
the image codecs at their edges (16-bit gray levels, headers cut short, the formats written).

Every message here reaches the server, so each is held whole; none quotes an image.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib

import numpy as np
import pytest

from hostile import HEADER, b64_raw, png_bytes, png_claiming, write_lines
from mnist_edge import data, shards
from mnist_edge.data import DataError
from mnist_edge.shards import codecs
from mnist_edge.shards.codecs import PNG_MAGIC


@pytest.mark.parametrize("row, column", [
    ('"7"x,3,IMG,,,', "image_id"),  # closed, then more in the field
    ('7,"3"x,IMG,,,', "label"),
    ('7,3,IMG,"a""b"c,,', "start_datetime"),  # a doubled quote, then the close, then more
    ('7,3,IMG,,"x,y', "end_datetime"),  # never closed: the commas are inside it
    ('7,3,IMG,a"b,,"q', "location"),  # a quote inside an unquoted field is a character
    ('7,3,IMG,"",x"y,"z', "location"),  # an empty quoted field is fine
    ("7,3,IMG,a\rb,,", "start_datetime"),  # a lone CR outside quotes
    ('"7,3,IMG,,,', "image_id"),
    ('7,3,IMG,,,,"z', "column 7"),  # past the header's columns
])
def test_a_quoting_error_names_the_column_it_is_in(tmp_path, mnist5k, row, column):
    """A row skipped for its quoting names the column where the quoting went wrong (a doubled quote, a quote
    inside an unquoted field and an empty quoted field are fine; past the header it is ``column N``)."""
    images, labels = mnist5k
    image = b64_raw(images[0])
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, row.replace("IMG", image), f"1,2,{image},,,"]))
    assert len(shard.labels) == 1 and shard.rows_skipped == 1
    bad = shard.bad_rows[0]
    assert (bad.line, bad.column) == (2, column) and bad.reason.startswith(f"{column}: malformed CSV quoting (")
    assert image not in bad.reason


def test_a_cr_inside_quotes_is_part_of_the_field(tmp_path, mnist5k):
    images, labels = mnist5k
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, f'7,3,{b64_raw(images[0])},"a\rb",,']))
    assert shard.rows_skipped == 0 and shard.image_ids.tolist() == [7]


@pytest.mark.parametrize("name, shown", [("x" * 20, "x" * 20), ("x" * 21, "column 4"), ("  ", "column 4")])
def test_a_column_is_named_by_its_header_when_that_is_short(tmp_path, mnist5k, name, shown):
    images, _ = mnist5k
    path = write_lines(tmp_path / "s.csv", [f"image_id,label,image,{name}", f'7,3,{b64_raw(images[0])},"q'])
    assert data.read_shard(path).bad_rows[0].column == shown


@pytest.mark.parametrize("header, summary", [
    ("x,1,y", "line 1 looks like a data row of 3 fields, not a header"),
    ("a,b," + "c" * 129, "line 1 looks like a data row of 3 fields, not a header"),
    ("a,b," + "c" * 128, "header has: a, b, <128 characters>"),
    ("a,b/c,d e.f-g_h", "header has: a, <3 characters>, d e.f-g_h"),
    ("a,b,c,d,e,f,g,h", "header has: a, b, c, d, e, f, g, h"),
    ("a,b,c,d,e,f,g,h,i", "header has: a, b, c, d, e, f, g, h, ... (9 columns)"),
])
def test_a_header_without_the_columns_is_summarised_without_quoting_data(tmp_path, header, summary):
    path = write_lines(tmp_path / "s.csv", [header, "1,2,3"])
    with pytest.raises(DataError) as error:
        data.read_shard(path)
    assert error.value.local_message == f"{path}:1: missing required column 'image_id' ({summary})"
    assert "image_id' (" not in str(error.value)  # the server's message says nothing of the line


@pytest.mark.parametrize("label, reason", [
    ("x" * 20, f"label {'x' * 20!r} is not an integer 0-9"),
    ("x" * 21, "label of 21 characters is not an integer 0-9"),
])
def test_a_value_is_quoted_only_when_short(tmp_path, mnist5k, label, reason):
    images, _ = mnist5k
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, f"7,{label},{b64_raw(images[0])},,,"]))
    assert shard.bad_rows[0].reason == reason


def test_sixteen_bit_gray_levels_are_rounded_to_the_nearest_eight_bit_level(tmp_path):
    """Every 16-bit level from 0 to 65535 (spread over the image), against round(v * 255 / 65535)."""
    wide = np.linspace(0, 65535, 784).round().astype(np.uint16).reshape(28, 28)
    blob = base64.b64encode(png_bytes(wide)).decode()
    got = shards.decode_image(blob)
    np.testing.assert_array_equal(got, np.round(wide.astype(np.float64) * 255 / 65535).astype(np.uint8))


@pytest.mark.parametrize("blob, reason", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "image is not a decodable PNG (truncated before its IHDR header)"),
    (png_claiming(28, 28)[:26], "image is not a decodable PNG (OSError)"),  # a whole IHDR, nothing after it
])
def test_a_png_cut_short_is_refused_saying_where(blob, reason):
    with pytest.raises(ValueError) as error:
        shards.decode_image(base64.b64encode(blob).decode())
    assert str(error.value) == reason


def test_images_are_encoded_raw_unless_png_is_asked_for(mnist5k):
    images, _ = mnist5k
    wide = images[0].astype(np.int64)  # any integer array of 0-255 is an image
    assert shards.encode_image(wide) == base64.b64encode(images[0].tobytes()).decode()
    np.testing.assert_array_equal(shards.decode_image(shards.encode_image(wide, "png")), images[0])
    with pytest.raises(ValueError) as error:
        shards.encode_image(images[0], "jpeg")
    assert str(error.value) == "image format must be 'raw' or 'png', got 'jpeg'"


# -- messages held whole, and the columns they name -------------------------------------------------

@pytest.mark.parametrize("row, reason", [
    ('7,3,IMG,,,"lab', ("location: malformed CSV quoting (unexpected end of data; a quote opened in this field "
                        "is not closed on this line)")),
    ('"7"x,3,IMG,,,', "image_id: malformed CSV quoting (',' expected after '\"')"),
])
def test_a_quoting_error_says_what_csv_saw_and_hints_only_at_an_open_quote(tmp_path, mnist5k, row, reason):
    """The whole reason: what the csv module saw, plus a hint about an unclosed quote only where one is open."""
    images, _ = mnist5k
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, row.replace("IMG", b64_raw(images[0]))]))
    assert [(b.line, b.reason) for b in shard.bad_rows] == [(2, reason)]


def test_a_doubled_quote_inside_a_quoted_field_does_not_move_the_blame(tmp_path, mnist5k):
    """A field that is one doubled quote (``""""``) is fine: the blame falls on the field that never closes."""
    images, _ = mnist5k
    row = f'7,3,{b64_raw(images[0])},"""","x'  # start_datetime is one quote character; end_datetime never closes
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, row]))
    assert [(b.line, b.column) for b in shard.bad_rows] == [(2, "end_datetime")]


@pytest.mark.parametrize("fast", [True, False])
def test_each_bad_row_names_the_column_it_failed_in(tmp_path, mnist5k, fast):
    """A bad id, label or image is blamed on its column (a short row on no column), with its line, on both paths."""
    images, labels = mnist5k
    image = b64_raw(images[0])
    good = f"8,{labels[1]},{b64_raw(images[1])},,,"
    lines = [HEADER, f"x,3,{image},,,", f"7,a,{image},,,", "7,3,AAAA,,,", "7,3", good]
    shard = data.read_shard(write_lines(tmp_path / "s.csv", lines), fast=fast)
    assert shard.image_ids.tolist() == [8]
    assert [(b.line, b.column, b.reason) for b in shard.bad_rows] == [
        (2, "image_id", "image_id 'x' is not an integer"),
        (3, "label", "label 'a' is not an integer 0-9"),
        (4, "image", "image has 3 bytes, expected 784 raw bytes (28x28) or a PNG"),
        (5, None, "row has 2 fields, expected at least 3"),
    ]


@pytest.mark.parametrize("fast", [True, False])
def test_a_row_with_exactly_the_header_columns_is_kept(tmp_path, mnist5k, fast):
    """A file with only the three required columns is read whole: a row of exactly those fields is no short row."""
    images, labels = mnist5k
    lines = ["image_id,label,image", f"7,{labels[0]},{b64_raw(images[0])}", f'"8",{labels[1]},{b64_raw(images[1])}']
    shard = data.read_shard(write_lines(tmp_path / "s.csv", lines), fast=fast)
    assert shard.rows_skipped == 0 and shard.image_ids.tolist() == [7, 8]
    np.testing.assert_array_equal(shard.images, images[:2])


@pytest.mark.parametrize("fast", [True, False])
def test_a_signed_id_or_label_is_a_number(tmp_path, mnist5k, fast):
    """An id or label written with a sign (``+5``, ``-3``, ``-0``) is that number, on both paths."""
    images, _ = mnist5k
    lines = [
        HEADER,
        f"+5,+4,{b64_raw(images[0])},,,",
        f"-3,3,{b64_raw(images[1])},,,",
        f"+12,-0,{b64_raw(images[2])},,,",
    ]
    shard = data.read_shard(write_lines(tmp_path / "s.csv", lines), fast=fast)
    assert shard.rows_skipped == 0
    assert (shard.image_ids.tolist(), shard.labels.tolist()) == ([5, -3, 12], [4, 3, 0])


@pytest.mark.parametrize(
    "label, reason",
    [
        ("0" * 18 + "12", "label 12 is out of range 0-9"),  # 20 characters: short enough to show
        ("0" * 19 + "12", "label of 21 characters is out of range 0-9"),
        (" " + "0" * 19 + "12 ", "label of 21 characters is out of range 0-9"),  # measured without its spaces
    ],
)
def test_an_out_of_range_label_is_shown_only_when_short(tmp_path, mnist5k, label, reason):
    """An out-of-range label is quoted when it is at most 20 characters (spaces not counted), otherwise only its
    length is given: a 4,000-digit label never fills a message."""
    images, _ = mnist5k
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, f"7,{label},{b64_raw(images[0])},,,"]))
    assert [(b.line, b.column, b.reason) for b in shard.bad_rows] == [(2, "label", reason)]


def _chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    """One PNG chunk (CRC computed unless given)."""
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def _ihdr(width: int, height: int, depth: int = 8) -> bytes:
    return struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)


def _decode_error(blob: bytes) -> str:
    with pytest.raises(ValueError) as error:
        shards.decode_image(base64.b64encode(blob).decode())
    return str(error.value)


def test_a_png_whose_first_chunk_is_not_a_13_byte_ihdr_is_refused(mnist5k):
    """A PNG whose first chunk is not named IHDR, or is not 13 bytes long, is refused: either alone is enough."""
    images, _ = mnist5k
    after = png_bytes(images[0])[len(PNG_MAGIC) + 25 :]  # the real image's chunks after its IHDR
    wrong_name = PNG_MAGIC + _chunk(b"IHDX", _ihdr(28, 28)) + after
    wrong_length = PNG_MAGIC + _chunk(b"IHDR", _ihdr(28, 28) + b"\x00") + after
    for blob in (wrong_name, wrong_length):
        assert _decode_error(blob) == "image is not a decodable PNG (no IHDR header)"


def test_a_second_ihdr_that_pillow_reads_is_held_to_ours(mnist5k):
    """Pillow reads the last IHDR, we read the first: a later one claiming another size (named, width x height)
    or another depth is refused, never decoded with gray levels silently clipped."""
    images, _ = mnist5k
    wide = np.linspace(0, 65535, 784).round().astype(np.uint16).reshape(28, 28)
    sixteen = png_bytes(wide)
    larger = PNG_MAGIC + _chunk(b"IHDR", _ihdr(28, 28)) + _chunk(b"IHDR", _ihdr(30, 40)) + png_bytes(images[0])[33:]
    assert _decode_error(larger) == "PNG is 30x40, expected 28x28"
    deeper = PNG_MAGIC + _chunk(b"IHDR", _ihdr(28, 28, depth=8)) + sixteen[len(PNG_MAGIC) :]
    assert _decode_error(deeper) == "image is not a decodable PNG (its IHDR chunks disagree)"
    assert shards.decode_image(base64.b64encode(sixteen).decode()).dtype == np.uint8  # the real 16-bit PNG


def test_a_blob_with_the_png_signature_is_only_ever_read_as_a_png():
    """A broken PNG is refused even where another Pillow plugin (PhotoCD: ``PCD_`` at byte 2048) would read it."""
    blob = PNG_MAGIC + _chunk(b"IHDR", _ihdr(28, 28), crc=0)  # a bad checksum: the PNG plugin gives up
    blob += bytes(2048 - len(blob)) + b"PCD_" + bytes(2048)
    assert _decode_error(blob) == "image is not a decodable PNG (UnidentifiedImageError)"


@pytest.mark.parametrize("text", [b"AAAA!", b"AA==AAAA"])
def test_the_stdlib_fallback_decoder_is_as_strict_as_pybase64(text):
    """Without pybase64 the stdlib decoder refuses what pybase64 refuses: a bad character, data after padding."""
    for decode in (codecs.b64decode_strict, codecs.stdlib_b64decode_strict):
        with pytest.raises(binascii.Error):
            decode(text)
    assert codecs.stdlib_b64decode_strict(b"AAAA") == codecs.b64decode_strict(b"AAAA") == b"\x00\x00\x00"

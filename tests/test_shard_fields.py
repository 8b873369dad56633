"""Field by field: which column a quoting error is in, what a header or a value is shown as, and
the image codecs at their edges (16-bit gray levels, headers cut short, the formats written).

Every message here reaches the server, so each is held whole; none quotes an image.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hostile import HEADER, b64_raw, png_bytes, png_claiming, write_lines

from mnist_edge import data, shards
from mnist_edge.data import DataError


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
    assert str(error.value) == f"{path}:1: missing required column 'image_id' ({summary})"


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

"""The shard reader: real MNIST images written as raw and PNG base64, then every bad-row case."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from mnist_edge import data, shards
from mnist_edge.data import DataError

HEADER = "image_id,label,image,start_datetime,end_datetime,location"


def b64_raw(pixels: np.ndarray) -> str:
    return base64.b64encode(pixels.astype(np.uint8).tobytes()).decode()


def b64_png(pixels: np.ndarray, mode: str = "L", size: tuple[int, int] = (28, 28)) -> str:
    image = Image.fromarray(pixels.astype(np.uint8), mode="L").resize(size).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write(path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join(lines).encode() + newline.encode())


def test_raw_and_png_rows_decode_to_the_original_pixels(tmp_path, mnist5k):
    images, labels = mnist5k
    lines = [HEADER]
    for i in range(6):
        encoded = b64_raw(images[i]) if i % 2 == 0 else b64_png(images[i])
        lines.append(f"{100 + i},{labels[i]},{encoded},2024-01-01,2024-01-02,lab")
    write(tmp_path / "s.csv", lines)
    shard = data.read_shard(tmp_path / "s.csv")
    assert shard.rows_skipped == 0
    np.testing.assert_array_equal(shard.images, images[:6])
    np.testing.assert_array_equal(shard.labels, labels[:6])
    np.testing.assert_array_equal(shard.image_ids, np.arange(100, 106))
    assert shard.images.dtype == np.uint8 and shard.images.shape == (6, 28, 28)


def test_column_order_extra_columns_crlf_and_bom(tmp_path, mnist5k):
    images, labels = mnist5k
    lines = ["location,image,extra,label,image_id"]
    lines += [f"site-{i},{b64_raw(images[i])},x,{labels[i]},{i}" for i in range(4)]
    path = tmp_path / "crlf.csv"
    write(path, lines, newline="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    shard = data.read_shard(path)
    assert shard.rows_skipped == 0
    np.testing.assert_array_equal(shard.images, images[:4])
    np.testing.assert_array_equal(shard.labels, labels[:4])


def test_png_in_other_modes_is_converted_to_grayscale(tmp_path, mnist5k):
    images, labels = mnist5k
    write(tmp_path / "rgb.csv", [HEADER, f"1,{labels[0]},{b64_png(images[0], mode='RGB')},,,"])
    shard = data.read_shard(tmp_path / "rgb.csv")
    np.testing.assert_array_equal(shard.images[0], images[0])


def test_write_shard_round_trips(tmp_path, mnist5k):
    images, labels = mnist5k
    for fmt in ("raw", "png"):
        path = data.write_shard(tmp_path / f"{fmt}.csv", images[:50], labels[:50], np.arange(50) * 3, fmt=fmt)
        shard = data.read_shard(path)
        np.testing.assert_array_equal(shard.images, images[:50])
        np.testing.assert_array_equal(shard.image_ids, np.arange(50) * 3)


def test_write_shard_writes_the_table_export_layout(tmp_path, mnist5k):
    """The exact bytes: the export's header and empty extra columns, LF line ends, an empty label
    for an unlabelled row, and the image in the format asked for."""
    images, _ = mnist5k
    path = data.write_shard(tmp_path / "s.csv", images[:2], np.array([7, data.NO_LABEL]), np.array([5, 6]), fmt="png")
    assert path.read_text() == ("image_id,label,image,start_datetime,end_datetime,location\n"
                                f"5,7,{shards.encode_image(images[0], 'png')},,,\n"
                                f"6,,{shards.encode_image(images[1], 'png')},,,\n")


BAD_ROWS = [
    ("not-base64", "7", "!!!not base64!!!", "not valid base64"),
    ("short", "7", None, "has 100 bytes, expected 784"),
    ("bad-png", "7", base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10).decode(), "not a decodable PNG"),
    ("png-size", "7", "PNG32", "PNG is 32x32, expected 28x28"),
    ("label-missing", "", "GOOD", "label is missing"),
    ("label-text", "seven", "GOOD", "label 'seven' is not an integer 0-9"),
    ("label-range", "10", "GOOD", "label 10 is out of range 0-9"),
    ("label-float", "7.0", "GOOD", "label '7.0' is not an integer 0-9"),
    ("id-text", "7", "GOOD", "image_id 'abc' is not an integer"),
]


@pytest.mark.parametrize("case,label,image,reason", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_each_bad_row_is_skipped_with_file_line_and_reason(tmp_path, mnist5k, case, label, image, reason):
    images, labels = mnist5k
    good = b64_raw(images[0])
    image = {"GOOD": good, "PNG32": b64_png(images[0], size=(32, 32)), None: b64_raw(images[0][:4, :25])}.get(
        image, image
    )
    image_id = "abc" if case == "id-text" else "2"
    write(tmp_path / "bad.csv", [HEADER, f"1,{labels[0]},{good},,,", f"{image_id},{label},{image},,,",
                                 f"3,{labels[0]},{good},,,"])
    shard = data.read_shard(tmp_path / "bad.csv")
    assert len(shard.labels) == 2 and shard.rows_skipped == 1
    np.testing.assert_array_equal(shard.image_ids, [1, 3])
    bad = shard.bad_rows[0]
    assert (bad.path, bad.line) == (str(tmp_path / "bad.csv"), 3)
    assert reason in bad.reason
    assert "bad.csv:3: " in str(bad)


def test_row_with_too_few_fields_is_skipped(tmp_path, mnist5k):
    images, labels = mnist5k
    write(tmp_path / "s.csv", [HEADER, "1,2", f"2,{labels[0]},{b64_raw(images[0])},,,"])
    shard = data.read_shard(tmp_path / "s.csv")
    assert shard.rows_skipped == 1 and "row has 2 fields" in shard.bad_rows[0].reason


def test_predict_shards_may_leave_labels_empty(tmp_path, mnist5k):
    images, _ = mnist5k
    write(tmp_path / "p.csv", [HEADER, f"1,,{b64_raw(images[0])},,,", f"2,,{b64_raw(images[1])},,,"])
    with pytest.raises(DataError, match="no valid rows"):
        data.load_dataset(tmp_path / "p.csv", labels_required=True)
    dataset = data.load_dataset(tmp_path / "p.csv", labels_required=False)
    assert list(dataset.labels) == [data.NO_LABEL] * 2


def test_first_ten_bad_rows_are_logged_and_all_are_counted(tmp_path, mnist5k, caplog):
    images, labels = mnist5k
    lines = [HEADER] + [f"{i},{labels[i]},###,,," for i in range(25)]
    lines += [f"{i},{labels[i]},{b64_raw(images[i])},,," for i in range(25, 30)]
    write(tmp_path / "train" / "s.csv", lines)
    with caplog.at_level(logging.WARNING, logger="mnist_edge"):
        dataset = data.load_split(tmp_path, "train")
    assert len(dataset) == 5 and dataset.rows_skipped == 25
    row_warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped row")]
    assert len(row_warnings) == 10
    assert row_warnings[0].startswith(f"skipped row {tmp_path / 'train' / 's.csv'}:2: image is not valid base64")
    assert f"{tmp_path / 'train' / 's.csv'}: 15 more rows skipped" in [r.getMessage() for r in caplog.records]
    caplog.clear()
    write(tmp_path / "ten.csv", lines[:11] + lines[26:])  # exactly ten bad rows: no "more" line
    with caplog.at_level(logging.WARNING, logger="mnist_edge"):
        data.load_dataset(tmp_path / "ten.csv")
    assert len(caplog.records) == 10 and not any("more rows" in r.getMessage() for r in caplog.records)


def test_duplicate_image_ids_are_reported(tmp_path, mnist5k, caplog):
    images, labels = mnist5k
    write(tmp_path / "d.csv", [HEADER] + [f"{i % 3},{labels[i]},{b64_raw(images[i])},,," for i in range(5)])
    with caplog.at_level(logging.WARNING, logger="mnist_edge"):
        dataset = data.load_dataset(tmp_path / "d.csv")
    assert dataset.duplicate_image_ids == 2 and len(dataset) == 5
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'd.csv'}: 2 rows repeat an image_id already seen"]


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "empty file, expected a header row"),
        (b"image_id,label,start_datetime\n1,2,x\n", "missing required column 'image' (header has: image_id, label"),
        (b"image_id,label,image\n1,2,\xff\xfe\n", "not UTF-8 text"),
    ],
    ids=["empty", "missing-column", "binary"],
)
def test_unusable_files_fail_naming_the_path(tmp_path, content, message):
    path = tmp_path / "broken.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        data.load_dataset(path)
    assert str(path) in str(error.value) and message in (error.value.local_message or str(error.value))


def test_missing_and_empty_locations_fail_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'data' / 'train'}: no such file or directory"):
        data.load_split(tmp_path / "data", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.csv shards"):
        data.load_dataset(tmp_path / "empty")


def test_unreadable_file_fails_naming_the_path(tmp_path):
    path = tmp_path / "shard.csv"
    path.mkdir()  # unreadable as a file, even for root
    with pytest.raises(DataError, match=f"{path}: is a directory, expected a regular CSV file"):
        data.read_shard(path)


def test_a_split_may_be_a_single_csv_file(tmp_path, mnist5k):
    images, labels = mnist5k
    data.write_shard(tmp_path / "train.csv", images[:10], labels[:10])
    assert len(data.load_split(tmp_path, "train")) == 10


def test_directory_of_shards_is_combined_with_one_fingerprint(tmp_path, mnist5k):
    images, labels = mnist5k
    data.write_shard(tmp_path / "a" / "0.csv", images[:30], labels[:30])
    data.write_shard(tmp_path / "a" / "1.csv", images[30:50], labels[30:50], np.arange(30, 50))
    (tmp_path / "a" / "notes.txt").write_text("not a shard")
    dataset = data.load_dataset(tmp_path / "a")
    assert len(dataset) == 50 and [p.name for p in dataset.files] == ["0.csv", "1.csv"]
    np.testing.assert_array_equal(dataset.images, images[:50])
    # Same contents elsewhere -> same fingerprint; one changed pixel -> another fingerprint.
    data.write_shard(tmp_path / "b" / "0.csv", images[:30], labels[:30])
    data.write_shard(tmp_path / "b" / "1.csv", images[30:50], labels[30:50], np.arange(30, 50))
    assert data.load_dataset(tmp_path / "b").fingerprint == dataset.fingerprint
    changed = images[30:50].copy()
    changed[0, 0, 0] ^= 1
    data.write_shard(tmp_path / "b" / "1.csv", changed, labels[30:50], np.arange(30, 50))
    assert data.load_dataset(tmp_path / "b").fingerprint != dataset.fingerprint


def test_cache_reuses_decoded_shards_until_a_file_changes(tmp_path, mnist5k):
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "train" / "s.csv", images[:20], labels[:20])
    first = data.load_split(tmp_path, "train")
    assert data.load_split(tmp_path, "train") is first
    assert data.cached_shard(path, True)[1] is False
    data.write_shard(path, images[:25], labels[:25])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    second = data.load_split(tmp_path, "train")
    assert second is not first and len(second) == 25


@pytest.mark.parametrize("decoder", ["default", "stdlib"])
def test_bulk_and_row_by_row_paths_agree_on_good_and_bad_rows(tmp_path, mnist5k, monkeypatch, decoder):
    """A plain ASCII file takes the bulk path; quoting one field sends it through csv.reader.

    Both with the compiled base64 decoder (pybase64) and with the stdlib fallback.
    """
    if decoder == "stdlib":
        monkeypatch.setattr(shards.codecs, "b64decode_strict", shards.codecs.stdlib_b64decode_strict)
    images, labels = mnist5k
    rows = [f"{i},{labels[i]},{b64_raw(images[i])},,," for i in range(3000)]
    rows[10] = f"10,{labels[10]},###,,,"  # bad base64
    rows[2500] = f"x,{labels[2500]},{b64_raw(images[2500])},,,"  # bad id
    rows[2999] = f"2999,,{b64_png(images[2999])},,,"  # missing label
    rows[1234] = f"1234,{labels[1234]},{b64_png(images[1234])},,,"  # a valid PNG among raw rows
    write(tmp_path / "plain.csv", [HEADER] + rows)
    quoted = [HEADER] + rows[:-1] + [rows[-1].replace(",,,", ',"quoted, field",,')]
    write(tmp_path / "quoted.csv", quoted)
    deferred = rows_parsed_one_by_one(monkeypatch)
    plain = data.read_shard(tmp_path / "plain.csv")
    assert deferred == [12, 1236, 2502, 3001]  # the usual rows (two blocks of them) never leave the bulk path
    slow = data.read_shard(tmp_path / "quoted.csv")
    for shard in (plain, slow):
        assert len(shard.labels) == 2997 and shard.rows_skipped == 3
        assert [(b.line, b.reason.split(" ")[0]) for b in shard.bad_rows] == [(12, "image"), (2502, "image_id"),
                                                                               (3001, "label")]
    np.testing.assert_array_equal(plain.images, slow.images)
    np.testing.assert_array_equal(plain.image_ids, slow.image_ids)
    keep = np.setdiff1d(np.arange(3000), [10, 2500, 2999])
    np.testing.assert_array_equal(plain.images, images[keep])
    np.testing.assert_array_equal(plain.labels, labels[keep])


def test_prediction_files_have_the_result_schema(tmp_path):
    path = data.write_predictions(tmp_path / "out" / "p.csv", np.array([7, -3]), np.array([1, 9]),
                                  np.array([0.12345678, 1.0], dtype=np.float32))
    assert path == tmp_path / "out" / "p.csv"
    assert path.read_text() == "image_id,label,confidence\n7,1,0.123457\n-3,9,1.0\n"


def test_a_split_is_a_directory_or_a_single_csv(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    (tmp_path / "test.csv").write_text("image_id,label,image\n")
    assert data.has_split(tmp_path, "train") and data.has_split(tmp_path, "test")
    assert not data.has_split(tmp_path, "predict")


def rows_parsed_one_by_one(monkeypatch) -> list[int]:
    """The lines given to the per-row parser (``ShardBuilder.add_row``, the general reader's) from now on;
    the bulk path fills the builder's arrays a block at a time without it."""
    seen: list[int] = []
    add_row = shards.rows.ShardBuilder.add_row

    def recording(self, line, *fields):
        seen.append(line)
        return add_row(self, line, *fields)

    monkeypatch.setattr(shards.rows.ShardBuilder, "add_row", recording)
    return seen


@pytest.mark.parametrize("labels_required", [True, False])
def test_the_usual_rows_of_an_export_take_the_bulk_path(tmp_path, mnist5k, monkeypatch, labels_required):
    """Every row of a usual export (decimal ids up to 18 digits, a one-digit or empty label, a raw image,
    empty extra columns) is read in bulk, none parsed one by one: the shard reads at the bulk path's speed
    (bench/ingest.py), with the same rows."""
    images, labels = mnist5k
    labels = labels[:300] if labels_required else np.full(300, data.NO_LABEL)
    path = data.write_shard(tmp_path / "s.csv", images[:300], labels, np.arange(300) * 10**15)
    one_by_one = rows_parsed_one_by_one(monkeypatch)
    shard = data.read_shard(path, labels_required=labels_required)
    assert one_by_one == [] and len(shard.labels) == 300
    np.testing.assert_array_equal(shard.image_ids, np.arange(300) * 10**15)
    np.testing.assert_array_equal(shard.labels, labels)


def test_the_general_reader_alone_parses_every_row_one_by_one(tmp_path, mnist5k, monkeypatch):
    """``fast=False`` is the reference the bulk path is checked against: no row may take the bulk path then."""
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "s.csv", images[:20], labels[:20])
    one_by_one = rows_parsed_one_by_one(monkeypatch)
    shard = data.read_shard(path, fast=False)
    assert one_by_one == list(range(2, 22)) and len(shard.labels) == 20


def test_shards_and_prediction_files_end_every_line_with_lf(tmp_path, mnist5k):
    """Shards and prediction files end every line with LF, never CRLF (the csv module's default): checked on
    the bytes on disk, since text read back with universal newlines would hide a CRLF."""
    images, labels = mnist5k
    shard = data.write_shard(tmp_path / "s.csv", images[:3], labels[:3]).read_bytes()
    predictions = data.write_predictions(tmp_path / "p.csv", np.arange(3), np.array([1, 2, 3]),
                                         np.ones(3, np.float32)).read_bytes()
    assert predictions == b"image_id,label,confidence\n0,1,1.0\n1,2,1.0\n2,3,1.0\n"
    assert shard.count(b"\n") == 4 and b"\r" not in shard
    assert shard.startswith(b"image_id,label,image,start_datetime,end_datetime,location\n0,")


def test_a_dataset_names_each_shards_sha256_and_its_fingerprint_is_built_from_them(tmp_path, mnist5k):
    """The lineage of a trained model names every shard by the sha256 of its bytes, in file order,
    and the data fingerprint is the sha256 over those (one documented rule, re-computable by anyone)."""
    images, labels = mnist5k
    data.write_shard(tmp_path / "a" / "0.csv", images[:20], labels[:20])
    data.write_shard(tmp_path / "a" / "1.csv", images[20:30], labels[20:30], np.arange(20, 30))
    dataset = data.load_dataset(tmp_path / "a")
    own = tuple(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp_path / "a").glob("*.csv")))
    assert dataset.shard_sha256 == own
    assert dataset.fingerprint == hashlib.sha256("".join(own).encode()).hexdigest()


def test_files_given_one_by_one_need_labels_and_fail_naming_their_location(tmp_path, mnist5k):
    """``load_files`` (the shards of a data-parallel job or of a standalone command) reads training
    data unless told otherwise: a row without a label is skipped, a prediction's files keep it, and
    files with no valid row fail naming the location they belong to."""
    images, labels = mnist5k
    write(tmp_path / "d" / "s.csv", [HEADER, f"1,,{b64_raw(images[0])},,,", f"2,{labels[1]},{b64_raw(images[1])},,,"])
    dataset = data.load_files([tmp_path / "d" / "s.csv"], tmp_path / "d")
    assert dataset.image_ids.tolist() == [2] and dataset.rows_skipped == 1
    unlabelled = data.load_files([tmp_path / "d" / "s.csv"], tmp_path / "d", labels_required=False)
    assert unlabelled.image_ids.tolist() == [1, 2] and unlabelled.rows_skipped == 0
    write(tmp_path / "e" / "s.csv", [HEADER, f"1,,{b64_raw(images[0])},,,"])
    with pytest.raises(DataError, match=f"^{tmp_path / 'e'}: no valid rows"):
        data.load_files([tmp_path / "e" / "s.csv"], tmp_path / "e")


def test_the_parts_of_a_dataset_are_disjoint_cover_every_row_and_keep_the_whole_fingerprint(tmp_path, mnist5k):
    """Each rank of a data-parallel job trains on every N-th row from its own start: the parts are
    disjoint, together they are the whole dataset, each keeps images, labels and ids aligned, and
    the fingerprint names the whole dataset."""
    images, labels = mnist5k
    data.write_shard(tmp_path / "s.csv", images[:11], labels[:11], np.arange(100, 111))
    whole = data.load_files([tmp_path / "s.csv"], tmp_path)
    parts = [whole.part(i, 3) for i in range(3)]
    assert sorted(i for p in parts for i in p.image_ids.tolist()) == list(range(100, 111))
    for part in parts:
        rows = part.image_ids - 100
        np.testing.assert_array_equal(part.images, images[rows])
        np.testing.assert_array_equal(part.labels, labels[rows])
        assert part.fingerprint == whole.fingerprint and part.files == whole.files

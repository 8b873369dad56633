"""The shard edges a table export can hit: quoting, ambiguous images, odd digits, odd entries, change.

Each case is a real file; each verdict is the same whatever path the row takes through the
reader (the differential property test checks that over many mutated shards).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import frozen_times, shards_fingerprint
from hostile import HEADER, b64_raw, rows, write_lines
from mnist_edge import data, shards
from mnist_edge.data import DataError
from mnist_edge.shards.hashing import BackgroundSha256


def test_an_unclosed_quote_is_one_bad_row_not_a_silent_merge(tmp_path, mnist5k):
    images, labels = mnist5k
    lines = rows(images[:100], labels[:100])
    lines[3] = lines[3] + '"lab 7'  # location opens a quote and never closes it
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, *lines]))
    assert len(shard.labels) == 99 and shard.rows_skipped == 1
    bad = shard.bad_rows[0]
    assert (bad.line, bad.column) == (5, "location") and "a quote opened in this field is not closed" in bad.reason
    assert str(bad).startswith(f"{tmp_path / 's.csv'}:5: location: malformed CSV quoting")


def test_quoted_fields_with_commas_and_doubled_quotes_are_fine(tmp_path, mnist5k):
    images, labels = mnist5k
    lines = [f'"{i}","{labels[i]}","{b64_raw(images[i])}","a, ""b""",,' for i in range(5)]
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, *lines]))
    assert shard.rows_skipped == 0
    np.testing.assert_array_equal(shard.images, images[:5])


def test_a_raw_image_that_starts_like_a_png_gets_one_verdict(tmp_path, mnist5k):
    """784 raw bytes beginning with the PNG signature are a (broken) PNG wherever the row is."""
    images, labels = mnist5k
    fake = images[0].copy().reshape(-1)
    fake[:8] = np.frombuffer(b"\x89PNG\r\n\x1a\n", dtype=np.uint8)
    among_raw = rows(images[:50], labels[:50])
    among_raw[20] = f"20,{labels[20]},{b64_raw(fake)},,,"
    alone = [among_raw[20]]
    results = [data.read_shard(write_lines(tmp_path / f"{name}.csv", [HEADER, *lines]), fast=fast)
               for name, lines in (("among", among_raw), ("alone", alone)) for fast in (True, False)]
    assert [s.rows_skipped for s in results] == [1, 1, 1, 1]
    assert {s.bad_rows[0].reason for s in results} == {"image is not a decodable PNG (no IHDR header)"}


@pytest.mark.parametrize("field,value", [("image_id", "\u0661\u0662"), ("label", "\u0663"), ("label", "\uff17"),
                                         ("image_id", "1_000"), ("label", "²")])
def test_only_ascii_digits_are_numbers(tmp_path, mnist5k, field, value):
    images, labels = mnist5k
    row = f"{value},3," if field == "image_id" else f"1,{value},"
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, row + b64_raw(images[0]) + ",,,"]))
    assert shard.rows_skipped == 1 and shard.bad_rows[0].reason.startswith(field)


@pytest.mark.parametrize("fast", [True, False])
def test_an_image_id_beyond_64_bits_is_a_bad_row_and_the_extremes_are_kept(tmp_path, mnist5k, fast):
    """ids are int64: 2**63-1 and -2**63 are kept, one past either end (and a 20-digit id) is a bad row
    naming the id, on both paths; never an OverflowError out of the reader."""
    images, labels = mnist5k
    ids = [2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**19 * 9 + 7, 5]
    lines = [f"{i},{labels[k]},{b64_raw(images[k])},,," for k, i in enumerate(ids)]
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, *lines]), fast=fast)
    assert shard.image_ids.tolist() == [2**63 - 1, -(2**63), 5]
    np.testing.assert_array_equal(shard.images, images[[0, 1, 5]])
    assert [(b.line, b.column, b.reason) for b in shard.bad_rows] == [
        (4, "image_id", "image_id '9223372036854775808' does not fit in 64 bits"),
        (5, "image_id", "image_id '-9223372036854775809' does not fit in 64 bits"),
        (6, "image_id", "image_id '90000000000000000007' does not fit in 64 bits"),
    ]



@pytest.mark.parametrize("fast", [True, False])
def test_a_line_of_exactly_the_limit_is_a_row_and_one_byte_more_is_not(tmp_path, mnist5k, fast):
    """A line of exactly MAX_LINE_BYTES is read; one byte longer is a bad row with its line number and reason.
    Both lines quote their location, so whichever path reads the file, the general reader judges them."""
    images, labels = mnist5k
    row = f"7,{labels[0]},{b64_raw(images[0])},,,"
    pad = shards.MAX_LINE_BYTES - len(row) - 2  # two quote characters
    lines = [HEADER, f'{row}"{"y" * pad}"', f'{row}"{"y" * (pad + 1)}"', f"8,{labels[1]},{b64_raw(images[1])},,,"]
    assert [len(line) for line in lines[1:3]] == [shards.MAX_LINE_BYTES, shards.MAX_LINE_BYTES + 1]
    shard = data.read_shard(write_lines(tmp_path / "s.csv", lines), fast=fast)
    assert shard.image_ids.tolist() == [7, 8]
    assert [(b.line, b.column, b.reason) for b in shard.bad_rows] == [
        (3, None, f"line is longer than {shards.MAX_LINE_BYTES} bytes, the limit for one row")]

def test_a_required_column_twice_is_refused(tmp_path, mnist5k):
    images, labels = mnist5k
    path = write_lines(tmp_path / "s.csv", ["image_id,label,image,label", f"1,3,{b64_raw(images[0])},5"])
    with pytest.raises(DataError, match=r"s.csv:1: not a CSV shard") as error:
        data.read_shard(path)
    assert error.value.local_message.endswith("s.csv:1: column 'label' appears 2 times (columns 2, 4), expected once")


@pytest.mark.parametrize("content,message", [
    (b"\nimage_id,label,image\n", ":1: blank line, expected a header row with image_id, label, image"),
    (b"image_id,label,image\n1,2,caf\xe9\n", ":2: not UTF-8 text (at byte 8 of the line)"),
    (b"image_id,label,image\n" + b"1,2,x\n" * 3000 + b"1,2,\xff\n", ":3002: not UTF-8 text (at byte 5 of the line)"),
])
def test_unusable_files_say_where(tmp_path, content, message):
    """Where, not what: the line and byte, never the byte's value (it may be part of an image)."""
    path = tmp_path / "s.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        data.read_shard(path)
    assert f"{path}{message}" in (error.value.local_message or str(error.value))


@pytest.mark.parametrize("kind", ["dangling", "loop", "fifo", "directory"])
def test_a_csv_entry_that_is_not_a_file_fails_naming_it(tmp_path, mnist5k, kind):
    images, labels = mnist5k
    data.write_shard(tmp_path / "train" / "good.csv", images[:5], labels[:5])
    entry = tmp_path / "train" / "odd.csv"
    if kind == "dangling":
        entry.symlink_to(tmp_path / "gone.csv")
    elif kind == "loop":
        entry.symlink_to(entry)
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.mkdir()
    expected = {"dangling": "is a dangling symbolic link", "loop": "is a symbolic link loop",
                "fifo": "is a FIFO, device or socket", "directory": "is a directory"}[kind]
    with pytest.raises(DataError, match=f"{entry}: {expected}"):
        data.load_split(tmp_path, "train")


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(DataError, match=f"{tmp_path / 'data'}: is a file, expected the node's data directory"):
        data.load_split(tmp_path / "data", "train")


def test_a_rewrite_with_the_same_size_and_mtime_is_seen(tmp_path, mnist5k):
    """``cp -p`` of a same-sized shard: new labels, same size, same mtime; the cache must notice."""
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "train" / "s.csv", images[:50], np.full(50, 3))
    first = data.load_split(tmp_path, "train")
    other = data.write_shard(tmp_path / "other.csv", images[:50], np.full(50, 4))
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    subprocess.run(["cp", "-p", str(other), str(path)], check=True)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (other.stat().st_size, other.stat().st_mtime_ns)
    second = data.load_split(tmp_path, "train")
    assert set(first.labels) == {3} and set(second.labels) == {4}
    assert second.fingerprint == shards_fingerprint([path])


def test_an_old_rewrite_is_seen_by_its_change_time(tmp_path, mnist5k, monkeypatch):
    """Outside the racy window only the stat is compared: ctime still changes where mtime was kept."""
    monkeypatch.setattr(data, "RACY_NS", 0)
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "train" / "s.csv", images[:50], np.full(50, 3))
    data.load_split(tmp_path, "train")
    stamp = path.stat()
    time.sleep(0.05)  # past the filesystem's timestamp granularity
    data.write_shard(tmp_path / "new.csv", images[:50], np.full(50, 5))
    shutil.copyfile(tmp_path / "new.csv", path)  # same inode, same size
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert set(data.load_split(tmp_path, "train").labels) == {5}


def test_a_same_tick_rewrite_is_caught_by_content(tmp_path, mnist5k, monkeypatch):
    """Where timestamps cannot tell (a coarse clock: same tick, same size), the recent file is re-hashed."""
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "train" / "s.csv", images[:50], np.full(50, 3))
    frozen_times(monkeypatch, path)  # what such a filesystem shows
    assert set(data.load_split(tmp_path, "train").labels) == {3}
    with open(path, "r+b") as handle:  # in place: same inode, same size
        handle.write(data.write_shard(tmp_path / "new.csv", images[:50], np.full(50, 6)).read_bytes())
    again = data.load_split(tmp_path, "train")
    assert set(again.labels) == {6} and again.fingerprint == shards_fingerprint([path])


def test_the_fingerprint_is_of_the_bytes_trained_on(tmp_path, mnist5k):
    images, labels = mnist5k
    files = [data.write_shard(tmp_path / "train" / f"{k}.csv", images[k * 10 : k * 10 + 10], labels[:10])
             for k in range(3)]
    quoted = files[0].read_text().replace(",,,\n", ',"x",,\n')  # through the general reader too
    files[0].write_text(quoted)
    assert data.load_split(tmp_path, "train").fingerprint == shards_fingerprint(files)



def test_a_hashing_error_is_raised_by_hexdigest_and_never_stalls_the_reader():
    """An error while hashing is raised by ``hexdigest`` (never a digest of part of the data), and the reader's
    later ``update`` calls keep returning: a failed hash never stalls the shard reader on a full queue."""
    digest = BackgroundSha256(depth=2)
    fed = threading.Event()

    def feed() -> None:
        digest.update("not bytes")  # hashlib refuses a str: the worker's update raises TypeError
        for _ in range(10):
            digest.update(b"x" * 10)
        fed.set()

    threading.Thread(target=feed, daemon=True).start()
    assert fed.wait(30), "update blocked: the worker stopped taking blocks after its error"
    with pytest.raises(TypeError, match="Strings must be encoded before hashing"):
        digest.hexdigest()

# -- unreadable directories (as root, only without CAP_DAC_OVERRIDE) -----------------------------------

SETPRIV = shutil.which("setpriv")


def run_unprivileged(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` so that file permissions apply: root drops the capabilities that bypass them."""
    prefix = []
    if os.geteuid() == 0:
        if SETPRIV is None:
            pytest.skip("root without setpriv: permissions cannot be made to apply")
        caps = "-dac_override,-dac_read_search"
        prefix = [SETPRIV, f"--bounding-set={caps}", f"--inh-caps={caps}"]
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=180)


def test_an_unreadable_test_split_still_gets_training_metrics(node_dir, seed_path, tmp_path):
    (node_dir / "test").chmod(0)
    try:
        result = run_unprivileged(f"""
            import json
            from scaleout import ScaleoutModel
            from scaleoututil.helpers.helpers import get_helper
            from mnist_edge import model, runtime
            recorder = runtime.LocalRuntime()
            client = runtime.local_client({str(node_dir)!r}, recorder, workdir={str(tmp_path)!r})
            seed = ScaleoutModel.from_training_model(model.load_npz({str(seed_path)!r}), get_helper("numpyhelper"))
            print(json.dumps(runtime.run_task(client, "validate", seed)))
            print(recorder.attributes[-1]["validation_error"])
        """)
    finally:
        (node_dir / "test").chmod(0o755)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics, error = result.stdout.strip().splitlines()[-2:]
    assert '"num_test_examples": 0' in metrics and '"num_train_examples": 1000' in metrics
    assert error == f"{node_dir / 'test'}: cannot list directory (Permission denied)"


def test_an_unreadable_train_split_fails_naming_it(node_dir, tmp_path):
    (node_dir / "train").chmod(0)
    try:
        result = run_unprivileged(f"""
            from mnist_edge import data
            try:
                data.load_split({str(node_dir)!r}, "train")
            except data.DataError as error:
                print(error)
        """)
    finally:
        (node_dir / "train").chmod(0o755)
    assert result.stdout.strip() == f"{node_dir / 'train'}: cannot list directory (Permission denied)", result.stderr


@pytest.mark.parametrize("capacity", [10, 4000])
def test_a_full_builder_grows_by_half_plus_1024_rows_and_keeps_its_rows(tmp_path, mnist5k, capacity):
    """Reserving only the room left reallocates nothing; one row more grows the arrays geometrically
    (1.5x + 1024 rows, so a shard far bigger than its estimate costs few reallocations), rows intact.
    """
    images, labels = mnist5k
    builder = shards.rows.ShardBuilder(tmp_path / "s.csv", capacity, (0, 1, 2), ["image_id", "label", "image"], True)
    n = min(capacity, len(labels))
    builder.append(images[:n].reshape(n, -1), np.arange(n), labels[:n].astype(np.int64))
    builder.reserve(capacity - n)
    assert len(builder.labels) == len(builder.image_ids) == len(builder.images) == capacity
    builder.reserve(capacity - n + 1)
    assert len(builder.labels) == len(builder.image_ids) == len(builder.images) == capacity * 3 // 2 + 1024
    builder.append(images[n : n + 1].reshape(1, -1), np.array([n]), labels[n : n + 1].astype(np.int64))
    shard = builder.finish("0" * 64)
    assert shard.image_ids.tolist() == list(range(n + 1))
    np.testing.assert_array_equal(shard.images, images[: n + 1])
    np.testing.assert_array_equal(shard.labels, labels[: n + 1])


# -- what the reader refuses, and the exact words -------------------------------------------------------------


def read_in_thread(path) -> object:
    """``read_shard(path)``'s result or error, or a failure if it blocks (as opening a FIFO for reading does)."""
    outcome = {}

    def read() -> None:
        try:
            outcome["value"] = data.read_shard(path)
        except Exception as error:  # noqa: BLE001 (handed to the test)
            outcome["value"] = error

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), f"read_shard({path}) blocked"
    return outcome["value"]


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_shard_that_is_no_regular_file_is_refused_at_once_naming_what_it_is(tmp_path, kind):
    """Handed a directory or a FIFO directly (or one that replaced a listed shard), the reader says what it is
    and never waits for a writer on the FIFO."""
    path = tmp_path / "s.csv"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    error = read_in_thread(path)
    what = "a directory" if kind == "directory" else "a FIFO, device or socket"
    assert isinstance(error, DataError) and str(error) == f"{path}: is {what}, expected a regular CSV file"


def test_a_shard_that_is_gone_is_named_with_the_reason(tmp_path):
    with pytest.raises(DataError) as error:
        data.read_shard(tmp_path / "gone.csv")
    assert str(error.value) == f"{tmp_path / 'gone.csv'}: cannot read shard (No such file or directory)"


@pytest.mark.parametrize("content, message", [
    (b"", ": empty file, expected a header row with image_id, label, image"),
    (b"image_id,label,im\xffage\n1,2,x\n", ":1: not UTF-8 text (at byte 18 of the line); expected a UTF-8 CSV file"),
    (b'image_id,label,"image"x\n1,2,x\n', ":1: malformed CSV header (',' expected after '\"')"),
], ids=["empty", "not-utf8", "bad-quoting"])
def test_a_header_that_cannot_be_read_says_why_in_full(tmp_path, content, message):
    """Never a header read loosely (``"image"x`` is no column name): the file is refused as no shard, with
    nothing of its content in the message, and the command line (``local_message``) gets the file (and line)
    and what is wrong in full."""
    path = tmp_path / "s.csv"
    path.write_bytes(content)
    with pytest.raises(shards.HeaderError) as error:
        data.read_shard(path)
    assert str(error.value) == (f"{path}:1: not a CSV shard: expected line 1 to be a header naming image_id, "
                                "label, image (each once); the file's content is not shown (a headerless or "
                                "empty shard, a misspelt or repeated column, or not a shard)")
    assert error.value.local_message == f"{path}{message}"


def test_a_utf8_bom_before_the_header_is_no_part_of_the_first_column(tmp_path, mnist5k):
    """Spreadsheets write "CSV UTF-8" with a byte-order mark: ``image_id`` first is still ``image_id``."""
    images, labels = mnist5k
    path = write_lines(tmp_path / "s.csv", [HEADER, *rows(images[:3], labels[:3])])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    shard = data.read_shard(path)
    assert shard.image_ids.tolist() == [0, 1, 2] and shard.rows_skipped == 0


def test_a_shards_arrays_have_the_documented_types(tmp_path, mnist5k):
    """uint8 images, int64 ids and labels (NO_LABEL where unlabelled), whatever the shard held."""
    images, labels = mnist5k
    path = data.write_shard(tmp_path / "s.csv", images[:3], np.array([labels[0], data.NO_LABEL, labels[2]]))
    for fast in (True, False):
        shard = data.read_shard(path, labels_required=False, fast=fast)
        assert (shard.images.dtype, shard.image_ids.dtype, shard.labels.dtype) == (np.uint8, np.int64, np.int64)


# -- block boundaries: a shard is read in blocks of shards.reader.BLOCK_BYTES -----------------------------------


def filled(images, labels, size: int, eol: bytes = b"\n", header: str = HEADER) -> bytearray:
    """The header and real rows, exactly ``size`` bytes, ending in ``eol`` (the last row padded in location)."""
    text = bytearray(header.encode() + eol)
    k = 0
    while size - len(text) > 2 * 1100 + len(eol):
        text += f"{k},{labels[k % 500]},{b64_raw(images[k % 500])},,,".encode() + eol
        k += 1
    last = f"{k},{labels[k % 500]},{b64_raw(images[k % 500])},,,"
    text += (last + "y" * (size - len(text) - len(last) - len(eol))).encode() + eol
    assert len(text) == size
    return text


def tail_rows(images, labels, start: int, count: int, eol: bytes = b"\n") -> bytes:
    return b"".join(f"{start + i},{labels[i]},{b64_raw(images[i])},,,".encode() + eol for i in range(count))


def test_a_crlf_split_by_a_block_boundary_is_still_one_line_read_in_bulk(tmp_path, mnist5k, monkeypatch):
    """A Windows export whose CR ends one block and LF starts the next: every row is read whole, at the bulk
    path's speed, and so is its last row when the file ends in a bare CR."""
    from test_data import rows_parsed_one_by_one

    images, labels = mnist5k
    block = shards.reader.BLOCK_BYTES
    content = filled(images, labels, block + 1, eol=b"\r\n") + tail_rows(images, labels, 10_000, 20, b"\r\n")
    assert content[block - 1 : block + 1] == b"\r\n"
    path = tmp_path / "s.csv"
    path.write_bytes(bytes(content[:-1]))  # the last LF gone: the file ends in CR
    one_by_one = rows_parsed_one_by_one(monkeypatch)
    shard = data.read_shard(path)
    assert one_by_one == [] and shard.rows_skipped == 0
    assert shard.image_ids[-20:].tolist() == list(range(10_000, 10_020))
    np.testing.assert_array_equal(shard.images[-20:], images[:20])


def test_only_the_first_three_bytes_of_a_file_can_be_a_bom(tmp_path, mnist5k):
    """The same bytes where a later block starts are data: here inside an image, which they make invalid."""
    images, labels = mnist5k
    block = shards.reader.BLOCK_BYTES
    content = filled(images, labels, block - 1000)
    image = b64_raw(images[7])
    start = f"900077,{labels[7]},".encode()
    at = block - len(content) - len(start)  # the image's character at the block boundary
    content += start + image[:at].encode() + "\ufeff".encode() + image[at:].encode() + b",,,\n"
    content += tail_rows(images, labels, 10_000, 5)
    path = tmp_path / "s.csv"
    path.write_bytes(bytes(content))
    shard = data.read_shard(path)
    assert content[block : block + 3] == b"\xef\xbb\xbf"
    assert shard.rows_skipped == 1 and 900077 not in shard.image_ids and shard.image_ids[-1] == 10_004


@pytest.mark.parametrize("extra, kept", [(0, True), (1, False)], ids=["at-the-limit", "one-byte-over"])
def test_a_line_ending_where_a_block_ends_is_judged_by_its_whole_length(tmp_path, mnist5k, extra, kept):
    """A line of exactly MAX_LINE_BYTES whose newline starts the next block is a row; one byte longer is a bad
    row; either way every row after it is read."""
    images, labels = mnist5k
    block, limit = shards.reader.BLOCK_BYTES, shards.MAX_LINE_BYTES
    content = filled(images, labels, block - limit - extra)
    line = f"900055,{labels[5]},{b64_raw(images[5])},,,".encode()
    content += line + b"y" * (limit + extra - len(line)) + b"\n" + tail_rows(images, labels, 10_000, 30)
    assert content[block] == ord("\n")
    path = tmp_path / "s.csv"
    path.write_bytes(bytes(content))
    shard = data.read_shard(path)
    assert (900055 in shard.image_ids) is kept and shard.rows_skipped == (0 if kept else 1)
    assert shard.image_ids[-30:].tolist() == list(range(10_000, 10_030))
    if not kept:
        line_number = content[:block].count(b"\n") + 1
        assert [(b.line, b.reason) for b in shard.bad_rows] == [
            (line_number, f"line is longer than {limit} bytes, the limit for one row")]


def test_a_last_line_without_a_newline_is_a_whole_row(tmp_path, mnist5k):
    """Image as the last column: nothing may be added to the final, unterminated line."""
    images, labels = mnist5k
    path = tmp_path / "s.csv"
    path.write_bytes(b"image_id,label,image\n" + "\n".join(f"{i},{labels[i]},{b64_raw(images[i])}"
                                                            for i in range(3)).encode())
    for fast in (True, False):
        shard = data.read_shard(path, fast=fast)
        assert shard.image_ids.tolist() == [0, 1, 2] and shard.rows_skipped == 0
        np.testing.assert_array_equal(shard.images, images[:3])

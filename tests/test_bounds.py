"""Bounded cost: sizes are checked before anything is allocated, settings have upper bounds.

The bombs are real files (a few MB declaring gigabytes); each is opened in a fresh interpreter
whose peak RSS is measured, because "it raised" alone would also pass after allocating 4 GB.
"""

from __future__ import annotations

import base64
import gc
import io
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hostile import (
    HEADER,
    gzip_bomb,
    node,
    npz_bomb,
    peak_rss_mb,
    png_bytes,
    png_claiming,
    rows,
    scaleout_model,
    seed_params,
    write_lines,
)
from mnist_edge import data, model, shards
from mnist_edge.settings import SettingsError, parse_settings

BOMB_ELEMENTS = 1 << 28  # float32: 1 GiB declared, ~1 MB on disk
RSS_ALLOWANCE_MB = 60  # what refusing a bomb may cost; allocating it costs 1,000+


@dataclass
class Measured:
    cases: dict[str, tuple[float, str]]  # (peak RSS in MB, what the case printed)
    bomb: Path
    root: Path


def idx_header(dims: list[int]) -> bytes:
    return b"\x00\x00\x08" + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.fixture(scope="module")
def measured(tmp_path_factory, seed_path, mnist5k) -> Measured:
    """Every bomb of this module opened in one fresh interpreter: (peak RSS MB, what it printed)."""
    images, labels = mnist5k
    root = tmp_path_factory.mktemp("bombs")
    others = {f"{i}.npy": p for i, p in enumerate(seed_params(seed_path)) if i}
    bomb = npz_bomb(root / "bomb.npz", "0.npy", (BOMB_ELEMENTS,), others)  # 1 GiB declared, ~5 MB
    shard = data.write_shard(root / "s.csv", images[:5], labels[:5])
    idx_bombs = {}
    for name, dims in (("declares-2GiB", [2_739_200, 28, 28]), ("inflates-past", [1000, 28, 28])):
        (root / name).mkdir()
        idx_bombs[name] = gzip_bomb(root / name / "train-images-idx3-ubyte.gz", idx_header(dims), 64 << 20)
    big_png = base64.b64encode(png_bytes(np.zeros((6000, 6000), dtype=np.uint8))).decode()  # 36 MB of pixels
    pngs = write_lines(root / "png.csv", [HEADER] + [f"{i},3,{big_png},,," for i in range(3)])
    good = rows(images[:20], labels[:20])
    huge = "1,2," + "A" * (40 << 20) + ",,,"  # 40 MB on one line
    long_lines = write_lines(root / "long.csv", [HEADER, *good[:10], huge, *good[10:], huge[:200_000]])
    cli_run = """
        import contextlib, io
        from mnist_edge import cli
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = cli.main({args!r})
        print(status, err.getvalue().strip())
    """
    cases = {
        "incoming-model": f"""
            from scaleout import ScaleoutModel
            from scaleoututil.helpers.plugins.numpyhelper import Helper
            from mnist_edge import container, model
            class Verbatim(Helper):  # builds the ScaleoutModel around the file's exact bytes
                def save(self, weights, path=None, file_type="npz"):
                    with open({str(bomb)!r}, "rb") as source:
                        path.write(source.read())
                    return path
            incoming = ScaleoutModel.from_training_model([], Verbatim())
            try:
                container.params_from(incoming)
            except model.ModelFileError as error:
                print(error)
        """,
        "cli-predict": cli_run.format(args=["predict", "--model", str(bomb), str(shard), str(root / "r.csv")]),
        "cli-export": cli_run.format(args=["export", str(bomb), str(root / "m.pth")]),
        **{f"idx-{name}": f"""
            from pathlib import Path
            from mnist_edge.prepare import SourceError, read_idx
            try:
                read_idx(Path({str(path)!r}))
            except SourceError as error:
                print(error)
        """ for name, path in idx_bombs.items()},
        "png": f"""
            from mnist_edge import data
            shard = data.read_shard({str(pngs)!r})
            print(shard.rows_skipped, shard.bad_rows[0].reason)
        """,
        "long-lines": f"""
            from mnist_edge import data
            shard = data.read_shard({str(long_lines)!r})
            print(len(shard.labels), shard.rows_skipped, *[f"{{b.line}}:{{b.reason}}" for b in shard.bad_rows], sep="|")
        """,
    }
    return Measured(peak_rss_mb(cases), bomb, root)


def test_an_incoming_model_bomb_is_refused_from_its_header(measured):
    """The server's model as the client hands it over (a ScaleoutModel), read by the callbacks."""
    peak, out = measured.cases["incoming-model"]
    assert "array 0 (conv1.weight) expected shape (32, 1, 3, 3), got (268435456,)" in out
    assert peak < RSS_ALLOWANCE_MB, f"refusing the bomb cost {peak:.0f} MB"


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_model_file_bomb_is_refused_by_the_cli(measured, command):
    peak, out = measured.cases[f"cli-{command}"]
    assert out.startswith(f"2 error: {measured.bomb}: declares 1,079,589,672 bytes of contents, more than the")
    assert peak < RSS_ALLOWANCE_MB, f"refusing the bomb cost {peak:.0f} MB"
    assert not (measured.root / "r.csv").exists() and not (measured.root / "m.pth").exists()


@pytest.mark.parametrize("case,message", [
    ("declares-2GiB", "more than the limit of 268,435,456 bytes"),
    ("inflates-past", "header says [1000, 28, 28] (784,000 bytes) but the file holds more than that"),
])
def test_an_idx_gzip_bomb_is_refused_before_it_is_inflated(measured, case, message):
    peak, out = measured.cases[f"idx-{case}"]
    assert message in out
    assert peak < 20, f"refusing the IDX bomb cost {peak:.0f} MB"


def test_a_png_claiming_a_huge_size_is_one_bad_row_not_a_failed_task(node_dir, seed_path, mnist5k, tmp_path):
    images, labels = mnist5k
    bomb = base64.b64encode(png_claiming(20000, 20000)).decode()  # 400M pixels: Pillow's bomb error
    shard = node_dir / "train" / "shard-000.csv"
    write_lines(shard, [HEADER, f"1,3,{bomb},,,", *rows(images[:50], labels[:50], start=10)])
    edge_node = node(node_dir, workdir=tmp_path)
    _, meta = edge_node.run("train", scaleout_model(seed_params(seed_path)), {"batch_size": 32})
    assert meta["training_metadata"]["rows_skipped"] == 1 and meta["training_metadata"]["num_examples"] == 50
    assert str(data.read_shard(shard).bad_rows[0]) == f"{shard}:2: PNG is 20000x20000, expected 28x28"


def test_a_large_png_is_refused_from_its_header_without_decoding(measured):
    peak, out = measured.cases["png"]
    assert out == "3 PNG is 6000x6000, expected 28x28"
    assert peak < 20, f"three 6000x6000 PNGs cost {peak:.0f} MB to refuse"


def test_a_sixteen_bit_png_keeps_its_gray_levels(tmp_path, mnist5k):
    images, _ = mnist5k
    wide = base64.b64encode(png_bytes(images[0].astype(np.uint16) * 257)).decode()
    shard = data.read_shard(write_lines(tmp_path / "s.csv", [HEADER, f"1,3,{wide},,,"]))
    np.testing.assert_array_equal(shard.images[0], images[0])


def test_a_huge_line_is_a_bad_row_found_without_holding_it(measured):
    peak, out = measured.cases["long-lines"]
    limit = shards.MAX_LINE_BYTES
    assert out == (f"20|2|12:line is longer than {limit} bytes, the limit for one row"
                   f"|23:line is longer than {limit} bytes, the limit for one row")
    assert peak < 30, f"a 40 MB line cost {peak:.0f} MB"


@pytest.mark.parametrize("raw,key", [
    ({"batch_size": 10**9}, "batch_size"), ({"batch_size": 2**64}, "batch_size"), ({"epochs": 10**9}, "epochs"),
    ({"learning_rate": 10**400}, "learning_rate"), ({"learning_rate": 1e39}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"), ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"),
])
def test_settings_have_upper_bounds(raw, key):
    with pytest.raises(SettingsError, match=f"setting '{key}' must be .* got "):
        parse_settings(raw)


def test_settings_must_be_a_mapping():
    with pytest.raises(SettingsError, match="client_settings must be a mapping of setting names to values, got list"):
        parse_settings([("epochs", 1)])


def test_a_settings_message_stays_short_whatever_the_value():
    with pytest.raises(SettingsError) as error:
        parse_settings({"optimizer": "x" * 100_000})
    assert len(str(error.value)) < 200


def test_a_batch_bigger_than_the_data_is_capped_and_said(node_dir, seed_path, mnist5k, tmp_path):
    images, labels = mnist5k
    data.write_shard(node_dir / "train" / "shard-000.csv", images[::50], labels[::50])  # 100 images
    edge_node = node(node_dir, workdir=tmp_path)
    _, meta = edge_node.run("train", scaleout_model(seed_params(seed_path)), {"batch_size": 512})
    assert meta["training_metadata"]["batch_size"] == 100
    assert meta["training_metadata"]["batch_size_requested"] == 512


def test_the_dataset_cache_keeps_only_the_current_split(tmp_path, mnist5k):
    """A train dir that gains a shard per round: each round's shards stay decoded for the next round (a
    hit), while the previous round's dataset and a shard removed from the directory are freed, so a
    node serving many rounds holds one split's images, not every round's."""
    images, labels = mnist5k
    train = tmp_path / "train"
    previous = None
    for round_number in range(6):
        data.write_shard(train / f"shard-{round_number}.csv", images[:200], labels[:200])
        dataset = data.load_split(tmp_path, "train")
        assert len(dataset) == 200 * (round_number + 1)
        assert not any(data.cached_shard(p, True)[1] for p in train.iterdir())  # every shard a hit
        del dataset
        gc.collect()
        assert previous is None or previous() is None
        previous = weakref.ref(data.load_split(tmp_path, "train"))
    removed = weakref.ref(data.cached_shard(train / "shard-0.csv", True)[0])
    (train / "shard-0.csv").unlink()
    assert len(data.load_split(tmp_path, "train")) == 1000
    gc.collect()
    assert previous() is None and removed() is None
    assert not any(data.cached_shard(p, True)[1] for p in train.iterdir())


def test_in_memory_npz_reader_refuses_object_and_huge_members(seed_path):
    params = seed_params(seed_path)
    buffer = io.BytesIO()
    np.savez(buffer, **{str(i): p for i, p in enumerate(params)} | {"3": np.zeros((10**6,), np.float64)})
    buffer.seek(0)
    expected = r"x: array 3 \(conv2.bias\) expected shape \(64,\), got \(1000000,\)"
    with pytest.raises(model.ModelFileError, match=expected):
        model.read_npz(buffer, "x")

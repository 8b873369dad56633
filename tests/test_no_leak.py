"""No byte of an image leaves the node, not even in an error message.

A corpus of broken shards (headerless, swapped columns, images in every column, open quotes,
overlong lines, bombs...) is put under train/, test/ and predict/ of real nodes; every message
the callbacks produce that reaches the server (task errors, ``validation_error``, attributes,
returned metadata, logged metrics) is collected and scanned: no run of base64 longer than 40
characters, no 24-character piece of any image field, no 41-character piece of any data row.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from hostile import HEADER, b64_raw, node, png_claiming, rows, scaleout_model, seed_params, write_lines
from mnist_edge import data

BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{41,}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # data_fingerprint: a hash of the shards, not their content


def corpus(images: np.ndarray, labels: np.ndarray) -> dict[str, list[str | bytes]]:
    """Broken shards, each a list of lines; every one carries real images somewhere."""
    good = rows(images[:6], labels[:6])
    img = [b64_raw(images[i]) for i in range(6)]
    return {
        "headerless": good,
        "swapped-label-image": [HEADER] + [f"{i},{img[i]},{labels[i]},,," for i in range(6)],
        "image-as-id": [HEADER] + [f"{img[i]},{labels[i]},{img[i]},,," for i in range(6)],
        "image-everywhere": ["image_id,label,image"] + [",".join([img[i]] * 3) for i in range(6)],
        "image-header": [",".join(img[:3])] + good,
        "long-header-names": [f"image_id,label,image,{img[0]}"] + good,
        "open-quote": [HEADER, f'1,{labels[0]},{img[0]},"never closed,,', *good[1:]],
        "quoted-image-open": [HEADER, f'1,{labels[0]},"{img[0]},,,', *good[1:]],
        "overlong": [HEADER, f"1,{labels[0]},{img[0] * 80},,,", *good[1:]],
        "short-rows": [HEADER] + [f"{img[i]},{img[i]}" for i in range(6)],
        "missing-image-column": ["image_id,label,picture"] + good,
        "duplicate-label": ["image_id,label,image,label"] + [f"{r},{labels[0]}" for r in good],
        "non-utf8-image": [HEADER, f"1,{labels[0]},{img[0]}".encode() + b"\xe9,,,", *good[1:]],
        "png-bomb": [HEADER, f"1,{labels[0]},{base64.b64encode(png_claiming(20000, 20000)).decode()},,,"],
        "long-id": [HEADER] + [f"{img[i][:200]},{labels[i]},{img[i]},,," for i in range(6)],
        "label-text": [HEADER] + [f"{i},{img[i][:30]},{img[i]},,," for i in range(6)],
        "blank-header": ["", *good],
    }


@pytest.fixture(scope="module")
def seed(seed_path):
    return scaleout_model(seed_params(seed_path))


def collect(job, sent: list[str]) -> None:
    """Run one task; whatever would reach the server (its error or its result) goes to ``sent``."""
    try:
        result = job()
    except Exception as error:  # noqa: BLE001 (any failure's text is sent as the task error)
        sent.append(str(error))
        return
    if isinstance(result, tuple):  # train: (model, metadata)
        result = result[1]
    sent.append(json.dumps(result))


def test_no_message_to_the_server_quotes_an_image_or_a_data_row(tmp_path, mnist5k, seed):
    images, labels = mnist5k
    shards = corpus(images, labels)
    sent: list[str] = []
    for name, lines in shards.items():
        for variant in ("all-bad", "good-train"):
            root = tmp_path / name / variant
            write_lines(root / "predict" / "p.csv", lines)
            write_lines(root / "test" / "t.csv", lines)
            if variant == "all-bad":
                write_lines(root / "train" / "s.csv", lines)
            else:
                data.write_shard(root / "train" / "s.csv", images[100:160], labels[100:160])
            edge_node = node(root, workdir=tmp_path / "work")
            if variant == "all-bad":
                collect(lambda edge_node=edge_node: edge_node.run("train", seed, {"epochs": 1, "batch_size": 32}), sent)
            collect(lambda edge_node=edge_node: edge_node.run("validate", seed), sent)
            collect(lambda edge_node=edge_node: edge_node.run("predict", seed, {}), sent)
            task = {"data": "test/t.csv", "output": "out.csv"}
            collect(lambda edge_node=edge_node, task=task: edge_node.run("predict", seed, task), sent)
            sent += [json.dumps(a) for a in edge_node.runtime.attributes]
            sent += [json.dumps(m["metrics"]) for m in edge_node.runtime.metrics]
        data.clear_cache()
    assert any("validation_error" in s for s in sent) and len(sent) > 100  # the corpus did produce errors

    messages = [s.replace(str(tmp_path), "<tmp>") for s in sent]
    runs = [(m, run) for m in messages for run in BASE64_RUN.findall(m) if not SHA256_HEX.fullmatch(run)]
    assert not runs, f"base64 runs in messages: {runs[:3]}"
    image_pieces = {text[k : k + 24] for lines in shards.values() for line in lines
                    for text in (line if isinstance(line, str) else line.decode("latin-1")).split(",")
                    if len(text) >= 24 for k in range(len(text) - 23)}
    row_pieces = {text[k : k + 41] for lines in shards.values() for line in lines[1:]
                  for text in [line if isinstance(line, str) else line.decode("latin-1")]
                  for k in range(max(len(text) - 40, 0))}
    for message in messages:
        windows24 = {message[k : k + 24] for k in range(len(message) - 23)}
        windows41 = {message[k : k + 41] for k in range(len(message) - 40)}
        assert not windows24 & image_pieces, f"a piece of an image field reached the server: {message[:300]}"
        assert not windows41 & row_pieces, f"more than 40 characters of a data row reached the server: {message[:300]}"


def test_messages_still_name_file_line_and_column(tmp_path, mnist5k):
    """Saying less about the data must not mean saying less about where the problem is; the command
    line (``local_message``) still says what is wrong with a header."""
    images, labels = mnist5k
    shards = corpus(images, labels)
    not_a_shard = ":1: not a CSV shard: expected line 1 to be a header naming image_id, label, image (each once)"
    for name, expected, local in [
            ("headerless", not_a_shard, ":1: missing required column 'image_id' (line 1 looks like a data row"),
            ("open-quote", ":2: start_datetime: malformed CSV quoting", None),
            ("swapped-label-image", ":2: label of 1048 characters is not an integer 0-9", None),
            ("non-utf8-image", ":2: not UTF-8 text (at byte 1053 of the line)", None),
            ("duplicate-label", not_a_shard, ":1: column 'label' appears 2 times (columns 2, 4), expected once"),
            ("blank-header", not_a_shard, ":1: blank line, expected a header row")]:
        path = write_lines(tmp_path / f"{name}.csv", shards[name])
        try:
            shard = data.read_shard(path)
            text = " ".join(str(b) for b in shard.bad_rows)
        except data.DataError as error:
            text = str(error)
            assert local is None or f"{path}{local}" in error.local_message, (name, error.local_message)
        assert f"{path}{expected}" in text, (name, text)
    bad = data.read_shard(tmp_path / "open-quote.csv").bad_rows[0]
    assert (bad.line, bad.column) == (2, "start_datetime")


def test_the_corpus_leaks_on_a_naive_message(mnist5k):
    """The scan is able to see a leak: quoting a header or a field as the old messages did is caught."""
    images, labels = mnist5k
    lines = corpus(images, labels)["headerless"]
    old_style = f"missing required column 'image_id' (header has: {lines[0].replace(',', ', ')})"
    assert BASE64_RUN.search(old_style)


def test_base64_scan_ignores_the_node_paths(tmp_path):
    assert not BASE64_RUN.search(str(Path("<tmp>") / "image-everywhere" / "all-bad" / "train" / "s.csv"))


# -- files that are not shards, and what the server sent, never come back --------------------------------

SECRETS = ["patient Jane Doe", "born 1980-02-03", "password hunter2", "hunter2", "Jane"]
NOT_SHARDS: dict[str, bytes] = {
    "notes.txt": b"patient Jane Doe, born 1980-02-03, password hunter2\nsecond line hunter2\n",
    "notes.csv": b"patient Jane Doe,born 1980-02-03,password hunter2\n1,2,3\n",
    "quoted.csv": b'"patient Jane Doe","password hunter2\n',
    "binary.dat": b"Jane\xff\xfehunter2\x00\x01\n",
    "long-line.txt": b"password hunter2 " * 5000 + b"\n",
    "half-header.csv": b"image_id,label,patient Jane Doe password hunter2\n",
    "twice.csv": b"image_id,label,image,label,hunter2\n",
    "empty.csv": b"",
}


def sent_by(edge_node, errors: list[str]) -> list[str]:
    """Everything that reached (or would reach) the server from ``edge_node``: errors, attributes, metrics."""
    return errors + [json.dumps(a) for a in edge_node.runtime.attributes] + \
        [json.dumps(m["metrics"]) for m in edge_node.runtime.metrics]


def test_a_file_that_is_not_a_shard_is_named_but_never_quoted(tmp_path, mnist5k, seed):
    """``predict`` with ``data`` naming any file of the node (notes, a binary, an empty file), and
    train/validate whose splits hold such a file: the task fails naming the path, and no word of
    the file, not even its first line or a byte's value, reaches the server."""
    images, labels = mnist5k
    root = tmp_path / "node"
    data.write_shard(root / "train" / "s.csv", images[:60], labels[:60])
    for name, content in NOT_SHARDS.items():
        (root / name).write_bytes(content)
    (root / "notes-dir").mkdir()
    (root / "notes-dir" / "n.csv").write_bytes(NOT_SHARDS["notes.csv"])
    edge_node = node(root, workdir=tmp_path / "work")
    errors: list[str] = []
    for name in [*NOT_SHARDS, "notes-dir"]:
        collect(lambda name=name: edge_node.run("predict", seed, {"data": name}), errors)
        assert name in errors[-1], errors[-1]
    bad_split = tmp_path / "bad-split"
    (bad_split / "train").mkdir(parents=True)
    (bad_split / "test").mkdir()
    (bad_split / "train" / "s.csv").write_bytes(NOT_SHARDS["notes.csv"])
    (bad_split / "test" / "t.csv").write_bytes(NOT_SHARDS["binary.dat"])
    split_node = node(bad_split, workdir=tmp_path / "work2")
    collect(lambda: split_node.run("train", seed, {"epochs": 1}), errors)
    collect(lambda: split_node.run("validate", seed), errors)
    sent = sent_by(edge_node, []) + sent_by(split_node, errors)
    for message in sent:
        for secret in SECRETS:
            assert secret not in message, f"{secret!r} reached the server: {message[:300]}"
        assert "0xff" not in message and "0xfe" not in message and "patient" not in message, message[:300]
    assert len(errors) == len(NOT_SHARDS) + 3 and all("not a CSV shard" in e for e in errors[:3]), errors[:3]


def test_a_non_shard_header_is_still_explained_on_the_command_line(tmp_path):
    """The operator at the machine (``python -m mnist_edge predict``) is told what line 1 holds."""
    from mnist_edge import cli

    path = tmp_path / "notes.csv"
    path.write_bytes(NOT_SHARDS["notes.csv"])
    with pytest.raises(data.DataError) as error:
        data.read_shard(path)
    assert "password hunter2" not in str(error.value)
    assert "header has: patient Jane Doe, born 1980-02-03, password hunter2" in error.value.local_message
    assert cli.main(["predict", "--model", str(path), str(path), str(tmp_path / "r.csv")]) == 2  # (not a model)


LONG = "Q" * 80_000  # what a hostile server sends; no 41 characters of it may come back


def test_no_server_sent_value_comes_back_beyond_a_short_excerpt(tmp_path, mnist5k, seed):
    """An 80 KB ``output``/``data``/setting key/setting value and a 1 MB model id fail their task
    with a short message; the ledger, the metadata and the attributes never hold them."""
    from hostile import with_id
    from mnist_edge import runtime
    from mnist_edge.node import NodeConfig

    images, labels = mnist5k
    root = tmp_path / "node"
    data.write_shard(root / "train" / "s.csv", images[:60], labels[:60])
    data.write_shard(root / "predict" / "p.csv", images[:5], labels[:5])
    recorder = runtime.LocalRuntime()
    config = NodeConfig.for_data(root, epsilon=50.0)
    (tmp_path / "work").mkdir()
    client = runtime.local_client(config, recorder, workdir=tmp_path / "work")
    edge_node = type("N", (), {"runtime": recorder})()
    errors: list[str] = []

    def run(task, *args):
        collect(lambda: runtime.run_task(client, task, *args, model_id="m", round_id="r"), errors)

    long_id = with_id(seed, "M" * 1_000_000)
    for params in ({"output": LONG}, {"data": LONG}, {"output": "ok/" + LONG[:200]}, {LONG: 1}):
        run("predict", seed, params)
    for settings in ({LONG: 1}, {"optimizer": LONG}, {"epochs": LONG}, {"dp_noise_multiplier": LONG}):
        run("train", seed, settings)
    run("train", long_id, {"epochs": 1})
    run("validate", long_id)
    run("predict", long_id, {})
    assert len(errors) == 11 and all(len(e) < 600 for e in errors), [len(e) for e in errors]
    run("train", seed, {"epochs": 1})  # a good round: its metadata and ledger line are scanned too
    sent = sent_by(edge_node, errors)
    ledger_text = config.privacy.ledger.read_text()
    for text in [*sent, ledger_text]:
        assert "Q" * 41 not in text and "M" * 41 not in text, text[:300]

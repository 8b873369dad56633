"""Crafted files from the data platform: every tool gives one line and exit 2, never a crash.

A hostile data platform knows this code: it hands ``import``, ``aggregate``, ``train --init`` and
``predict --model`` a ``.pth`` whose pickle nests a dictionary key 300,000 levels deep (torch's
weights_only unpickler hashes it recursively in C: SIGSEGV), metas nested 200,000 deep or claiming
10**400 examples, model_sets whose members are links out of the set, and output paths that are
directories or links. The pickle cases run in a subprocess: a crash there is a failed test, not a
dead test run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import write_lines
from mnist_edge import data, meta, model
from mnist_edge.cli import main
from test_aggregate import write_model


def deep_key_pth(path: Path, depth: int) -> Path:
    """A torch.save zip whose ``data.pkl`` is ``{((...((),)...),): 1}``: a key nested ``depth`` deep."""
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buffer)
    pickle = b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x01s."
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            out.writestr(info, pickle if info.filename.endswith("data.pkl") else source.read(info))
    return path


def one_line_exit_2(result: subprocess.CompletedProcess) -> str:
    """The one line a refused file gets: exit status 2 (not a signal), no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "faulthandler", "-m", "mnist_edge", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def deep(tmp_path_factory, seed_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deep")
    models = root / "set"
    write_model(models / "good", 1.0, 100)
    write_model(models / "evil", 1.0, 100)
    deep_key_pth(models / "evil" / "mnist.pth", 300_000)
    shard = data.write_shard(root / "s.csv", np.zeros((4, 28, 28), np.uint8), np.arange(4))
    return {"300k": deep_key_pth(root / "deep.pth", 300_000), "60k": deep_key_pth(root / "deep60k.pth", 60_000),
            "set": models, "shard": shard, "root": root}


@pytest.mark.parametrize("case", ["import-300k", "import-60k", "aggregate", "train-init", "predict-model"])
def test_a_deeply_nested_pickle_is_refused_in_one_line(deep, case):
    root = deep["root"]
    args = {"import-300k": ["import", deep["300k"], root / "o.npz"],
            "import-60k": ["import", deep["60k"], root / "o.npz"],
            "aggregate": ["aggregate", deep["set"], root / "agg.pth"],
            "train-init": ["train", "--model", root / "t.pth", "--init", deep["300k"], deep["shard"]],
            "predict-model": ["predict", "--model", deep["300k"], deep["shard"], root / "r.csv"]}[case]
    line = one_line_exit_2(run_cli(*args))
    assert "data.pkl" in line and ("nests more than 100 levels" in line or "more than the 65,536" in line), line
    assert not any((root / name).exists() for name in ("o.npz", "agg.pth", "t.pth", "r.csv"))


def test_the_pickle_scan_passes_a_real_state_dict_and_finds_the_depth(tmp_path, deep):
    """The scan is not a blanket refusal: torch.save's own state_dict loads; 101 levels do not."""
    path = model.save_pth(model.get_parameters(model.new_model(0)), tmp_path / "ok.pth")
    assert len(model.load_pth(path)) == 8
    with pytest.raises(model.ModelFileError, match="nests more than 100 levels deep"):
        model.load_pth(deep_key_pth(tmp_path / "d101.pth", 101))
    with pytest.raises(model.ModelFileError, match="does not match the MNIST CNN"):
        model.load_pth(deep_key_pth(tmp_path / "d99.pth", 98))  # within bounds: torch's error, not the scan's


def refused_in_one_line(capsys, *args: object) -> str:
    assert main([str(a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def model_set(tmp_path) -> Path:
    write_model(tmp_path / "set" / "a", 1.0, 100)
    write_model(tmp_path / "set" / "b", 3.0, 100)
    return tmp_path / "set"


@pytest.mark.parametrize("value, shown", [
    (10**400, "1" + "0" * 59 + "..."), (2**64, "18446744073709551616"), (0, "0"), (1.5, "1.5"), ("5", '"5"'),
    (True, "true"),
], ids=["10**400", "2**64", "0", "1.5", "string", "true"])
def test_num_examples_is_an_integer_within_its_documented_limit(capsys, model_set, tmp_path, value, shown):
    """FedAvg weighs by it: 2**64 would outweigh every other member, 10**400 overflowed a float."""
    meta_file = model_set / "b" / "mnist.xdata-meta.json"
    meta_file.write_text(meta_file.read_text().replace('"num_examples": 100', f'"num_examples": {json.dumps(value)}'))
    line = refused_in_one_line(capsys, "aggregate", model_set, tmp_path / "out.pth")
    assert f"'num_examples' must be an integer from 1 to {meta.MAX_NUM_EXAMPLES:,} (got {shown})" in line
    assert not (tmp_path / "out.pth").exists()


def test_a_meta_nested_200000_deep_is_one_line(capsys, model_set, tmp_path):
    (model_set / "b" / "mnist.xdata-meta.json").write_text("[" * 200_000 + "]" * 200_000)
    line = refused_in_one_line(capsys, "aggregate", model_set, tmp_path / "out.pth")
    assert "mnist.xdata-meta.json" in line and ("nests too deeply" in line or "larger than" in line)


@pytest.mark.parametrize("link", ["member-to-outside-dir", "member-to-file", "meta", "model"])
def test_a_member_that_is_a_link_is_refused(capsys, model_set, tmp_path, link):
    """The set is what its directory holds: a link could bring in any model (or file) from anywhere."""
    outside = write_model(tmp_path / "elsewhere" / "x", 9.0, 10**6)
    if link == "member-to-outside-dir":
        (model_set / "c").symlink_to(outside)
    elif link == "member-to-file":
        (model_set / "c").symlink_to(outside / "mnist.pth")
    else:
        name = "mnist.xdata-meta.json" if link == "meta" else "mnist.pth"
        (model_set / "b" / name).unlink()
        (model_set / "b" / name).symlink_to(outside / name)
    line = refused_in_one_line(capsys, "aggregate", model_set, tmp_path / "out.pth")
    assert "symbolic link" in line and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("which", ["model", "meta"])
@pytest.mark.parametrize("kind", ["directory", "link"])
def test_an_output_that_is_a_directory_or_a_link_is_refused_before_any_work(capsys, model_set, tmp_path,
                                                                             which, kind):
    """Checked before averaging: nothing is written, the link's target is untouched, no partial file.
    (OUT itself may be a directory: the model is then ``mnist.pth`` inside it, the case here.)"""
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("mnist.pth" if which == "model" else "mnist.xdata-meta.json")
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    if kind == "directory":
        target.mkdir()
    else:
        target.symlink_to(victim)
    before = sorted(os.listdir(out))
    line = refused_in_one_line(capsys, "aggregate", model_set, out)
    assert str(target) in line and sorted(os.listdir(out)) == before and victim.read_text() == "keep\n"


def test_a_shard_named_by_a_model_flag_is_not_unpickled(capsys, tmp_path):
    """A data platform's CSV handed as a model: refused by content, in one line."""
    shard = write_lines(tmp_path / "s.csv", ["image_id,label,image"])
    assert "not a model file" in refused_in_one_line(capsys, "import", shard, tmp_path / "o.npz")

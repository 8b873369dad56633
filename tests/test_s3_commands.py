"""``train``, ``predict``, ``aggregate`` and ``lineage`` on ``s3://`` locations, as a pipeline step runs them:
worker processes configured by the environment only, against the real S3 server of tests/s3_server.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_node
from mnist_edge import data
from s3_server import DENIED_META, child_env

pytestmark = pytest.mark.slow


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnist_edge", *args], env=child_env({**env, "OMP_NUM_THREADS": "2"}),
                          capture_output=True, text=True, timeout=600)


def version_of(stdout: str, url: str) -> str:
    """The version id ``uploaded URL (version V)`` names."""
    line = next(line for line in stdout.splitlines() if line.startswith(f"uploaded {url} (version "))
    return line.rsplit("(version ", 1)[1].rstrip(")")


@pytest.fixture
def node(tmp_path, mnist5k) -> Path:
    images, labels = mnist5k
    return make_node(tmp_path / "node", images, labels, 300, 100)


def test_two_versions_of_a_shard_give_two_models_whose_lineage_names_each(s3_server, node, tmp_path):
    """The same key trained on twice, changed in between: each model's meta names the exact version it read."""
    bucket, client = s3_server.bucket(), s3_server.client()
    shard = (node / "train" / "shard-000.csv").read_bytes()
    first = client.put_object(Bucket=bucket, Key="train/part-0.csv", Body=shard)["VersionId"]
    done = cli(s3_server.environ(), "train", "--epochs", "1", "--seed", "1", "--model", f"s3://{bucket}/models/m.pth",
               f"s3://{bucket}/train/")
    assert done.returncode == 0, done.stderr[-2000:]
    model_v1 = version_of(done.stdout, f"s3://{bucket}/models/m.pth")
    lines = shard.decode().splitlines(keepends=True)
    second = client.put_object(Bucket=bucket, Key="train/part-0.csv", Body="".join(lines[:-50]).encode())["VersionId"]
    done = cli(s3_server.environ(), "train", "--epochs", "1", "--seed", "1", "--model", f"s3://{bucket}/models/m.pth",
               f"s3://{bucket}/train/")
    assert done.returncode == 0, done.stderr[-2000:]
    model_v2 = version_of(done.stdout, f"s3://{bucket}/models/m.pth")
    assert model_v1 != model_v2 and first != second

    found = [json.loads(cli(s3_server.environ(), "lineage", "--json", f"s3://{bucket}/models/m.pth?versionId={v}").stdout)
             for v in (model_v1, model_v2)]
    inputs = [f["document"]["lineage"]["inputs"] for f in found]
    assert [[(i["key"], i["version_id"]) for i in one] for one in inputs] == [[("train/part-0.csv", first)],
                                                                             [("train/part-0.csv", second)]]
    assert [f["document"]["num_examples"] for f in found] == [300, 250]
    assert all(f["meta_names_this_model"] for f in found)
    text = cli(s3_server.environ(), "lineage", f"s3://{bucket}/models/m.pth").stdout
    assert second in text and s3_server.secret_access_key not in text and s3_server.access_key_id not in text


def test_predict_and_aggregate_read_and_write_the_bucket(s3_server, node, tmp_path):
    bucket, client = s3_server.bucket(), s3_server.client()
    client.put_object(Bucket=bucket, Key="train/s.csv", Body=(node / "train" / "shard-000.csv").read_bytes())
    client.put_object(Bucket=bucket, Key="predict/p.csv", Body=(node / "test" / "shard-000.csv").read_bytes())
    for member in ("run-a", "run-b"):
        done = cli(s3_server.environ(), "train", "--model", f"s3://{bucket}/set/{member}/mnist.pth", f"s3://{bucket}/train/")
        assert done.returncode == 0, done.stderr[-2000:]
    done = cli(s3_server.environ(), "aggregate", f"s3://{bucket}/set/", f"s3://{bucket}/global/")
    assert done.returncode == 0 and f"uploaded s3://{bucket}/global/mnist.pth (version " in done.stdout, done.stderr
    done = cli(s3_server.environ(), "predict", "--model", f"s3://{bucket}/global/mnist.pth", f"s3://{bucket}/predict/",
               f"s3://{bucket}/results/")
    assert done.returncode == 0 and "accuracy" in done.stdout, done.stderr[-2000:]
    rows = client.get_object(Bucket=bucket, Key="results/result.csv")["Body"].read().decode().splitlines()
    assert rows[0] == "image_id,label,confidence" and len(rows) == 101
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in data.load_dataset(node / "test").image_ids]


@pytest.mark.parametrize("case", ["missing bucket", "wrong secret", "unreachable endpoint", "meta refused"])
def test_a_store_that_refuses_fails_naming_the_url_and_leaves_nothing_partial(s3_server, node, case):
    bucket, client = s3_server.bucket(), s3_server.client()
    client.put_object(Bucket=bucket, Key="train/s.csv", Body=(node / "train" / "shard-000.csv").read_bytes())
    env, dataset, out = s3_server.environ(), f"s3://{bucket}/train/", f"s3://{bucket}/models/m.pth"
    if case == "missing bucket":
        dataset = "s3://master.no-such-bucket/train/"
    elif case == "wrong secret":
        env = s3_server.environ(AWS_SECRET_ACCESS_KEY="not-the-secret")
    elif case == "unreachable endpoint":
        env = s3_server.environ(S3_ENDPOINT="http://127.0.0.1:9")  # discard: nothing listens
    else:
        out = f"s3://{bucket}/{DENIED_META}m.pth"
    done = cli(env, "train", "--epochs", "1", "--model", out, dataset)
    error = done.stderr.strip().splitlines()[-1]  # after the progress lines, when the training ran
    assert done.returncode == 2 and error.startswith("error: s3://"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert s3_server.secret_access_key not in done.stderr and "not-the-secret" not in done.stderr
    listed = client.list_object_versions(Bucket=bucket)
    keys = {v["Key"] for v in listed.get("Versions", [])} | {m["Key"] for m in listed.get("DeleteMarkers", [])}
    assert keys == {"train/s.csv"}, keys

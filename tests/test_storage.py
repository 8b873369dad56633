"""Datasets and models in an object store: a real S3 server (moto, tests/s3_server.py) on 127.0.0.1
with versioning and enforced credentials, from this process and from ``python -m mnist_edge``
workers. Buckets are named as Pachyderm's S3 gateway names them (``master.<repo>``)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config

from conftest import REPO
from mnist_edge import aggregate, data, lineage, model, storage, transfer
from mnist_edge.meta import meta_path
from mnist_edge.storage import S3Config, S3Location, StorageError
from s3_server import DENIED_META, GUARD, REGION, child_env

_guard = importlib.util.spec_from_file_location("loopback_guard", GUARD / "sitecustomize.py")
loopback_guard = importlib.util.module_from_spec(_guard)
_guard.loader.exec_module(loopback_guard)
GUARDING = [False]
loopback_guard.install(active=lambda: GUARDING[0])


@pytest.fixture(autouse=True)
def _loopback_only():
    """This process too may reach loopback addresses only while these tests run."""
    GUARDING[0] = True
    yield
    GUARDING[0] = False


def config_for(server, **limits) -> S3Config:
    return dataclasses.replace(S3Config.from_environ(server.environ()), **limits)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def shards(tmp_path, mnist5k) -> list[Path]:
    """Three real shards of 40 images each."""
    images, labels = mnist5k
    return [data.write_shard(tmp_path / "local" / f"part-{i}.csv", images[i * 40:(i + 1) * 40],
                             labels[i * 40:(i + 1) * 40], np.arange(i * 40, (i + 1) * 40)) for i in range(3)]


def put(server, bucket: str, key: str, body: bytes) -> str:
    """Put an object with a plain boto3 client; the version id the server gave it."""
    return server.client().put_object(Bucket=bucket, Key=key, Body=body)["VersionId"]


def cli(server, *args: str, **environ: str) -> subprocess.CompletedProcess:
    """``python -m mnist_edge ARGS`` as a worker process, configured by the environment only."""
    env = child_env({**server.environ(), **environ} if server else environ)
    return subprocess.run([sys.executable, "-m", "mnist_edge", *args], env=env, capture_output=True,
                          text=True, timeout=120)


# -- configuration and URLs -------------------------------------------------------------------------


def test_the_environment_names_the_store_and_the_credentials_stay_out_of_sight():
    config = S3Config.from_environ({"S3_ENDPOINT": "minio.kubeflow:9000", "S3_USE_HTTPS": "0",
                                    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY000001", "AWS_SECRET_ACCESS_KEY": "s3cr3t/x",
                                    "AWS_DEFAULT_REGION": "eu-north-1"})
    assert (config.endpoint_url, config.region) == ("http://minio.kubeflow:9000", "eu-north-1")
    assert "s3cr3t" not in repr(config) and "AKIAEXAMPLE" not in repr(config)
    assert S3Config.from_environ({"S3_ENDPOINT": "store:9000"}).endpoint_url == "https://store:9000"
    assert S3Config.from_environ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}).endpoint_url == "http://127.0.0.1:9"
    assert S3Config(endpoint_url="https://user:pw@store.example:9000/x").store == "https://store.example:9000"
    assert S3Config.from_environ({"MNIST_EDGE_S3_MAX_OBJECTS": "7"}).max_objects == 7
    with pytest.raises(StorageError, match="MNIST_EDGE_S3_MAX_BYTES='lots'"):
        S3Config.from_environ({"MNIST_EDGE_S3_MAX_BYTES": "lots"})


def test_urls_name_a_bucket_a_key_and_optionally_a_version():
    assert storage.parse_s3_url("s3://master.mnist-shards/train/") == S3Location("master.mnist-shards", "train/")
    assert storage.parse_s3_url("s3://b/m.pth?versionId=v1") == S3Location("b", "m.pth", "v1")
    assert storage.output_location("s3://b/models/", "mnist.pth").key == "models/mnist.pth"
    assert storage.output_location("s3://b", "mnist.pth").key == "mnist.pth"
    assert storage.meta_location(S3Location("b", "runs/mnist.pth")).key == "runs/mnist.xdata-meta.json"
    for bad, said in [("/data/train", "expected an s3://"), ("s3://bad bucket/x", "not a bucket name"),
                      ("s3://b/x\x00y", "not an S3 key")]:
        with pytest.raises(StorageError, match=said):
            storage.parse_s3_url(bad)
    with pytest.raises(StorageError, match="cannot name a version"):
        storage.output_location("s3://b/m.pth?versionId=v1", "mnist.pth")


# -- round trips -----------------------------------------------------------------------------------


def test_a_dataset_prefix_round_trips_with_every_objects_identity(s3_server, shards, tmp_path):
    bucket, config = s3_server.bucket(), config_for(s3_server)
    versions = {p.name: put(s3_server, bucket, f"train/{p.name}", p.read_bytes()) for p in shards}
    put(s3_server, bucket, "train/README.txt", b"not a shard")  # not *.csv: left alone
    put(s3_server, bucket, "train/old/part-9.csv", shards[0].read_bytes())  # a subfolder, as locally

    staged = transfer.download_dataset(f"s3://{bucket}/train", tmp_path / "staging", config)

    assert [s.path.name for s in staged] == [p.name for p in shards]
    for item, local in zip(staged, shards):
        assert item.path.read_bytes() == local.read_bytes()
        source = item.source
        assert (source.bucket, source.key, source.size) == (bucket, f"train/{local.name}", local.stat().st_size)
        assert source.version_id == versions[local.name] and source.sha256 == sha256(local.read_bytes())
        assert source.etag == hashlib.md5(local.read_bytes()).hexdigest()  # a single-part upload's ETag
    assert data.load_dataset(tmp_path / "staging").fingerprint == data.load_dataset(shards[0].parent).fingerprint
    one = transfer.download_dataset(f"s3://{bucket}/train/part-1.csv", tmp_path / "one", config)
    assert [s.path for s in one] == [tmp_path / "one" / "part-1.csv"]


def test_a_model_and_its_meta_round_trip_with_the_lineage_inside_the_meta(s3_server, shards, tmp_path):
    bucket, config = s3_server.bucket(), config_for(s3_server)
    put(s3_server, bucket, "shards/part-0.csv", shards[0].read_bytes())
    inputs = transfer.download_dataset(f"s3://{bucket}/shards/", tmp_path / "in", config)
    record = lineage.lineage_record(inputs=[s.source for s in inputs], data_fingerprint="f" * 64,
                                    code=lineage.code_version(), store=config.store)
    model_file = model.save_pth(model.get_parameters(model.new_model(0)), tmp_path / "mnist.pth")

    uploaded = transfer.upload_model(model_file, {"model_kind": "mnist", "lineage": record},
                                     storage.output_location(f"s3://{bucket}/runs/", "mnist.pth"), config)

    versions = s3_server.client().list_object_versions(Bucket=bucket, Prefix="runs/")["Versions"]
    assert {(v["Key"], v["VersionId"]) for v in versions} == {
        ("runs/mnist.pth", uploaded.model.version_id), ("runs/mnist.xdata-meta.json", uploaded.meta.version_id)}
    assert uploaded.model.sha256 == sha256(model_file.read_bytes())
    staged_model, staged_meta = transfer.download_model(f"s3://{bucket}/runs/mnist.pth", tmp_path / "out", config)
    assert staged_model.path.read_bytes() == model_file.read_bytes()
    assert staged_meta.source.version_id == uploaded.meta.version_id
    assert sha256(staged_meta.path.read_bytes()) == staged_meta.source.sha256 == uploaded.meta.sha256
    meta = json.loads(staged_meta.path.read_text())
    assert meta["lineage"]["inputs"][0]["version_id"] == inputs[0].source.version_id
    assert meta["lineage"]["output"]["version_id"] == uploaded.model.version_id
    assert meta["lineage"]["code"]["version"] == "0.1.0" and meta["lineage"]["runtime"]["torch"]
    assert s3_server.secret_access_key not in json.dumps(meta) and s3_server.access_key_id not in json.dumps(meta)
    assert uploaded.model.describe() == f"s3://{bucket}/runs/mnist.pth (version {uploaded.model.version_id})"


def test_two_versions_of_one_key_give_two_lineages_the_lineage_command_tells_apart(s3_server, shards, tmp_path):
    """Train twice on s3://.../part-0.csv as it changes: each model's lineage names the version it read."""
    bucket, config = s3_server.bucket(), config_for(s3_server)
    target = S3Location(bucket, "models/mnist.pth")
    models, shard_versions = [], []
    for run, shard in enumerate(shards[:2]):
        shard_versions.append(put(s3_server, bucket, "data/part-0.csv", shard.read_bytes()))
        staged = transfer.download_dataset(f"s3://{bucket}/data/", tmp_path / f"run{run}", config)
        record = lineage.lineage_record(inputs=[s.source for s in staged],
                                        data_fingerprint=data.load_dataset(tmp_path / f"run{run}").fingerprint,
                                        code=lineage.code_version(), store=config.store)
        params = model.get_parameters(model.new_model(run))
        models.append(transfer.upload_model(model.save_pth(params, tmp_path / f"m{run}.pth"),
                                            {"model_kind": "mnist", "lineage": record}, target, config))
    assert shard_versions[0] != shard_versions[1]

    for uploaded, version in zip(models, shard_versions):
        url = f"s3://{bucket}/models/mnist.pth?versionId={uploaded.model.version_id}"
        done = cli(s3_server, "lineage", url, "--json")
        assert done.returncode == 0, done.stderr
        shown = json.loads(done.stdout)
        assert shown["document"]["lineage"]["inputs"][0]["version_id"] == version
        assert shown["document"]["lineage"]["output"]["version_id"] == uploaded.model.version_id
        assert shown["meta_names_this_model"] is True
    first = f"s3://{bucket}/models/mnist.pth?versionId={models[0].model.version_id}"
    _, meta = transfer.download_model(first, tmp_path / "first", config)  # e.g. `train --init` from it
    assert json.loads(meta.path.read_text())["lineage"]["inputs"][0]["version_id"] == shard_versions[0]
    latest = cli(s3_server, "lineage", f"s3://{bucket}/models/mnist.pth")
    assert latest.returncode == 0, latest.stderr
    assert f"version {shard_versions[1]}" in latest.stdout and shard_versions[0] not in latest.stdout
    assert "the meta names this model" in latest.stdout and f"version {models[1].model.version_id}" in latest.stdout


def test_a_model_set_is_staged_as_member_directories_aggregate_reads(s3_server, tmp_path):
    bucket, config = s3_server.bucket(), config_for(s3_server)
    for member, n in (("a", 30), ("b", 10)):
        params = model.get_parameters(model.new_model(n))
        put(s3_server, bucket, f"set/{member}/mnist.pth",
            model.save_pth(params, tmp_path / f"{member}.pth").read_bytes())
        put(s3_server, bucket, f"set/{member}/mnist.xdata-meta.json",
            json.dumps({"model_kind": "mnist", "num_examples": n}).encode())
    staged = transfer.download_model_set(f"s3://{bucket}/set", tmp_path / "set", config)
    assert sorted(str(s.path.relative_to(tmp_path / "set")) for s in staged) == [
        "a/mnist.pth", "a/mnist.xdata-meta.json", "b/mnist.pth", "b/mnist.xdata-meta.json"]
    _, meta = aggregate.aggregate(tmp_path / "set", tmp_path / "avg.pth")
    assert meta["num_examples"] == 40
    put(s3_server, bucket, "set/../escape.csv", b"x")
    with pytest.raises(StorageError, match=r"set/\.\./escape\.csv: key cannot be staged"):
        transfer.download_model_set(f"s3://{bucket}/set", tmp_path / "set2", config)
    assert not (tmp_path / "escape.csv").exists()


# -- failures ----------------------------------------------------------------------------------------


def test_nothing_partial_is_left_when_the_meta_upload_fails(s3_server, tmp_path):
    """The server's policy refuses the meta: the model version just written is deleted again."""
    bucket, config = s3_server.bucket(), config_for(s3_server)
    earlier = put(s3_server, bucket, f"{DENIED_META}mnist.pth", b"the model before")
    model_file = model.save_pth(model.get_parameters(model.new_model(0)), tmp_path / "mnist.pth")

    with pytest.raises(StorageError) as caught:
        transfer.upload_model(model_file, {"model_kind": "mnist"}, S3Location(bucket, f"{DENIED_META}mnist.pth"),
                              config)

    message = str(caught.value)
    assert message.startswith(f"s3://{bucket}/{DENIED_META}mnist.xdata-meta.json: access denied")
    assert "removed the model version" in message and "\n" not in message
    listing = s3_server.client().list_object_versions(Bucket=bucket)
    assert [(v["Key"], v["VersionId"]) for v in listing.get("Versions", [])] == [(f"{DENIED_META}mnist.pth", earlier)]
    assert not listing.get("DeleteMarkers")
    current = s3_server.client().get_object(Bucket=bucket, Key=f"{DENIED_META}mnist.pth")["Body"].read()
    assert current == b"the model before"


def test_nothing_partial_is_left_in_an_unversioned_bucket_either(s3_server, tmp_path):
    bucket, config = s3_server.bucket(versioned=False), config_for(s3_server)
    model_file = model.save_pth(model.get_parameters(model.new_model(0)), tmp_path / "mnist.pth")
    with pytest.raises(StorageError, match="nothing was left"):
        transfer.upload_model(model_file, {}, S3Location(bucket, f"{DENIED_META}mnist.pth"), config)
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_downloads_over_the_bounds_are_refused_before_reading_anything(s3_server, shards, tmp_path):
    bucket = s3_server.bucket()
    for p in shards:
        put(s3_server, bucket, f"train/{p.name}", p.read_bytes())
    total = sum(p.stat().st_size for p in shards)
    for limits, said in [({"max_objects": 2}, "more than 2 objects"),
                         ({"max_bytes": total - 1}, f"{total:,} bytes to download exceed the limit")]:
        with pytest.raises(StorageError, match=said):
            transfer.download_dataset(f"s3://{bucket}/train/", tmp_path / "staging", config_for(s3_server, **limits))
        assert not (tmp_path / "staging").exists()
    with pytest.raises(StorageError, match="no \\*.csv objects under this prefix"):
        transfer.download_dataset(f"s3://{bucket}/nothing-here/", tmp_path / "staging", config_for(s3_server))


def test_an_object_replaced_between_listing_and_reading_is_refused(s3_server, shards, tmp_path):
    """A listing and the bytes read must be one state of the store, or the lineage would lie."""
    bucket, config = s3_server.bucket(), config_for(s3_server)
    put(s3_server, bucket, "train/part-0.csv", shards[0].read_bytes())
    listed = transfer.list_objects(f"s3://{bucket}/train/", config, depth=1, suffixes=(".csv",))
    put(s3_server, bucket, "train/part-0.csv", shards[1].read_bytes())
    with pytest.raises(StorageError, match=rf"s3://{bucket}/train/part-0.csv: changed while being read"):
        transfer.download(listed, tmp_path, config, "train/")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("case", ["missing bucket", "missing key", "unknown key", "wrong secret", "half the key",
                                  "unreachable"])
def test_a_worker_fails_with_one_line_naming_the_url_and_no_credential(s3_server, case):
    bucket = s3_server.bucket()
    put(s3_server, bucket, "models/mnist.pth", b"x")
    url = f"s3://{bucket}/models/mnist.pth"
    secret = "wrong-secret-4f1d9c"
    environ, expected = {
        "missing bucket": ({}, f"s3://master.missing-{bucket[-6:]}/models/mnist.pth: no such bucket"),
        "missing key": ({}, f"s3://{bucket}/models/gone.pth: no such object"),
        "unknown key": ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"}, f"{url}: access denied (HTTP 403"),
        "wrong secret": ({"AWS_SECRET_ACCESS_KEY": secret}, f"{url}: access denied (HTTP 403"),
        "half the key": ({"AWS_SECRET_ACCESS_KEY": ""},
                         f"{url}: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
        "unreachable": ({"S3_ENDPOINT": f"http://127.0.0.1:{closed_port()}"},
                        f"{url}: cannot reach the object store at http://127.0.0.1:"),
    }[case]
    target = expected.split(": ")[0]
    started = time.monotonic()
    done = cli(s3_server, "lineage", target, **environ)
    elapsed = time.monotonic() - started
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {expected}") and done.stderr.count("\n") == 1, done.stderr
    for credential in (secret, s3_server.secret_access_key, s3_server.access_key_id, "AKIAUNKNOWN"):
        assert credential not in done.stderr
    assert "Traceback" not in done.stderr and "botocore" not in done.stderr
    print(f"{case}: failed in {elapsed:.1f} s")


def test_wrong_credentials_on_a_listing_say_which_one_is_wrong(s3_server, tmp_path):
    """A GET or a listing carries the store's reason (a HEAD cannot): key id or secret."""
    bucket = s3_server.bucket()
    put(s3_server, bucket, "train/part-0.csv", b"image_id,label,image\n")
    for override, said in [({"AWS_SECRET_ACCESS_KEY": "nope"}, "the secret key does not match"),
                           ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"}, "the store does not know this access key")]:
        config = S3Config.from_environ(s3_server.environ(**override))
        with pytest.raises(StorageError) as caught:
            transfer.download_dataset(f"s3://{bucket}/train/", tmp_path, config)
        assert str(caught.value).startswith(f"s3://{bucket}/train/: {said}")
        assert "nope" not in str(caught.value) and "AKIA" not in str(caught.value)


def test_uploads_carry_no_checksum_a_non_aws_gateway_could_refuse(s3_server, tmp_path):
    """boto3 >= 1.36 adds CRC checksums (and aws-chunked bodies) to every upload by default."""
    bucket, config = s3_server.bucket(), config_for(s3_server)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x00" * 4096)
    default = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name=REGION,
                           aws_access_key_id=s3_server.access_key_id,
                           aws_secret_access_key=s3_server.secret_access_key,
                           config=Config(s3={"addressing_style": "path"}))
    sent: dict[str, list[dict[str, str]]] = {"default": [], "ours": []}
    for name, client in (("default", default), ("ours", storage.s3_client(config))):
        def capture(request, name=name, **_):
            sent[name].append({k.lower(): v for k, v in request.headers.items()})
        client.meta.events.register("before-send.s3.PutObject", capture)
        client.meta.events.register("before-send.s3.GetObject", capture)
        try:
            with open(path, "rb") as handle:
                client.put_object(Bucket=bucket, Key=f"{name}.bin", Body=handle)
            client.get_object(Bucket=bucket, Key=f"{name}.bin")["Body"].read()
            if name == "ours":  # and what the module itself sends
                transfer.upload_file(path, S3Location(bucket, "model.bin"), config, "application/octet-stream")
        finally:
            client.meta.events.unregister("before-send.s3.PutObject", capture)
            client.meta.events.unregister("before-send.s3.GetObject", capture)

    def checksummed(headers: dict[str, str]) -> bool:
        return any(k.startswith(("x-amz-checksum", "x-amz-sdk-checksum", "x-amz-trailer")) for k in headers) \
            or "aws-chunked" in headers.get("content-encoding", "")

    assert any(checksummed(h) for h in sent["default"]), "boto3's default no longer adds checksums"
    assert len(sent["ours"]) == 3 and not any(checksummed(h) for h in sent["ours"]), sent["ours"]


# -- code version and the lineage command on local files ------------------------------------------------


def test_the_code_version_is_the_checkouts_commit_or_the_one_the_image_recorded(tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(lineage.PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    code = lineage.code_version.__wrapped__()
    assert code.version == "0.1.0"
    if head.returncode == 0:  # the package runs from this checkout
        assert (code.git_commit, code.commit_from) == (head.stdout.strip(), "git checkout")
        assert isinstance(code.git_dirty, bool)
    built = tmp_path / "GIT_COMMIT"
    built.write_text("0123456789abcdef0123456789abcdef01234567\n")
    monkeypatch.setattr(lineage, "GIT_COMMIT_FILE", built)
    assert lineage.code_version.__wrapped__().git_commit == "0123456789abcdef0123456789abcdef01234567"
    assert lineage.code_version.__wrapped__().commit_from == "image build"


def test_lineage_of_a_local_model_checks_the_file_against_its_meta(tmp_path, shards):
    model_file = model.save_pth(model.get_parameters(model.new_model(0)), tmp_path / "mnist.pth")
    record = lineage.lineage_record(inputs=[lineage.LocalFile.of(p) for p in shards], data_fingerprint="abc",
                                    code=lineage.code_version())
    record["output"] = lineage.LocalFile.of(model_file).as_dict()
    meta = {"model_kind": "mnist", "model_state": "trained\x1b[2J", "round": 1, "num_examples": 120,
            "created_at": "2026-12-04T12:00:00+00:00", "lineage": record}  # a meta is untrusted text
    meta_path(model_file).write_text(json.dumps(meta))

    done = cli(None, "lineage", str(model_file))
    assert done.returncode == 0, done.stderr
    assert "the meta names this model" in done.stdout and str(shards[0].resolve()) in done.stdout
    assert f"python {sys.version.split()[0]}" in done.stdout
    assert "\x1b" not in done.stdout and "trained\\x1b[2J" in done.stdout

    changed = model_file.read_bytes()
    model_file.write_bytes(changed[:-1] + bytes([changed[-1] ^ 1]))
    done = cli(None, "lineage", str(model_file))
    assert done.returncode == 1 and "MISMATCH" in done.stdout
    assert json.loads(cli(None, "lineage", str(model_file), "--json").stdout)["meta_names_this_model"] is False


def test_the_image_build_commit_file_is_installed_where_the_package_reads_it(tmp_path):
    """What the root Dockerfile does: write client/mnist_edge/GIT_COMMIT, then pip install the project."""
    project = tmp_path / "project"
    (project / "client").mkdir(parents=True)
    for name in ("pyproject.toml", "README.rst"):
        (project / name).write_bytes((REPO / name).read_bytes())
    import shutil

    shutil.copytree(REPO / "client" / "mnist_edge", project / "client" / "mnist_edge",
                    ignore=shutil.ignore_patterns("__pycache__", "GIT_COMMIT"))
    (project / "client" / "mnist_edge" / "GIT_COMMIT").write_text("feedc0de" * 5 + "\n")
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(project)],
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert done.returncode == 0, done.stderr
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from mnist_edge import lineage; "
             "c = lineage.code_version(); print(c.git_commit, c.commit_from, lineage.PACKAGE_DIR)")
    shown = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True,
                           timeout=120, env=child_env(), cwd=tmp_path).stdout.split()
    assert shown[:3] == ["feedc0de" * 5, "image", "build"] and shown[3].startswith(str(target))

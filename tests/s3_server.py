"""A real S3 server for the tests: moto in server mode on 127.0.0.1, in a process of its own.

Run as a script, it binds a free loopback port, prints ``{"port": N}`` and serves until its
standard input closes. :meth:`S3Server.start` launches it, creates an IAM user with an access
key, then switches moto's authentication on (``/moto-api/reset-auth``): from then on the
server checks every request's signature against that key and the user's policy, so a wrong
access key or secret fails as it would on a real store. The policy denies writing a meta under
any ``deny-meta/`` folder, which is how a test makes the second upload of a model fail.

Every process started here (the server, a worker) gets :data:`GUARD` on its ``PYTHONPATH``: its
``sitecustomize`` refuses any connection or name lookup that is not loopback (it also disables
the EC2 metadata probe), so a test cannot pass by talking to something outside this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import boto3
import requests
from botocore.config import Config

GUARD = Path(__file__).with_name("loopback_guard")
REGION = "us-east-1"
DENIED_META = "deny-meta/"
POLICY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
    {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::*/{DENIED_META}*.xdata-meta.json"},
]}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any AWS, S3 or proxy setting, plus the loopback guard."""
    keep = {k: v for k, v in os.environ.items()
            if not k.upper().startswith(("AWS_", "S3_", "MNIST_EDGE_S3_")) and "PROXY" not in k.upper()}
    path = os.pathsep.join(p for p in (str(GUARD), keep.get("PYTHONPATH", "")) if p)
    return {**keep, "PYTHONPATH": path, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, **(extra or {})}


@dataclass
class S3Server:
    process: subprocess.Popen
    log: IO[bytes]
    endpoint: str
    access_key_id: str
    secret_access_key: str = field(repr=False)

    @classmethod
    def start(cls, log_dir: Path) -> S3Server:
        log = open(log_dir / "moto.log", "wb")  # noqa: SIM115 (the server's, closed by stop())
        process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=log, env=child_env())
        line = process.stdout.readline()
        if not line:
            process.wait(timeout=30)
            raise RuntimeError(f"the moto server did not start: {(log_dir / 'moto.log').read_text()[-2000:]}")
        endpoint = f"http://127.0.0.1:{json.loads(line)['port']}"
        root = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # before auth is on
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, **root)
        iam.create_user(UserName="mnist-edge")
        key = iam.create_access_key(UserName="mnist-edge")["AccessKey"]
        iam.put_user_policy(UserName="mnist-edge", PolicyName="s3", PolicyDocument=json.dumps(POLICY))
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        return cls(process, log, endpoint, key["AccessKeyId"], key["SecretAccessKey"])

    def stop(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def environ(self, **overrides: str) -> dict[str, str]:
        """What a user exports to reach this store (``S3_ENDPOINT`` and the standard AWS variables)."""
        return {"S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key, "AWS_REGION": REGION, **overrides}

    def client(self) -> Any:
        """A plain boto3 client with the good key, for arranging buckets and objects."""
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
                            config=Config(s3={"addressing_style": "path"}))

    def bucket(self, versioned: bool = True) -> str:
        """A new bucket named as Pachyderm's gateway names them (``<branch>.<repo>``: a dot)."""
        name = f"master.mnist-{uuid.uuid4().hex[:12]}"
        client = self.client()
        client.create_bucket(Bucket=name)
        if versioned:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name


def serve() -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(json.dumps({"port": server.get_host_and_port()[1]}), flush=True)
    sys.stdin.read()  # until the tests close it, or die
    server.stop()


if __name__ == "__main__":
    serve()

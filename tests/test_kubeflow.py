"""The Kubeflow manifests users deploy (examples/kubeflow/), checked offline: no cluster runs here.

Each manifest must pass the Kubeflow projects' own published API models and the admission
webhooks' rules (tests/kubeflow_manifests.py says which and where from). The commands are read
back from the YAML and parsed by the programs that will run them: torchrun with the variables
Trainer v2 injects, and mnist_edge.
"""

from __future__ import annotations

import json
import tomllib

import pytest

from conftest import REPO
from kubeflow_manifests import (
    PYTORCHJOB,
    TRAINJOB,
    documents,
    pytorchjob_command,
    trainjob_command,
    validate_pytorchjob,
    validate_trainjob,
)
from mnist_edge import cli

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"mnist-edge:{VERSION}"


def test_both_manifests_pass_the_published_models_and_the_webhook_rules():
    assert validate_trainjob() == []
    assert validate_pytorchjob() == []


def _runtime_container(docs):
    rjob = docs["TrainingRuntime"]["spec"]["template"]["spec"]["replicatedJobs"][0]
    return rjob["template"]["spec"]["template"]["spec"]["containers"][0]


def _v1_container(docs, kind="Master"):
    return docs["PyTorchJob"]["spec"]["pytorchReplicaSpecs"][kind]["template"]["spec"]["containers"][0]


def _trainer(docs):
    return docs["TrainJob"]["spec"]["trainer"]


def test_both_run_the_same_training_on_the_pinned_image_with_the_store_from_a_secret():
    v2, v1 = documents(TRAINJOB), documents(PYTORCHJOB)
    assert trainjob_command()[:3] == ["torchrun", "--module", "mnist_edge"]
    assert pytorchjob_command()[:3] == ["python", "-m", "mnist_edge"]
    assert trainjob_command()[3:] == pytorchjob_command()[3:], "the two manifests train differently"
    assert trainjob_command()[3] == "train"
    for container in (_runtime_container(v2), _v1_container(v1), _v1_container(v1, "Worker")):
        assert container["image"] == IMAGE
        env = {e["name"]: e for e in container["env"]}
        assert env["S3_ENDPOINT"]["value"].startswith("http")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    # processes per node explicit on both (the default "auto" is one per CPU)
    assert _trainer(v2)["numProcPerNode"] == 1 and v1["PyTorchJob"]["spec"]["nprocPerNode"] == "1"
    assert _trainer(v2)["numNodes"] == v2["TrainingRuntime"]["spec"]["mlPolicy"]["numNodes"]
    images = {json.loads(p.read_text())["transform"]["image"] for p in (REPO / "examples" / "pipeline").glob("*.json")}
    assert images == {IMAGE}, "the pipeline specs and the manifests run different images"


def test_torchrun_takes_the_trainjob_command_with_the_variables_trainer_v2_injects(monkeypatch):
    """torchrun reads PET_* as its defaults: what the Trainer sets on node 1 of 2 reaches it."""
    from torch.distributed.run import get_args_parser

    injected = {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "1",
        "PET_NODE_RANK": "1",
        "PET_MASTER_ADDR": "mnist-edge-train-node-0-0.mnist-edge-train",
        "PET_MASTER_PORT": "29500",
    }
    for name, value in injected.items():
        monkeypatch.setenv(name, value)
    args = get_args_parser().parse_args(trainjob_command()[1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "1", 1)
    assert (args.master_addr, args.master_port) == (injected["PET_MASTER_ADDR"], 29500)
    assert args.module and args.training_script == "mnist_edge"
    assert args.training_script_args == trainjob_command()[3:]


@pytest.mark.parametrize("command", [trainjob_command()[3:], pytorchjob_command()[3:]], ids=["v2", "v1"])
def test_mnist_edge_takes_the_arguments_both_manifests_give_it(command):
    args = cli.build_parser().parse_args(command)
    assert args.command == "train" and args.func.__name__ == "cmd_train"
    assert (args.model, args.dataset, args.epochs) == (
        "s3://master.mnist-models/mnist.pth",
        "s3://master.mnist-shards/",
        3,
    )

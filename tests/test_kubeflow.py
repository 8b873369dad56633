"""The Kubeflow manifests users deploy (examples/kubeflow/), checked offline: no cluster runs here.

Each manifest must pass the Kubeflow projects' own published API models and the admission
webhooks' rules (tests/kubeflow_manifests.py says which and where from), and each check must
refuse a manifest that breaks it. The commands are read back from the YAML and parsed by the
programs that will run them: torchrun with the variables Trainer v2 injects, and mnist_edge.
"""

from __future__ import annotations

import copy
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


V2_BROKEN = {
    "an unknown key": (lambda d: _trainer(d).update(comand=["python"]), "spec.trainer.comand: unknown field"),
    "an unknown key deep in the pod": (lambda d: _runtime_container(d).update(imagePullPolicyy="Always"),
                                       "imagePullPolicyy: unknown field of IoK8sApiCoreV1Container"),
    "a string for an integer": (lambda d: _trainer(d).update(numNodes="2"), "numNodes: expected int, got str"),
    "auto processes per node": (lambda d: _trainer(d).update(numProcPerNode="auto"), "numProcPerNode: expected int"),
    "a list for a quantity": (lambda d: _trainer(d)["resourcesPerNode"]["limits"].update(cpu=["2"]),
                              "limits.cpu: expected one of"),
    "a missing required field": (lambda d: d["TrainJob"]["spec"]["runtimeRef"].pop("name"), "runtimeRef"),
    "a trainer container not named node": (lambda d: _runtime_container(d).update(name="trainer"),
                                           "must contain the required container for the ancestor: trainer"),
    "two trainer replicated jobs": (lambda d: d["TrainingRuntime"]["spec"]["template"]["spec"]["replicatedJobs"][0]
                                    .update(replicas=2), "replicas 2: always must be 1"),
    "a name that is no DNS label": (lambda d: d["TrainJob"]["metadata"].update(name="MNIST_train"),
                                    "must be an RFC 1035 label"),
    "a reserved PET variable": (lambda d: _trainer(d).update(env=[{"name": "PET_NNODES", "value": "4"}]),
                                "PET_NNODES: reserved"),
    "a runtime that is not there": (lambda d: d["TrainJob"]["spec"]["runtimeRef"].update(name="torch-distributed"),
                                    "names no TrainingRuntime"),
}

V1_BROKEN = {
    "an unknown key": (lambda d: d["PyTorchJob"]["spec"].update(nprocsPerNode="1"), "spec.nprocsPerNode: unknown"),
    "an unknown key deep in the pod": (
        lambda d: _v1_container(d).update(imagePullPolicyy="Always"),
        "imagePullPolicyy: unknown field of V1Container",
    ),
    "an integer for a string": (
        lambda d: d["PyTorchJob"]["spec"].update(nprocPerNode=1),
        "nprocPerNode: expected str, got int",
    ),
    "a string for an integer": (
        lambda d: d["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="1"),
        "Worker.replicas: expected int",
    ),
    "a container not named pytorch": (
        lambda d: _v1_container(d, "Worker").update(name="main"),
        "Worker.template.spec.containers: must have at least one container with name pytorch",
    ),
    "a replica type it does not know": (
        lambda d: d["PyTorchJob"]["spec"]["pytorchReplicaSpecs"].update(
            Chief=d["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Worker"]
        ),
        "Chief: replica type not supported",
    ),
    "two masters": (
        lambda d: d["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
        "Master.replicas: must be 1",
    ),
    "a name that is no DNS label": (
        lambda d: d["PyTorchJob"]["metadata"].update(name="mnist_edge"),
        "must be an RFC 1035 label",
    ),
    "no image": (lambda d: _v1_container(d).update(image=""), "image: must be required"),
    "a missing required field": (lambda d: _v1_container(d).pop("name"), "name"),
}


def _unshared(docs):
    """The parsed documents with YAML's shared template (&node / *node) made two copies."""
    return json.loads(json.dumps(docs))


@pytest.mark.parametrize("case", V2_BROKEN, ids=str)
def test_a_broken_trainjob_is_refused(case):
    mutate, said = V2_BROKEN[case]
    docs = copy.deepcopy(documents(TRAINJOB))
    mutate(docs)
    errors = validate_trainjob(docs)
    assert any(said in e for e in errors), errors


@pytest.mark.parametrize("case", V1_BROKEN, ids=str)
def test_a_broken_pytorchjob_is_refused(case):
    mutate, said = V1_BROKEN[case]
    docs = _unshared(documents(PYTORCHJOB))
    mutate(docs)
    errors = validate_pytorchjob(docs)
    assert any(said in e for e in errors), errors


def test_the_published_models_alone_let_an_unknown_key_and_a_wrong_type_through():
    """Why the manifests are walked against the models' fields before the models parse them."""
    from kubeflow.training import ApiClient
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    docs = copy.deepcopy(documents(TRAINJOB))
    _trainer(docs)["comand"] = ["python"]
    assert TrainerV1alpha1TrainJob.from_dict(docs["TrainJob"]).spec.trainer.command == [
        "torchrun",
        "--module",
        "mnist_edge",
    ]
    job = _unshared(documents(PYTORCHJOB))["PyTorchJob"]
    job["spec"]["nprocPerNode"] = 1
    assert ApiClient()._ApiClient__deserialize(job, "KubeflowOrgV1PyTorchJob").spec.nproc_per_node == "1"


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

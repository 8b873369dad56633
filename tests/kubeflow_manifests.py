"""The Kubeflow manifests in examples/kubeflow/, read back and checked offline.

The commands: :func:`trainjob_command` and :func:`pytorchjob_command` are what the pods run,
taken from the YAML (the distributed-training tests run exactly these). The checks, no cluster
needed:

* the Kubeflow projects' published API models: ``kubeflow-trainer-api`` (pydantic, Trainer v2)
  and ``kubeflow-training`` (OpenAPI-generated, Training Operator v1, with the ``kubernetes``
  client's core models). Both ignore keys they do not know, and the v1 models turn ``1`` into
  ``"1"`` where a string is declared, so each manifest is first walked against the models'
  declared fields and types (unknown key or wrong type: refused), then deserialised by the
  library itself (required fields, its own validators).
* the admission webhooks' rules the models do not carry, each citing the Kubeflow source
  (kubeflow/trainer, tags v2.3.0 and v1.9.4, the release the PyPI packages were cut from).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml

KUBEFLOW = Path(__file__).resolve().parents[1] / "examples" / "kubeflow"
TRAINJOB = KUBEFLOW / "trainjob.yaml"
PYTORCHJOB = KUBEFLOW / "pytorchjob.yaml"
# k8s.io/apimachinery/pkg/util/validation: IsDNS1035Label / IsDNS1123Label / IsDNS1123Subdomain
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# pkg/constants/constants.go (v2.3.0): TorchRunReservedEnvNames, AncestorTrainer, Node
PET_RESERVED = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"


def documents(path: Path) -> dict[str, dict[str, Any]]:
    """The YAML documents of ``path`` by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def trainjob_command(path: Path = TRAINJOB) -> list[str]:
    """What each Trainer v2 node runs: the TrainJob's ``trainer.command`` + ``trainer.args``."""
    trainer = documents(path)["TrainJob"]["spec"]["trainer"]
    return [*trainer["command"], *trainer.get("args", [])]


def pytorchjob_command(path: Path = PYTORCHJOB) -> list[str]:
    """What each v1 replica runs: the ``pytorch`` container's command + args (Master and Worker
    share one template)."""
    specs = documents(path)["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]
    commands = {kind: [*c.get("command", []), *c.get("args", [])] for kind, spec in specs.items()
                for c in spec["template"]["spec"]["containers"] if c["name"] == "pytorch"}
    assert len(set(map(tuple, commands.values()))) == 1, f"Master and Worker run different commands: {commands}"
    return next(iter(commands.values()))


# -- the published models, strictly -------------------------------------------------------------------


def _primitive(expected: type, value: Any) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def walk_pydantic(annotation: Any, value: Any, path: str, errors: list[str]) -> None:
    """``value`` against a pydantic model's declared fields (by alias) and types, recursively."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return walk_pydantic(args[0], value, path, errors)
    if origin is typing.Union:
        if value is None:
            return
        options = [a for a in args if a is not type(None)]
        return walk_pydantic(options[0] if len(options) == 1 else typing.Any, value, path, errors)
    if origin is list:
        if not isinstance(value, list):
            return errors.append(f"{path}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            walk_pydantic(args[0], item, f"{path}[{i}]", errors)
        return
    if origin is dict:
        if not isinstance(value, dict):
            return errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
        for key, item in value.items():
            walk_pydantic(args[1], item, f"{path}.{key}", errors)
        return
    if (isinstance(annotation, type) and issubclass(annotation, BaseModel)
            and "actual_instance" in annotation.model_fields):
        # a oneOf wrapper (a Quantity: str or number; an IntOrString): one of its schemas must take the value
        options = [a for a in typing.get_args(annotation.model_fields["actual_instance"].annotation)
                   if a is not type(None)]
        for option in options:
            trial: list[str] = []
            walk_pydantic(option, value, path, trial)
            if not trial and (not isinstance(option, type) or option not in (str, int, bool, float)
                              or _primitive(option, value)):
                return
        return errors.append(f"{path}: expected one of {[getattr(o, '__name__', o) for o in options]}, "
                             f"got {type(value).__name__} {value!r}")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not isinstance(value, dict):
            return errors.append(f"{path}: expected an object ({annotation.__name__}), got {type(value).__name__}")
        fields = {(f.alias or name): f for name, f in annotation.model_fields.items()}
        for key, item in value.items():
            if key not in fields:
                errors.append(f"{path}.{key}: unknown field of {annotation.__name__}")
            else:
                walk_pydantic(fields[key].annotation, item, f"{path}.{key}", errors)
        return
    if isinstance(annotation, type) and annotation in (str, int, bool, float) and not _primitive(annotation, value):
        errors.append(f"{path}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")


_SWAGGER_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": float}


def walk_swagger(type_name: str, value: Any, path: str, errors: list[str]) -> None:
    """``value`` against an OpenAPI-generated model's ``openapi_types``/``attribute_map``."""
    from kubeflow.training import models

    if value is None:
        return
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return errors.append(f"{path}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            walk_swagger(type_name[5:-1], item, f"{path}[{i}]", errors)
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            walk_swagger(inner, item, f"{path}.{key}", errors)
        return
    if type_name in _SWAGGER_PRIMITIVES:
        if not _primitive(_SWAGGER_PRIMITIVES[type_name], value):
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
        return
    if type_name in ("object", "datetime", "date"):
        return
    klass = getattr(models, type_name)
    if not isinstance(value, dict):
        return errors.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
    by_json = {json_key: klass.openapi_types[attr] for attr, json_key in klass.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            walk_swagger(by_json[key], item, f"{path}.{key}", errors)


def check_v2(doc: dict[str, Any]) -> list[str]:
    """A TrainJob or TrainingRuntime against kubeflow-trainer-api, then the library's own parse."""
    from kubeflow_trainer_api import models
    from pydantic import ValidationError

    model = {"TrainJob": models.TrainerV1alpha1TrainJob, "TrainingRuntime": models.TrainerV1alpha1TrainingRuntime}
    errors: list[str] = []
    walk_pydantic(model[doc["kind"]], doc, doc["kind"], errors)
    try:
        model[doc["kind"]].from_dict(doc)
    except (ValidationError, ValueError, TypeError) as error:
        errors.append(f"{doc['kind']}: {' '.join(str(error).split())[:300]}")
    return errors


def check_v1(doc: dict[str, Any]) -> list[str]:
    """A PyTorchJob against kubeflow-training's models, then its ApiClient's deserialisation."""
    from kubeflow.training import ApiClient

    errors: list[str] = []
    walk_swagger("KubeflowOrgV1PyTorchJob", doc, "PyTorchJob", errors)
    try:
        ApiClient()._ApiClient__deserialize(doc, "KubeflowOrgV1PyTorchJob")
    except (ValueError, TypeError) as error:
        errors.append(f"PyTorchJob: {' '.join(str(error).split())[:300]}")
    return errors


# -- the webhooks' rules -------------------------------------------------------------------------------


def _name(doc: dict[str, Any], pattern: re.Pattern[str], limit: int, rule: str) -> list[str]:
    name = doc.get("metadata", {}).get("name", "")
    ok = isinstance(name, str) and pattern.fullmatch(name) and len(name) <= limit
    return [] if ok else [f"{doc['kind']}.metadata.name {name!r}: must be {rule} of at most {limit} characters"]


def _containers(pod: dict[str, Any], path: str) -> tuple[list[dict[str, Any]], list[str]]:
    containers = ((pod.get("spec") or {}).get("containers")) or []
    errors = [f"{path}.containers[{i}].name {c.get('name')!r}: must be a DNS-1123 label"
              for i, c in enumerate(containers) if not DNS1123_LABEL.fullmatch(str(c.get("name", "")))]
    return containers, errors


def webhook_v2(runtime: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """Trainer v2.3.0's rules for a TrainJob on a TrainingRuntime."""
    # pkg/apis/trainer/v1alpha1/trainjob_types.go:36-37 (CRD XValidation): RFC 1035 label, <= 63
    errors = _name(job, DNS1035_LABEL, 63, "an RFC 1035 label")
    errors += _name(runtime, DNS1123_SUBDOMAIN, 253, "a DNS-1123 subdomain")  # any object's name
    ref = job["spec"].get("runtimeRef", {})
    # pkg/webhooks/trainjob_webhook.go ValidateCreate: the referenced runtime must exist
    if (ref.get("kind"), ref.get("name")) != ("TrainingRuntime", runtime["metadata"]["name"]):
        errors.append(f"TrainJob.spec.runtimeRef {ref}: names no TrainingRuntime in this file")
    # pkg/runtime/framework/plugins/torch/torch.go Validate: trainer.env must not set PET_* names
    names = {e.get("name") for e in job["spec"].get("trainer", {}).get("env", [])}
    errors += [f"TrainJob.spec.trainer.env {n}: reserved, the Trainer injects it" for n in sorted(names & PET_RESERVED)]
    # trainingruntime_types.go:172: at most one of torch, mpi, jax, xgboost, flux
    policies = [k for k in ("torch", "mpi", "jax", "xgboost", "flux") if k in runtime["spec"].get("mlPolicy", {})]
    if len(policies) > 1:
        errors.append(f"TrainingRuntime.spec.mlPolicy: only one policy may be set, got {policies}")
    # pkg/webhooks/trainingruntime_webhook.go validateReplicatedJobs: the job labelled
    # ancestor-step=trainer has replicas 1 and a container named "node" (constants.Node)
    jobs = runtime["spec"]["template"]["spec"].get("replicatedJobs", [])
    trainers = [j for j in jobs
                if (j["template"].get("metadata") or {}).get("labels", {}).get(ANCESTOR_LABEL) == "trainer"]
    if len(trainers) != 1:
        errors.append(f"TrainingRuntime: expected one replicatedJob labelled {ANCESTOR_LABEL}: trainer, "
                      f"found {len(trainers)}")
    for rjob in trainers:
        path = f"TrainingRuntime.replicatedJobs[{rjob['name']}]"
        if rjob.get("replicas", 1) != 1:
            errors.append(f"{path}.replicas {rjob['replicas']}: always must be 1")
        containers, bad = _containers(rjob["template"]["spec"]["template"], path)
        errors += bad
        if "node" not in {c.get("name") for c in containers}:
            errors.append(f"{path}: must contain the required container for the ancestor: trainer (named node)")
    return errors


def webhook_v1(job: dict[str, Any]) -> list[str]:
    """Training Operator v1.9.4's rules for a PyTorchJob: pkg/webhooks/pytorch/pytorchjob_webhook.go."""
    errors = _name(job, DNS1035_LABEL, 63, "an RFC 1035 label")  # validatePyTorchJob: NameIsDNS1035Label
    spec = job["spec"]
    elastic = spec.get("elasticPolicy") or {}
    if "nProcPerNode" in elastic and "nprocPerNode" in spec:  # validateSpec
        errors.append("PyTorchJob.spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode")
    replicas = spec.get("pytorchReplicaSpecs")
    if not replicas:
        return errors + ["PyTorchJob.spec.pytorchReplicaSpecs: must be required"]
    for kind, replica in replicas.items():  # validatePyTorchReplicaSpecs
        path = f"PyTorchJob.spec.pytorchReplicaSpecs.{kind}"
        if kind not in ("Master", "Worker"):
            errors.append(f"{path}: replica type not supported, expected Master or Worker")
        containers, bad = _containers(replica.get("template") or {}, path)
        errors += bad or ([] if containers else [f"{path}.template.spec.containers: must be specified"])
        errors += [f"{path}.containers[{i}].image: must be required" for i, c in enumerate(containers)
                   if not c.get("image")]
        if "pytorch" not in {c.get("name") for c in containers}:
            errors.append(f"{path}.template.spec.containers: must have at least one container with name pytorch")
        if kind == "Master" and replica.get("replicas") != 1:
            errors.append(f"{path}.replicas: must be 1")
        elif kind == "Worker" and isinstance(replica.get("replicas", 1), int) and replica.get("replicas", 1) < 1:
            errors.append(f"{path}.replicas: must be at least 1")
    return errors


def validate_trainjob(docs: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Every problem of trainjob.yaml's TrainingRuntime and TrainJob (or of ``docs``, by kind)."""
    docs = docs or documents(TRAINJOB)
    runtime, job = docs["TrainingRuntime"], docs["TrainJob"]
    return check_v2(runtime) + check_v2(job) + webhook_v2(runtime, job)


def validate_pytorchjob(docs: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Every problem of pytorchjob.yaml's PyTorchJob (or of ``docs``, by kind)."""
    job = (docs or documents(PYTORCHJOB))["PyTorchJob"]
    return check_v1(job) + webhook_v1(job)

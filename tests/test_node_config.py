"""The node's configuration: where its data is, its threads and lock, its privacy limits, read once
from the environment, failing closed on any value it cannot use (and naming the variable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_edge.node import DEFAULT_DELTA, LEDGER_NAME, STATE_DIR, NodeConfig, NodeConfigError, ranks_from


def read(environ: dict[str, str], cwd: Path, cores: int = 8) -> NodeConfig:
    return NodeConfig.from_environment(environ, cwd, cores)


@pytest.fixture
def root(tmp_path) -> Path:
    """A data root as ``prepare`` writes it: client-0/ and client-1/, each with a train split."""
    for number in range(2):
        (tmp_path / "data" / f"client-{number}" / "train").mkdir(parents=True)
    return tmp_path


def test_a_lone_node_reads_data_in_its_working_directory_and_keeps_its_ledger_with_the_data(tmp_path):
    node = read({}, tmp_path)
    assert node.data_dir == tmp_path / "data" and node.threads is None and node.compute_lock is None
    assert node.privacy.epsilon is None and node.privacy.delta == DEFAULT_DELTA
    assert node.privacy.ledger == tmp_path / "data" / STATE_DIR / LEDGER_NAME
    assert read({"SCALEOUT_DATA_DIR": "/srv/shards"}, tmp_path).data_dir == Path("/srv/shards")


def test_client_number_picks_its_directory_of_the_data_root(root):
    """Under launch_clients every client shares one working directory: CLIENT_NUMBER names its data."""
    for number in range(2):
        node = read({"CLIENT_NUMBER": str(number), "TOTAL_N_CLIENTS": "2"}, root)
        assert node.data_dir == root / "data" / f"client-{number}"
        assert node.privacy.ledger == root / "data" / f"client-{number}" / STATE_DIR / LEDGER_NAME
        assert (node.client_number, node.total_clients) == (number, 2)


def test_a_per_client_data_dir_with_its_own_split_wins_over_the_layout(root):
    own = root / "mine"
    (own / "train").mkdir(parents=True)
    node = read({"CLIENT_NUMBER": "1", "TOTAL_N_CLIENTS": "2", "SCALEOUT_DATA_DIR": str(own)}, root)
    assert node.data_dir == own


def test_under_the_default_root_the_layout_wins_over_a_split_at_its_top(root):
    """A split at the top of the shared ./data would be every client's: each still serves client-<n>/."""
    (root / "data" / "train").mkdir()
    for number in range(2):
        assert read({"CLIENT_NUMBER": str(number), "TOTAL_N_CLIENTS": "2"}, root).data_dir == \
            root / "data" / f"client-{number}"
    (root / "lone" / "data" / "train").mkdir(parents=True)  # one split for everyone: refused, not shared
    with pytest.raises(NodeConfigError, match="must hold client-1/"):
        read({"CLIENT_NUMBER": "1", "TOTAL_N_CLIENTS": "2"}, root / "lone")


def test_a_missing_client_directory_names_the_path_and_the_variables(root):
    with pytest.raises(NodeConfigError) as error:
        read({"CLIENT_NUMBER": "1", "TOTAL_N_CLIENTS": "3", "SCALEOUT_DATA_DIR": str(root / "elsewhere")}, root)
    message = str(error.value)
    assert str(root / "elsewhere" / "client-1") in message and "CLIENT_NUMBER=1" in message
    assert "SCALEOUT_DATA_DIR" in message


@pytest.mark.parametrize(
    "number, total, named",
    [
        ("-1", "2", "CLIENT_NUMBER"),
        ("x", "2", "CLIENT_NUMBER"),
        ("1.0", "2", "CLIENT_NUMBER"),
        (" ", "2", "CLIENT_NUMBER"),
        ("2", "2", "CLIENT_NUMBER 2 must be below TOTAL_N_CLIENTS 2"),
        ("0", "0", "TOTAL_N_CLIENTS"),
        ("0", "two", "TOTAL_N_CLIENTS"),
    ],
)
def test_bad_client_numbers_are_refused_naming_them(root, number, total, named):
    with pytest.raises(NodeConfigError, match=named):
        read({"CLIENT_NUMBER": number, "TOTAL_N_CLIENTS": total}, root)


def test_clients_sharing_a_box_share_its_cores_unless_they_take_turns(root):
    """N clients: cores // N threads each; with the compute lock one computes at a time, on all of them;
    MNIST_EDGE_THREADS is the operator's own choice and wins."""
    shared = {"CLIENT_NUMBER": "0", "TOTAL_N_CLIENTS": "3"}
    assert read(shared, root, cores=8).threads == 2
    assert read(shared, root, cores=2).threads == 1
    assert read({**shared, "SCALEOUT_CLIENT_COMPUTE_LOCK": "/tmp/l"}, root).threads is None
    assert read({**shared, "SCALEOUT_CLIENT_COMPUTE_LOCK": "/tmp/l"}, root).compute_lock == Path("/tmp/l")
    assert read({**shared, "MNIST_EDGE_THREADS": "3"}, root, cores=8).threads == 3


@pytest.mark.parametrize(
    "name, value",
    [
        ("MNIST_EDGE_DP_EPSILON", ""),
        ("MNIST_EDGE_DP_EPSILON", "   "),
        ("MNIST_EDGE_DP_EPSILON", "nan"),
        ("MNIST_EDGE_DP_EPSILON", "inf"),
        ("MNIST_EDGE_DP_EPSILON", "0"),
        ("MNIST_EDGE_DP_EPSILON", "1e9"),
        ("MNIST_EDGE_DP_DELTA", "1"),
        ("MNIST_EDGE_DP_DELTA", ""),
        ("MNIST_EDGE_DP_ROUNDS", "0"),
        ("MNIST_EDGE_DP_ROUNDS", "ten"),
        ("MNIST_EDGE_THREADS", "0"),
        ("MNIST_EDGE_THREADS", "99999999999999999999"),
        ("MNIST_EDGE_THREADS", "²"),
        ("MNIST_EDGE_DIST_TIMEOUT", "0"),
        ("SCALEOUT_DATA_DIR", ""),
    ],
)
def test_a_node_variable_that_is_set_but_unusable_fails_closed_naming_it(tmp_path, name, value):
    """A templating slip (set but empty) never means "no budget": it stops the node, naming the variable."""
    with pytest.raises(NodeConfigError, match=f"environment variable {name} "):
        read({name: value}, tmp_path)
        ranks_from({"WORLD_SIZE": "2", "RANK": "0", name: value})


@pytest.mark.parametrize("typo", ["MNIST_EDGE_DP_EPSILLON", "MNIST_EDGE_BATCH_PARTS", "MNIST_EDGE_DPEPSILON"])
def test_an_unknown_mnist_edge_variable_is_refused_rather_than_ignored(tmp_path, typo):
    """A misspelt budget must not silently train without privacy (and a variable this version no
    longer has is named, not ignored)."""
    with pytest.raises(NodeConfigError, match=f"unknown node variable '{typo}'|{typo} is no longer read"):
        read({typo: "3"}, tmp_path)


def test_the_ranks_of_a_data_parallel_job_come_from_torchs_variables():
    assert ranks_from({}) is None and ranks_from({"WORLD_SIZE": "1"}) is None
    ranks = ranks_from({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MNIST_EDGE_DIST_TIMEOUT": "15"})
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.timeout, ranks.writes) == (3, 4, 1, 15.0, False)
    with pytest.raises(NodeConfigError, match="RANK is not set"):
        ranks_from({"WORLD_SIZE": "2"})
    with pytest.raises(NodeConfigError, match="environment variable RANK"):
        ranks_from({"WORLD_SIZE": "2", "RANK": "2"})

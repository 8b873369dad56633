"""Split one labelled image set over federated clients: IID, Dirichlet label skew, or label shards.

Real nodes rarely see the same digits in the same proportions. These partitioners reproduce the
two standard non-IID set-ups of the federated-learning literature so a local federation can be
tried under them: Dirichlet(alpha) label proportions per class (Hsu et al. 2019; small alpha,
strong skew) and "each client holds only K digits" (McMahan et al. 2017's pathological shards).
Every partitioner is a pure function of the labels and a numpy ``Generator``: same seed, same split.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError

PARTITIONS = ("iid", "dirichlet", "shards")
MIN_CLIENT_IMAGES = 10
"""No client gets fewer images: each needs a train and a test split of its own."""
DIRICHLET_TRIES = 1000
NUM_CLASSES = 10


class PartitionError(UserError, ValueError):
    """A partition cannot be made as asked (bad scheme, parameter, or too few images)."""


def split_iid(n: int, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal ``n`` indices into ``clients`` near-equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]


def split_dirichlet(
    labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, deal its images to clients in Dirichlet(alpha)-distributed proportions.

    Draws again (from the same generator, so still deterministic) while any client would get
    fewer than ``MIN_CLIENT_IMAGES`` images; very small alpha with many clients may never get
    there, which raises instead of looping forever.
    """
    classes = np.unique(labels)
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in merged) >= MIN_CLIENT_IMAGES:
            return merged
    raise PartitionError(
        f"Dirichlet alpha {alpha} left a client with fewer than {MIN_CLIENT_IMAGES} of {len(labels)} images "
        f"in {DIRICHLET_TRIES} draws; use a larger --alpha or fewer --clients"
    )


def split_shards(
    labels: np.ndarray, clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` digits; a digit is shared evenly by its holders.

    The digits are shuffled, then dealt round-robin (client i gets digits i*K .. i*K+K-1,
    wrapping), so every digit has a holder whenever ``clients * K >= number of digits``.
    """
    classes = rng.permutation(np.unique(labels))
    if not 1 <= classes_per_client <= len(classes):
        raise PartitionError(
            f"--classes-per-client must be between 1 and {len(classes)} (the digits present), "
            f"got {classes_per_client}"
        )
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(clients):
        for j in range(classes_per_client):
            holders[int(classes[(client * classes_per_client + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for label, owners in holders.items():
        members = rng.permutation(np.flatnonzero(labels == label))
        for client, chunk in zip(owners, np.array_split(members, max(len(owners), 1))):
            parts[client].append(chunk)
    merged = [np.sort(np.concatenate(p)) for p in parts]
    smallest = min(len(p) for p in merged)
    if smallest < MIN_CLIENT_IMAGES:
        raise PartitionError(
            f"{clients} clients with {classes_per_client} digit(s) each leaves a client {smallest} images "
            f"(at least {MIN_CLIENT_IMAGES} needed); use fewer --clients or more --classes-per-client"
        )
    return merged


def partition(
    labels: np.ndarray,
    clients: int,
    scheme: str = "iid",
    rng: np.random.Generator | None = None,
    alpha: float | None = None,
    classes_per_client: int | None = None,
) -> list[np.ndarray]:
    """Indices of ``labels`` for each client under ``scheme``; every image goes to at most one client.

    ``rng`` makes it deterministic: the same seeded generator gives the same split.
    """
    if scheme not in PARTITIONS:
        raise PartitionError(f"--partition must be one of {', '.join(PARTITIONS)}, got {scheme!r}")
    if clients < 1:
        raise PartitionError(f"--clients must be >= 1, got {clients}")
    if len(labels) < clients * MIN_CLIENT_IMAGES:
        raise PartitionError(
            f"{len(labels)} images cannot give {clients} clients {MIN_CLIENT_IMAGES} images each"
        )
    if scheme != "dirichlet" and alpha is not None:
        raise PartitionError(f"--alpha applies to --partition dirichlet only, not {scheme!r}")
    if scheme != "shards" and classes_per_client is not None:
        raise PartitionError(f"--classes-per-client applies to --partition shards only, not {scheme!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    if scheme == "iid":
        return split_iid(len(labels), clients, rng)
    if scheme == "dirichlet":
        if alpha is None or not np.isfinite(alpha) or alpha <= 0:
            raise PartitionError(f"--partition dirichlet needs --alpha A with A > 0, got {alpha}")
        return split_dirichlet(labels, clients, float(alpha), rng)
    if classes_per_client is None:
        raise PartitionError("--partition shards needs --classes-per-client K")
    return split_shards(labels, clients, classes_per_client, rng)


def label_histogram(labels: np.ndarray) -> list[int]:
    """Images per digit 0-9."""
    return np.bincount(labels, minlength=NUM_CLASSES).astype(int).tolist()

"""Shared fixtures: a small real Fashion-MNIST CSV made once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def fm_dir(tmp_path_factory) -> Path:
    from clipguard.data.fashion_mnist import materialise

    return materialise(tmp_path_factory.mktemp("fm") / "fm", train_size=512, test_size=200, seed=0)


@pytest.fixture(scope="session")
def fm_train(fm_dir):
    from clipguard.data.csv_dataset import load_csv

    return load_csv(fm_dir / "train.csv")


@pytest.fixture(scope="module")
def one_thread():
    """Toy batches are too small for intra-op threads; on a shared machine they only spin.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(fm_train):
    """32 real Fashion-MNIST pairs for loss-level tests."""
    return fm_train.subset(range(32))


@pytest.fixture
def free_port() -> str:
    """A TCP port nothing listens on now, for a torchrun rendezvous: a fixed port can still be
    held by an earlier run's socket (or another program), which fails the run at random."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])

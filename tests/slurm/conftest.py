"""A real two-node SLURM cluster for the tests of this folder, started once per module."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import INSTALL_HINT, Cluster, missing_binaries


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:  # CI installs SLURM (install.sh test): a missing binary is a broken setup, not a skip
        pytest.fail(f"{INSTALL_HINT} (missing: {', '.join(missing)})", pytrace=False)
    c = Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
        yield c
    finally:
        c.stop()

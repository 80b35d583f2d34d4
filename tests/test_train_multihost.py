"""Multi-host pieces of the trainer, with the process collectives faked: every host's grain
state in the checkpoint metadata, and a collective SIGTERM stop."""
import json

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from cgjax import train

HOSTS = ['{"shard": 0, "pos": 17}', '{"shard": 1, "pos": 5, "extra": [1, 2, 3]}']


@pytest.fixture
def two_hosts(monkeypatch):
    """Pretend to be process 0 of 2; process_allgather returns both hosts' values."""
    mine = {}  # "stop": every host's SIGTERM flag

    def allgather(x):
        x = np.asarray(x)
        if x.ndim == 0 and x.dtype == np.int32 and int(x) in (0, 1) and "stop" in mine:
            return np.asarray(mine["stop"], np.int32)
        if x.ndim == 0:  # lengths
            return np.asarray([len(h.encode()) for h in HOSTS], np.int32)
        n = x.shape[0]
        rows = [np.frombuffer(h.encode(), np.uint8) for h in HOSTS]
        return np.stack([np.pad(r, (0, n - len(r))) for r in rows])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    return mine


def test_gather_host_strings_one_process():
    assert train.gather_host_strings('{"a": 1}') == ['{"a": 1}']


def test_gather_host_strings_pads_and_decodes(two_hosts):
    assert train.gather_host_strings(HOSTS[1]) == HOSTS


def test_host_data_state_picks_this_process(two_hosts):
    meta = {"data_iter": {"from": "host 0"}, "data_iter_by_process": HOSTS}
    assert train.host_data_state(meta) == json.loads(HOSTS[1])  # this is process 1
    with pytest.raises(ValueError, match="3 processes"):
        train.host_data_state({"data_iter": {}, "data_iter_by_process": HOSTS + HOSTS[:1]})
    assert train.host_data_state({"data_iter": {"pos": 3}}) == {"pos": 3}  # a one-host checkpoint


def test_preemption_stop_is_collective(two_hosts):
    pre = train._Preemption()
    two_hosts["stop"] = [0, 1]  # the other host got SIGTERM, this one did not
    assert not pre.requested and pre.stop()
    two_hosts["stop"] = [0, 0]
    assert not pre.stop()


def test_preemption_stop_one_process():
    pre = train._Preemption()
    assert not pre.stop()
    pre.requested = True
    assert pre.stop()

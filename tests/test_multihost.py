"""cgjax.multihost with the process collectives faked: every host's grain state in the checkpoint
metadata, a collective SIGTERM stop, on_primary. Real processes: tests/test_multiprocess.py."""
import json

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from cgjax import multihost

HOSTS = ['{"shard": 0, "pos": 17}', '{"shard": 1, "pos": 5, "extra": [1, 2, 3]}']


@pytest.fixture
def two_hosts(monkeypatch):
    """Pretend to be process 1 of 2; process_allgather returns both hosts' values."""
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
    assert multihost.gather_host_strings('{"a": 1}') == ['{"a": 1}']


def test_gather_host_strings_pads_and_decodes(two_hosts):
    assert multihost.gather_host_strings(HOSTS[1]) == HOSTS


def test_host_data_state_picks_this_process(two_hosts):
    meta = {"data_iter": {"from": "host 0"}, "data_iter_by_process": HOSTS}
    assert multihost.host_data_state(meta) == json.loads(HOSTS[1])  # this is process 1
    with pytest.raises(ValueError, match=r"3 process\(es\)"):
        multihost.host_data_state({"data_iter": {}, "data_iter_by_process": HOSTS + HOSTS[:1]})
    with pytest.raises(ValueError, match="data state of 1 process"):  # a one-host checkpoint on 2 hosts
        multihost.host_data_state({"data_iter": {"pos": 3}})


def test_preemption_stop_is_collective(two_hosts):
    pre = multihost.Preemption()
    two_hosts["stop"] = [0, 1]  # the other host got SIGTERM, this one did not
    assert not pre.requested and pre.stop()
    two_hosts["stop"] = [0, 0]
    assert not pre.stop()


def test_preemption_stop_one_process():
    pre = multihost.Preemption()
    assert not pre.stop()
    pre.requested = True
    assert pre.stop()


def test_host_data_state_one_process():
    assert multihost.host_data_state({"data_iter": {"pos": 3}}) == {"pos": 3}
    with pytest.raises(ValueError, match="data state of 2 process"):
        multihost.host_data_state({"data_iter": {}, "data_iter_by_process": HOSTS})


def test_on_primary_raises_everywhere_when_process_0_fails(two_hosts):
    """On process 1 (the fixture), a failure on process 0 (its flag 0 in the gather) is raised here
    too, so no process goes on with a half-made asset."""
    two_hosts["stop"] = [0, 1]  # process 0 reports failure, process 1 (this one) success
    calls = []
    with pytest.raises(RuntimeError, match="demo assets failed on process 0"):
        multihost.on_primary("demo assets", lambda: calls.append(1))
    assert calls == []  # only process 0 runs it
    two_hosts["stop"] = [1, 1]
    assert multihost.on_primary("demo assets", lambda: calls.append(1)) is None and calls == []

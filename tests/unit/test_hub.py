"""The hub question is asked once per run (dschat_cli/hub.py): offline mode answers without a
probe, a launch's one probe is remembered, a rank takes the recorded answer."""

from __future__ import annotations

import pytest

from dschat_cli import hub


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(hub, "_answer", None)
    for var in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)


def test_one_probe_per_process(monkeypatch):
    probes = []
    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: probes.append(timeout) or True)
    assert hub.reachable() and hub.reachable()
    assert probes == [3.0]


@pytest.mark.parametrize("var", hub.OFFLINE_VARIABLES)
def test_offline_mode_never_probes(monkeypatch, var):
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: pytest.fail("probed in offline mode"))
    assert hub.offline_variable() == var
    assert hub.reachable() is False


def test_a_rank_takes_the_recorded_answer(monkeypatch):
    monkeypatch.setattr(hub, "probe", lambda timeout=3.0: pytest.fail("a rank probed"))
    hub.assume(True)
    assert hub.reachable() is True
    hub.assume(False)
    assert hub.reachable() is False

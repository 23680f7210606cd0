"""The stop signal (library.guards.StopSignal) is held by the training loop only (`with books:`,
library/loop.py): SIGTERM / SIGINT during the loop save a resumable state and exit 75, and whatever ends the
loop - its end, an error, that exit - gives the process its own handlers back (issue 15: it was entered by hand
and left installed when a run raised)."""
import os
import signal

import pytest

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _train(recipe: str, cfg):
    if recipe == "network":
        from train_network import train
    else:
        from train_db import train
    return train(cfg)


def _config(make_config, recipe: str, **train):
    extra = {"dreambooth": {"train_text_encoder": False}} if recipe == "db" else {}
    return make_config(train={"max_train_steps": 3, "output_name": recipe, **train}, **extra)


@pytest.fixture
def own_handlers():
    """Handlers of this process' own for both signals (distinct from Python's defaults), put back after."""
    def ours(signum, frame):  # noqa: ARG001
        raise AssertionError("the process' own handler ran")

    before = {sig: signal.signal(sig, ours) for sig in SIGNALS}
    yield {sig: ours for sig in SIGNALS}
    for sig, handler in before.items():
        signal.signal(sig, handler)


def _handlers():
    return {sig: signal.getsignal(sig) for sig in SIGNALS}


def _batch_loss_then(monkeypatch, call: int, action) -> None:
    """library.training.batch_loss runs `action()` at its `call`-th call (train() imports it when it starts)."""
    import library.training

    real, calls = library.training.batch_loss, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(library.training, "batch_loss", counted)


@pytest.mark.parametrize("recipe", ["network", "db"])
def test_handlers_are_restored_after_a_run_and_after_a_run_that_raises(make_config, monkeypatch, own_handlers,
                                                                       recipe):
    seen = {}
    _batch_loss_then(monkeypatch, 2, lambda: seen.update(_handlers()))
    assert len(_train(recipe, _config(make_config, recipe)).losses) == 3
    assert seen and all(seen[sig] != own_handlers[sig] for sig in SIGNALS)  # the loop's, while it ran
    assert _handlers() == own_handlers

    def fail():
        raise RuntimeError("a fault inside the loop")

    _batch_loss_then(monkeypatch, 2, fail)
    with pytest.raises(RuntimeError, match="a fault inside the loop"):
        _train(recipe, _config(make_config, recipe, output_name=f"{recipe}-raises"))
    assert _handlers() == own_handlers


def test_sigterm_saves_a_state_exits_75_and_restores_the_handlers(make_config, monkeypatch, own_handlers,
                                                                 tmp_path):
    from library.guards import EXIT_STOPPED

    _batch_loss_then(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as stopped:
        _train("network", _config(make_config, "network"))
    assert stopped.value.code == EXIT_STOPPED == 75
    assert [p.name for p in (tmp_path / "out").glob("*-state")] == ["network-step00000002-state"]
    assert _handlers() == own_handlers

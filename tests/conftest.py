"""Shared test settings: hypothesis without deadlines (first calls compile)."""

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "admmprune",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("admmprune")


@pytest.fixture
def checkpoint_at(tmp_path):
    """``checkpoint_at(n) -> (on_iteration, saved)``: an ``ADMM.run`` hook that saves the
    state after iteration ``n`` to ``saved["path"]`` and its history to ``saved["history"]``."""
    from admmprune import save_checkpoint

    def make(n):
        saved = {"path": tmp_path / "admm.npz"}

        def on_iteration(state, history):
            if int(state.iteration) == n:
                save_checkpoint(saved["path"], state)
                saved["history"] = list(history)

        return on_iteration, saved

    return make

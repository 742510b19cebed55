"""The examples run and say what they claim (examples/adamwr.py, in brief)."""
import importlib.util
import math
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adamwr_example_trains_decays_per_restart_period_and_draws(tmp_path):
    adamwr = load_example("adamwr")
    epochs = 3  # periods of 2 and then 4 epochs: one restart
    histories = adamwr.main(["--out", str(tmp_path), "--epochs", str(epochs)])
    for name in ("adamwr.png", "lr_range_test.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    steps_per_epoch = adamwr.TRAIN // adamwr.BATCH
    restart = adamwr.PERIOD_EPOCHS * steps_per_epoch
    for name, history in histories.items():
        assert len(history["loss"]) == epochs * steps_per_epoch
        assert all(math.isfinite(loss) for loss in history["loss"])
        assert history["loss"][-1] < history["loss"][0]  # it learned
    adamwr_history = histories["AdamWR"]
    # The first step of each period decays by lambda_norm * sqrt(b / (B * T_i)), eta = 1.
    for step, epochs_in_period in ((0, 2), (restart, 4)):
        expected = adamwr.LAMBDA_NORM["AdamWR"] * math.sqrt(
            adamwr.BATCH / (adamwr.TRAIN * epochs_in_period))
        assert adamwr_history["decay"][step] == pytest.approx(expected, rel=1e-12)
        assert adamwr_history["lr"][step] == adamwr.BASE_LR["adam"]
    assert histories["Adam + L2"]["decay"] == [0.0] * len(adamwr_history["decay"])

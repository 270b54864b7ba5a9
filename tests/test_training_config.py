"""Fit/training configs: shipped YAML files validate, cross-field rules give clear messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import ConfigError, load_config, validate_config
from mlipctl.config.training import TrainingConfig
from mlipctl.training.schedule import PlateauState, learning_rate, plateau_update

ROOT = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted(ROOT.glob("configs/fit-mlearn-*.yaml"))


def _fit(data: dict, **kw) -> FitConfig:
    return validate_config(FitConfig, data, check_files=False, **kw)


def _problems(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        _fit(data)
    return str(info.value)


def test_all_four_mlearn_configs_are_shipped_and_validate():
    names = {p.name for p in FIT_CONFIGS}
    assert names == {f"fit-mlearn-{el}.yaml" for el in ("Cu", "Ni", "Li", "Ge")}
    for path in FIT_CONFIGS:
        el = path.stem.split("-")[-1]
        cfg = load_config(FitConfig, path, check_files=False)
        assert str(cfg.data.path) == f"../shared/data/mlearn/{el}/training.extxyz"
        assert str(cfg.data.test_path) == f"../shared/data/mlearn/{el}/test.extxyz"
        assert cfg.data.valid_fraction > 0


def test_defaults_and_unions():
    cfg = _fit({"data": {"path": "x.extxyz"}})
    t = cfg.training
    assert t.optimizer.kind == "adam" and t.schedule.kind == "cosine" and t.loss.kind == "mse"
    assert cfg.output == "runs/fit"
    cfg = _fit(
        {
            "data": {"path": "x"},
            "training": {
                "optimizer": {"kind": "adamw", "weight_decay": 0.01},
                "schedule": {"kind": "reduce_on_plateau", "factor": 0.3},
                "loss": {"kind": "huber", "delta": 0.05, "stress_weight": 0.1},
            },
        }
    )
    assert cfg.training.optimizer.weight_decay == 0.01
    assert cfg.training.schedule.factor == 0.3
    assert cfg.training.loss.delta == 0.05


@pytest.mark.parametrize(
    ("training", "needle"),
    [
        ({"optimizer": {"kind": "sgd", "weight_decay": 0.1}}, "weight_decay"),
        ({"optimizer": {"kind": "rmsprop"}}, "rmsprop"),
        ({"schedule": {"kind": "cosine", "warmup_epochs": 50}, "max_epochs": 10}, "warmup"),
        (
            {"loss": {"kind": "mse", "energy_weight": 0, "forces_weight": 0}},
            "nothing would be fitted",
        ),
        ({"loss": {"kind": "mse", "delta": 0.1}}, "delta"),
        ({"checkpoint": {"every_epochs": None, "every_seconds": None}}, "resumed"),
        ({"metric": "stress_mae"}, "stress_weight"),
        ({"ema_decay": 1.0}, "ema_decay"),
        (
            {
                "optimizer": {"kind": "adam", "learning_rate": 1e-7},
                "schedule": {"kind": "exponential"},
            },
            "min_learning_rate",
        ),
    ],
)
def test_bad_training_settings_name_the_problem(training, needle):
    assert needle in _problems({"data": {"path": "x"}, "training": training})


def test_early_stopping_and_plateau_need_validation_data():
    msg = _problems({"data": {"path": "x", "valid_fraction": 0.0}})
    assert "early_stopping needs validation data" in msg
    msg = _problems(
        {
            "data": {"path": "x", "valid_fraction": 0.0},
            "training": {
                "early_stopping": {"enabled": False},
                "schedule": {"kind": "reduce_on_plateau"},
            },
        }
    )
    assert "reduce_on_plateau needs validation data" in msg
    ok = _fit(
        {
            "data": {"path": "x", "valid_fraction": 0.0, "valid_path": "v.extxyz"},
            "training": {"schedule": {"kind": "reduce_on_plateau"}},
        }
    )
    assert ok.data.valid_path is not None


def test_bad_name_rejected():
    assert "name must start" in _problems({"data": {"path": "x"}, "name": "../evil"})


def test_schedules_are_pure_functions_of_the_step():
    t = TrainingConfig.model_validate(
        {
            "max_epochs": 10,
            "schedule": {"kind": "cosine", "warmup_epochs": 1, "final_fraction": 0.1},
        }
    )
    lrs = [learning_rate(t.schedule, 1.0, s, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)  # (step + 1) / warm-up steps
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # decays after warm-up

    exp = TrainingConfig.model_validate(
        {"schedule": {"kind": "exponential", "decay_rate": 0.5, "min_learning_rate": 0.0}}
    ).schedule
    assert learning_rate(exp, 1.0, 20, 10, 1000) == pytest.approx(0.25)


def test_reduce_on_plateau_reduces_after_patience_and_respects_floor():
    sched = TrainingConfig.model_validate(
        {
            "optimizer": {"kind": "sgd", "learning_rate": 1.0},
            "schedule": {
                "kind": "reduce_on_plateau",
                "patience": 2,
                "factor": 0.5,
                "min_learning_rate": 0.2,
            },
        }
    ).schedule
    st = PlateauState()
    st, red = plateau_update(st, 1.0, sched, 1.0)
    assert not red and st.best == 1.0
    st, red = plateau_update(st, 1.0, sched, 1.0)
    assert not red
    st, red = plateau_update(st, 1.5, sched, 1.0)
    assert red and st.scale == 0.5
    assert learning_rate(sched, 1.0, 0, 1, 10, st) == 0.5
    for _ in range(10):
        st, _ = plateau_update(st, 2.0, sched, 1.0)
    assert learning_rate(sched, 1.0, 0, 1, 10, st) == pytest.approx(0.2)

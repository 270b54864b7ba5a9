"""The quickstart workflow: step order, resume, verdict handling, and its fit config's twin."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from mlipctl import commands
from mlipctl.config.fit import FitConfig
from mlipctl.config.quickstart import QuickstartConfig
from mlipctl.reports.base import Criterion, Report
from mlipctl.workflows import quickstart as Q

ROOT = Path(__file__).resolve().parents[1]
_PRODUCTS = {
    "generate": "structures.extxyz",
    "label": "labelled.extxyz",
    "fit": "model.mlip",
}


def _fake_steps(monkeypatch, *, validate_passes: bool, calls: list[str]) -> None:
    """Replace every step's runner by one that writes the file the next step reads."""

    real_get = commands.get_command

    def fake(name: str):
        real = real_get(name)

        def run(cfg, *, resume: bool = False, progress: bool = True) -> Report:
            calls.append(name)
            out = Path(cfg.output)
            out.mkdir(parents=True, exist_ok=True)
            if name in _PRODUCTS:
                (out / _PRODUCTS[name]).write_text("x")
            crit = []
            if name == "validate":
                err = 0.01 if validate_passes else 0.3
                crit = [Criterion.at_most("formation_abs_error", err, 0.05, "eV")]
            return Report(command=name, config=cfg.model_dump(mode="json"), criteria=crit)

        return SimpleNamespace(config_class=real.config_class, run=run)

    monkeypatch.setattr(Q.commands, "get_command", fake)


@pytest.mark.parametrize("passes", [True, False])
def test_full_scale_judges_validation(tmp_path, monkeypatch, passes):
    calls: list[str] = []
    _fake_steps(monkeypatch, validate_passes=passes, calls=calls)
    report = Q.run_quickstart(QuickstartConfig(output=str(tmp_path)), progress=False)
    assert calls == ["generate", "label", "fit", "validate"]
    assert report.passed is passes
    assert [c.name for c in report.criteria] == ["validate.formation_abs_error"]
    assert any("validate failed" in m for m in report.messages) is not passes


def test_ci_scale_reports_but_does_not_judge_validation(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_steps(monkeypatch, validate_passes=False, calls=calls)
    report = Q.run_quickstart(QuickstartConfig(output=str(tmp_path), scale="ci"), progress=False)
    assert calls[-1] == "validate" and report.passed
    assert report.results["validate"]["formation_abs_error"] == 0.3
    assert any("not judged" in m and "fails" in m for m in report.messages)


def test_until_stops_and_finished_steps_are_reused(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_steps(monkeypatch, validate_passes=True, calls=calls)
    cfg = QuickstartConfig(output=str(tmp_path), until="label")
    first = Q.run_quickstart(cfg, progress=False)
    assert calls == ["generate", "label"] and first.passed
    assert any("nothing was validated" in m for m in first.messages)
    again = Q.run_quickstart(cfg, progress=False)
    assert calls == ["generate", "label"]  # both reused, not rerun
    assert sum("reused" in m for m in again.messages) == 2
    assert not (tmp_path / "fit").exists()


def test_fit_emt_cu_config_is_the_quickstart_fit():
    """configs/fit-emt-cu.yaml is the quickstart's fit step, written out for users to edit."""
    shipped = yaml.safe_load((ROOT / "configs" / "fit-emt-cu.yaml").read_text())
    step = Q.step_configs(QuickstartConfig())["fit"]
    for key in ("name", "output"):
        shipped.pop(key), step.pop(key)
    shipped["data"].pop("path"), step["data"].pop("path")
    assert shipped == step


@pytest.mark.parametrize(("epochs", "stage_two"), [(1, False), (2, True)])
def test_fit_step_is_a_valid_fit_config_at_any_epoch_count(epochs, stage_two):
    """A one-epoch smoke fit has no stage two (it would never start, which the schema rejects)."""
    step = Q.step_configs(QuickstartConfig(max_epochs=epochs))["fit"]
    cfg = FitConfig.model_validate(step)
    assert (cfg.training.stage_two is not None) is stage_two


@pytest.mark.slow
def test_full_quickstart_passes_its_vacancy_validation(tmp_path):
    """The README's main job, for real: configs/fit-emt-cu.yaml's fit passes against EMT (~10 min)."""
    report = Q.run_quickstart(QuickstartConfig(output=str(tmp_path)), progress=False)
    failed = [(c.name, c.value) for c in report.criteria if not c.passed]
    assert report.passed, failed
    assert report.results["validate"]["vacancy.formation_abs_error"] <= 0.05


def test_cutoff_follows_the_neighbour_shells():
    """Cu keeps 5 Å; Al's longer bonds get a longer cutoff (its third shell sits at 4.96 Å)."""
    assert Q.default_cutoff("Cu") == 5.0
    assert Q.default_cutoff("Al") == pytest.approx(5.6)
    fit = Q.step_configs(QuickstartConfig(element="Al"))["fit"]
    assert fit["model"]["architecture"]["cutoff"] == pytest.approx(5.6)
    fit = Q.step_configs(QuickstartConfig(element="Al", cutoff=4.5))["fit"]
    assert fit["model"]["architecture"]["cutoff"] == 4.5


def test_unknown_element_is_a_config_error():
    """The default cutoff reads the element's crystal before any step runs: validate it first."""
    with pytest.raises(ValueError, match="'Xx' is not a chemical element symbol"):
        QuickstartConfig(element="Xx")

"""Calibration plots are written atomically as valid PNGs."""

from __future__ import annotations

import numpy as np
import pytest

from mlipctl.errors import UserInputError
from mlipctl.uncertainty import calibration as C
from mlipctl.uncertainty import plots as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_reliability_and_rmse_vs_rmv_pngs(tmp_path):
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.01, 0.2, 3000)
    r = 2.0 * sigma * rng.normal(size=3000)
    cal = C.fit_scale(r, sigma, finite_ensemble_correction=False)
    sigmas = {"raw": sigma, "calibrated": cal.apply(sigma)}
    out = tmp_path / "plots"
    a = P.plot_reliability(out / "reliability.png", r, sigmas)
    b = P.plot_rmse_vs_rmv(out / "rmse_vs_rmv.png", r, sigmas, n_bins=8, unit="eV/Å")
    for path in (a, b):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert sorted(p.name for p in out.iterdir()) == ["reliability.png", "rmse_vs_rmv.png"]


def test_plot_errors_are_named(tmp_path):
    with pytest.raises(UserInputError, match="at least one"):
        P.plot_reliability(tmp_path / "x.png", np.ones(3), {})
    with pytest.raises(UserInputError, match="<= 0"):
        P.plot_rmse_vs_rmv(tmp_path / "x.png", np.ones(3), {"raw": np.zeros(3)}, n_bins=2)
    assert not (tmp_path / "x.png").exists()

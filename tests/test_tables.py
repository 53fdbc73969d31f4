"""Issue 21 item 3: DataFrames of trajectories and certificate sets, and the HTML Jupyter shows
for a certificate and a flow result — every cell the object's own number."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import rayleighflow as rf

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def run():
    x = torch.linspace(-1, 1, 10, dtype=torch.float64).unsqueeze(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 1)).double()
    problem = rf.Problem(rf.Model(net), rf.Dataset.from_arrays(x, torch.sin(3 * x)), "square")
    return rf.gradient_flow(problem, rf.Dopri5(), t_max=20.0, records=rf.LogSpaced(12))


def test_trajectory_frames_equal_the_records_and_the_log(run):
    traj = run.trajectory
    frame = traj.to_pandas()
    assert list(frame.columns) == traj.columns and len(frame) == len(traj)
    for c in ("t", "loss", "grad_sq", "rayleigh"):
        np.testing.assert_array_equal(frame[c].to_numpy(), traj[c])
    assert frame.attrs["meta"]["integrator"] == traj.meta["integrator"]
    ev = traj.to_pandas(evaluations=True)
    np.testing.assert_array_equal(ev["t"].to_numpy(), traj.evaluations["t"])
    assert set(ev.columns) == {"t", "loss", "grad_sq", "fgrad_sq"}


def test_certificate_frames(run):
    log, rec = rf.certify(run.trajectory, "log"), rf.certify(run.trajectory, "reciprocal")
    table = rf.certificates_frame([("first", log), rec])
    assert list(table.index) == ["first", rec.desingularizer.name]
    assert table.loc["first", "mu"] == log.mu and table.loc["first", "status"] == "holds"
    assert table.loc["first", "bound_final"] == log.bound_final
    points = log.to_pandas()
    np.testing.assert_array_equal(points["bound"].to_numpy(), log.bound)
    np.testing.assert_array_equal(points["loss"].to_numpy(), log.loss)
    assert points.attrs["describe"] == log.describe()


def test_html_shows_the_objects_own_numbers(run):
    cert = rf.certify(run.trajectory, "log")
    page = cert._repr_html_()
    assert f"{cert.mu:.4g}" in page and cert.scope.value in page and "<table>" in page
    flow = run._repr_html_()
    assert run.status.value in flow and str(run.n_grad_evals) in flow
    assert "adaptive Runge–Kutta" in flow


def test_without_pandas_the_error_names_the_fix(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        run.trajectory.to_pandas()

"""The command line's thread default: one thread for small problems, --threads to override,
OMP_NUM_THREADS kept, library calls untouched."""

from __future__ import annotations

import json

import pytest
import torch

from rayleighflow.cli import main
from rayleighflow.experiments.threads import SMALL_WORK, choose_threads, cli_threads


def test_small_problems_get_one_thread_and_large_ones_torch_s_default():
    count, line = choose_threads(100, SMALL_WORK // 100 - 1, environ={}, default=8)
    assert count == 1 and "small problem" in line and "--threads N" in line
    count, line = choose_threads(100, SMALL_WORK // 100, environ={}, default=8)
    assert count == 8 and "torch's default" in line


def test_omp_num_threads_in_the_environment_is_kept_and_explicit_counts_win():
    count, line = choose_threads(10, 10, environ={"OMP_NUM_THREADS": "3"}, default=8,
                                 current=3)
    assert count == 3 and "OMP_NUM_THREADS=3" in line
    assert choose_threads(10, 10, 4, environ={"OMP_NUM_THREADS": "3"}, default=3)[0] == 4
    assert choose_threads(10**6, 10**6, 0, environ={}, default=5)[0] == 5
    with pytest.raises(ValueError, match="not auto, 0 or a count"):
        choose_threads(10, 10, -2, environ={})


def test_cli_threads_restores_the_count_after_the_block():
    before = torch.get_num_threads()
    with cli_threads(2):
        pass
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads, expected", [("auto", 1), ("2", 2)])
def test_run_says_and_records_the_thread_count(tmp_path, capsys, monkeypatch, threads,
                                               expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    out = tmp_path / "run"
    assert main(["run", "demo", "--quick", "--out", str(out), "--threads", threads]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threads"]["count"] == expected
    assert f"threads: {expected}" in printed and summary["threads"]["lines"][0] in printed
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", ["x", "-1", "1.5"])
def test_a_bad_thread_count_is_one_usage_line(capsys, bad):
    with pytest.raises(SystemExit) as exc:
        main(["run", "demo", "--quick", "--threads", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--threads" in err

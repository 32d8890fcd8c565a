"""Every reproduction of the paper, run as a user runs it (``iif-ref reproduce NAME``, from
an empty folder, no ``--out``) at its hidden ``--smoke`` size: it exits 0, writes
``./results/NAME.json`` and one number in it is sane. The sizes carry no statistical
meaning; the point is that no reproduction can break unnoticed.
"""
import json
import math

import pytest

from iif_ref import cli
from iif_ref.reproduce import PAPER
from iif_ref.reproduce._output import CACHE_DIR_ENV

# figure1 has no size to reduce: its full computation takes about a second.
ARGV = {"figure1": [], "table1": ["--smoke", "--no-progress"],
        "table4": ["--smoke", "--no-progress"]}


def _table(meta, rows):
    # Exact IIF's completeness inside every trial (the tolerance of
    # test_reproduction_linear.test_exact_iif_completeness_inside_protocol).
    assert all(s["completeness_residual_max"] < 1e-11 for s in meta["per_setting"].values())
    assert all(-1 <= r["all_mean"] <= 1 for r in rows if r["method"] != "ceiling")


def _figure1(meta, rows):
    # A is fitted exactly, so IF(A → B) is rounding-level while IIF(A → B) is not.
    s = meta["summary"]
    assert abs(s["IF_A_to_B"]) < 1e-11 and abs(s["IIF_A_to_B"]) > 0.01 * abs(s["delta_B"])


def _table2(meta, rows):
    assert meta["n_tune"] + meta["n_eval"] == meta["n_subsets"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["lds"]["mean"] is None or -1 <= r["lds"]["mean"] <= 1, r["method"]


def _table3(meta, rows):
    assert meta["replicates"][0]["n_flipped"] == round(meta["fraction"] * meta["n_train"])
    for r in rows:
        assert r["error"] is None and 0 <= r["auc"]["mean"] <= 1, r["method"]


def _figure2(meta, rows):
    # float32 softmax: ten probabilities, each rounded to ~6e-8 relative.
    assert math.isclose(sum(meta["test_probabilities"]), 1.0, abs_tol=1e-5)
    assert [r["method"] for r in rows] == ["if", "tracin", "trak", "iif"]
    iif = rows[-1]
    # The two baselines of Sec. 3.2 move the test loss in opposite directions.
    assert iif["delta_unlearned"] < 0 < iif["delta_learned"]


CHECK = {"table1": _table, "table4": _table, "figure1": _figure1, "table2": _table2,
         "table3": _table3, "figure2": _figure2}


@pytest.mark.parametrize("name", PAPER)
def test_reproduction_runs_from_an_empty_folder_into_results(name, tmp_path, monkeypatch):
    if name in ("table2", "table3", "figure2"):
        pytest.importorskip("torch", reason="the neural reproductions need torch")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    assert cli.main(["reproduce", name, *ARGV.get(name, ["--smoke"])]) == 0
    out = json.loads((work / "results" / f"{name}.json").read_text())
    CHECK[name](out["meta"], out["rows"])
    assert sorted(p.name for p in work.iterdir()) == ["results"]
    if name in ("figure1", "figure2"):
        assert (work / "results" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

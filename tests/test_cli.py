"""``iif-ref reproduce``: its help, one output flag, and quick runs that leave the record alone."""
from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iif_ref import cli

REPRODUCE = Path(importlib.import_module("iif_ref.reproduce").__file__).parent


def _load(name):
    return importlib.import_module(f"iif_ref.reproduce.{name}")


def _reproduce_parser():
    return cli._reproduce_parser(argparse.ArgumentParser().add_subparsers())


def test_reproduce_help_gives_usage_options_and_a_sentence_per_reproduction(capsys):
    assert cli.main(["reproduce", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: iif-ref reproduce [-h] [--list] NAME")
    flat = " ".join(out.split())
    paper = cli.paper_reproductions()
    assert list(paper) == ["table1", "table2", "table3", "table4", "figure1", "figure2"]
    for name, path in {**paper, **cli.checkout_scripts()}.items():
        description = cli.describe(path)
        # A complete sentence: the docstring's whole first paragraph, not its first line.
        assert description.endswith("."), (name, description)
        assert f"{name} {description}" in flat, name
    # The paper's tables and figures come first, the checkout's benchmarks apart after.
    if cli.checkout_scripts():
        assert flat.index("figure2 ") < flat.index("benchmarks and sweeps of this source")
    assert all(action.help for action in _reproduce_parser()._actions)


def test_reproduce_list_separates_the_paper_from_benchmarks(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("the paper's tables and figures: "
                        "table1, table2, table3, table4, figure1, figure2")
    if cli.checkout_scripts():
        assert lines[1].startswith("benchmarks and sweeps of this source checkout: bench_")
        assert "table1" not in lines[1]


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "table4", "figure1", "figure2"])
def test_each_reproductions_own_help_describes_it_in_whole_sentences(name, capsys):
    assert cli.main(["reproduce", name, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert cli.describe(cli.paper_reproductions()[name]) in out


def test_version_and_python_m(capsys):
    import iif_ref
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"iif-ref {iif_ref.__version__}"
    run = subprocess.run([sys.executable, "-m", "iif_ref", "--version"], capture_output=True,
                         text=True, check=True)
    assert run.stdout.strip() == f"iif-ref {iif_ref.__version__}"


def test_a_missing_optional_package_names_its_extra_before_any_work(capsys, monkeypatch,
                                                                    tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if not installed
    assert cli.main(["reproduce", "figure1"]) == 1
    err = capsys.readouterr().err
    assert "figure1 needs matplotlib" in err and "[plots]" in err
    assert not (tmp_path / "results").exists()             # failed before computing


def test_require_names_the_extra_and_passes_other_import_errors(monkeypatch):
    from iif_ref._optional import MissingDependencyError, require
    for name in ("sklearn", "sklearn.metrics"):   # as if not installed, imported or not
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"needs scikit-learn.*\[data\]"):
        require("sklearn.metrics", "x")
    # A missing module *inside* an installed package is not a missing extra.
    with pytest.raises(ModuleNotFoundError) as exc:
        require("numba.no_such_module_here", "x")
    assert not isinstance(exc.value, MissingDependencyError)


def test_reproduce_name_help_shows_that_reproductions_options(capsys):
    assert cli.main(["reproduce", "figure1", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: iif-ref reproduce figure1") and "--out DIR" in out


@pytest.mark.parametrize("argv, message", [
    (["table2", "--replot", "missing.json"], "--replot: no results file missing.json"),
    (["table1", "--jobs", "0"], "--jobs must be >= 1, got 0")])
def test_a_reproductions_error_message_reaches_the_user(argv, message, capsys, tmp_path,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["reproduce"] + argv) == 1
    assert message in capsys.readouterr().err


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "table4", "figure1", "figure2"])
def test_every_option_of_the_paper_reproductions_has_help_text(name, monkeypatch):
    module = _load(name)
    seen = []

    def capture(self, *args, **kwargs):  # the parser main() builds, stopped before any work
        seen.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        module.main([])
    missing = [a.option_strings for a in seen[0]._actions
               if a.help is None or (a.help != argparse.SUPPRESS and not a.help.strip())]
    assert missing == []


def test_every_reproduction_takes_its_output_location_as_out():
    for name, path in cli.paper_reproductions().items():
        text = path.read_text()
        if "run_table(" in text:  # table1/table4: the shared linear protocol's parser
            text = (REPRODUCE / "_linear_protocol.py").read_text()
        assert re.search(r"add_out_argument\(", text), name
    assert re.search(r"add_argument\(\"--out\"", (REPRODUCE / "_output.py").read_text())


def test_figure1_quick_run_writes_the_working_folders_results_only(tmp_path, monkeypatch):
    figure1 = _load("figure1")
    monkeypatch.chdir(tmp_path)
    assert figure1.main([]) == 0
    scratch = tmp_path / "results"
    assert json.loads((scratch / "figure1.json").read_text())["meta"]["reproduction"] == "figure1"
    assert (scratch / "figure1.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


@pytest.mark.parametrize("argv, checkout, where", [
    ([], True, "cwd"), ([], False, "cwd"), (["--full"], True, "published"),
    (["--full"], False, "cwd"), (["--out", "X"], True, "X"), (["--full", "--out", "X"], True, "X"),
    (["--results-dir", "X"], False, "X")])
def test_only_full_from_a_checkout_writes_the_record(argv, checkout, where, tmp_path,
                                                    monkeypatch, capsys):
    from iif_ref import _resources
    from iif_ref.reproduce import _output
    root = tmp_path / "checkout"
    monkeypatch.setattr(_resources, "source_checkout", lambda: root if checkout else None)
    monkeypatch.chdir(tmp_path)
    figure2 = _load("figure2")
    expected = {"cwd": tmp_path / "results", "published": root / "docs" / "results",
                "X": Path("X")}[where]
    assert figure2.parse_args(argv).out == expected
    # From an installed package --full says where it writes instead.
    assert ("not run from a source checkout" in capsys.readouterr().err) == (
        argv == ["--full"] and not checkout)
    assert _output.published_dir() == (root / "docs" / "results" if checkout else None)


def test_caches_stay_out_of_the_installed_package(tmp_path, monkeypatch):
    from iif_ref import _resources
    from iif_ref.reproduce import _output
    monkeypatch.delenv(_output.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(_resources, "source_checkout", lambda: None)
    assert _output.cache_dir("table2") == tmp_path / "xdg" / "iif_ref" / "table2"
    monkeypatch.setattr(_resources, "source_checkout", lambda: tmp_path / "co")
    assert _output.cache_dir("table2") == tmp_path / "co" / ".iif_cache" / "table2"
    monkeypatch.setenv(_output.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert _output.cache_dir("table2") == tmp_path / "env" / "table2"


def test_figure2_progress_only_on_a_terminal(monkeypatch):
    figure2 = _load("figure2")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert figure2.parse_args([]).progress is True
    assert figure2.parse_args(["--no-progress"]).progress is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert figure2.parse_args([]).progress is False

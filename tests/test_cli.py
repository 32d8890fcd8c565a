"""``iif-ref reproduce``: its help, one output flag, and quick runs that leave the record alone."""
from __future__ import annotations

import argparse
import importlib
import json
import re
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
    reproductions = cli._reproductions()
    assert {"table1", "table4", "figure1", "figure2"} <= set(reproductions)
    for name, path in reproductions.items():
        description = cli.describe(path)
        # A complete sentence: the docstring's whole first paragraph, not its first line.
        assert description.endswith("."), (name, description)
        assert f"{name} {description}" in flat, name
    assert all(action.help for action in _reproduce_parser()._actions)


def test_reproduce_name_help_shows_that_reproductions_options(capsys):
    assert cli.main(["reproduce", "figure1", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: iif-ref reproduce figure1") and "--out DIR" in out


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
    for name, path in cli._reproductions().items():
        text = path.read_text()
        if "run_table(" in text:  # table1/table4: the shared linear protocol's parser
            text = (REPRODUCE / "_linear_protocol.py").read_text()
        elif "add_out_argument(" in text:
            text = (REPRODUCE / "_neural_protocol.py").read_text()
        assert re.search(r"add_argument\(\s*\"--out\"", text), name


def test_figure1_quick_run_writes_the_scratch_folder_only(tmp_path, monkeypatch):
    figure1 = _load("figure1")
    published, scratch = tmp_path / "docs_results", tmp_path / "results"
    monkeypatch.setattr(figure1, "DEFAULT_OUT", published)
    monkeypatch.setattr(figure1, "QUICK_OUT", scratch)
    assert figure1.main([]) == 0
    assert not published.exists()
    assert json.loads((scratch / "figure1.json").read_text())["meta"]["reproduction"] == "figure1"
    assert (scratch / "figure1.png").is_file()


@pytest.mark.parametrize("argv, where", [
    ([], "quick"), (["--full"], "published"), (["--out", "X"], "X"),
    (["--full", "--out", "X"], "X"), (["--results-dir", "X"], "X")])
def test_figure2_writes_the_record_only_with_full(argv, where, tmp_path, monkeypatch):
    figure2 = _load("figure2")
    proto = importlib.import_module("iif_ref.reproduce._neural_protocol")
    expected = {"quick": proto.QUICK_OUT, "published": proto.RESULTS_DIR, "X": Path("X")}[where]
    assert figure2.parse_args(argv).out == expected
    assert proto.QUICK_OUT != proto.RESULTS_DIR


def test_figure2_progress_only_on_a_terminal(monkeypatch):
    figure2 = _load("figure2")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert figure2.parse_args([]).progress is True
    assert figure2.parse_args(["--no-progress"]).progress is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert figure2.parse_args([]).progress is False

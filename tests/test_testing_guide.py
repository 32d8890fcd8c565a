"""The code in docs/testing-guide.md runs and its assertions hold."""
import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "testing-guide.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)


def test_guide_examples_run_and_catch_the_wrong_declaration(capsys):
    blocks = _blocks()
    assert len(blocks) == 3
    ns = {}
    exec(compile(blocks[0], str(GUIDE), "exec"), ns)   # asserts inside the example
    out = capsys.readouterr().out
    assert "sign flip and the mean normalisation" in out
    assert ns["report"].passed and not ns["wrong"].passed

    # The pytest and hypothesis examples: the parametrised checks all pass, and the
    # hypothesis property holds (run with the profile from conftest).
    exec(compile(blocks[1], str(GUIDE), "exec"), ns)
    mark = ns["test_conformance"].pytestmark[0]
    for attributor, check in mark.args[1]:
        check(attributor)
    exec(compile(blocks[2], str(GUIDE), "exec"), ns)
    ns["test_my_influence_on_random_problems"]()

"""The code of docs/user-guide.md runs as written (its blocks, in order, in one namespace)."""
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "user-guide.md"


def test_user_guide_example_runs():
    pytest.importorskip("sklearn", reason="the example uses sklearn.datasets.load_digits")
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 4, "the user guide lost its example"
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE.name}[block {i}]", "exec"), namespace)
    # The example's own checks ran; its main result is there and well formed.
    assert namespace["result"].scores.shape == (5, 200)
    assert namespace["si"].mislabel_score.shape == (200,)

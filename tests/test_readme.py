"""The README's commands and examples are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_commands = [b.strip() for b in _bash_blocks(readme) if "pytest" in b]
    assert test_commands, "README has no test command"
    assert test_commands[0] in ci


def test_readme_python_example_runs_and_prints_what_it_claims(capsys):
    """The example seeds itself and each `print(...)  # text` line prints that text."""
    readme = (ROOT / "README.md").read_text()
    (example,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "mnist_cnn4" in b
    ]
    claimed = re.findall(r"^print\(.*\)\s+#\s+(.+)$", example, flags=re.M)
    claimed = [c for c in claimed if not c.startswith("per-layer")]
    assert len(claimed) == 4, claimed
    torch.manual_seed(12345)  # the example must not depend on the caller's RNG state
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    position = 0
    for text in claimed:  # in order, each claimed line is printed verbatim
        assert text in printed[position:], (text, printed)
        position = printed.index(text, position) + 1
    assert namespace["r"].certified and namespace["e"].certified
    assert not namespace["s"].certified
    assert namespace["lb"].kind == "lower"
    assert namespace["lb"].value <= namespace["r"].value

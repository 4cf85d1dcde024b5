"""Prints the soundness harness's per-family table at the end of the run."""

from __future__ import annotations

from typing import Any

from tests.soundness.harness import summary_lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = summary_lines()
    if lines:
        terminalreporter.section("lipreg soundness harness")
        for line in lines:
            terminalreporter.write_line(line)

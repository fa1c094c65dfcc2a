"""What the faults tests check of every refusal: one line on stderr, exit 2, and the files left as they were."""

from __future__ import annotations

from pathlib import Path

from rlhfkit.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: equal before and after means nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, argv: list[str]) -> str:
    """``rlhfkit ARGV``: exit 2, one ``rlhfkit: error:`` line, no traceback; returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    (line,) = lines
    assert line.startswith("rlhfkit: error: ")
    return line

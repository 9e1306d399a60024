"""README.md's fresh-machine commands are what CI runs (.ci/run), word for word."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh_machine_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## On a fresh machine", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_ci_runs_the_readme_commands():
    lines = _fresh_machine_block()
    assert lines[:2] == [
        "python3 -m venv .venv && . .venv/bin/activate",
        'pip install torch==2.13.0 setuptools wheel ninja && pip install --no-build-isolation -e ".[test,bench,examples]"',
    ] and lines[2:] == ["python -m bench", "python -m pytest"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for line in lines[:2] + ["python -m pytest"]:
        assert line in ci, f"README's {line!r} is not in .ci/run"
    assert any(line.startswith("python -m bench") for line in ci)

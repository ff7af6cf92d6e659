"""README's two commands stay true: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sh_blocks(text: str) -> list[str]:
    parts = text.split("```sh\n")[1:]
    return [p.split("```")[0].strip() for p in parts]


def test_ci_runs_the_readme_test_command():
    blocks = _sh_blocks((ROOT / "README.md").read_text())
    install_and_chat, install_and_test = blocks[0], blocks[1]
    assert "ktx chat" in install_and_chat
    test_cmd = install_and_test.split("&& ", 2)[-1]  # after venv creation and activation
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), f"{test_cmd!r} not a line of .ci/run"
    assert "pytest" in test_cmd

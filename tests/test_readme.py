"""The README's library example runs as written (keeps the front page true)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs():
    text = README.read_text()
    code = re.search(r"## The library\n\n```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("    ...", "    model.eval()(torch.randn(2, 3, 32, 32))")  # fill the placeholder block
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["y"].shape == (8, 64, 16, 16)
    assert set(namespace["rec"].aux_losses) == {"kl"}
    assert len(namespace["moecnn"].moe_layers(namespace["tv"])) == 1


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = re.search(r'pip install -e "\.\[test\]" && (python -m pytest[^\n`]*)', text).group(1).strip()
    assert test_cmd in ci, f"README test command '{test_cmd}' is not what .ci/run runs"

"""Repository hygiene: BUILD lists every file; CI runs README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _build_srcs():
    return set(re.findall(r'"((?:tkfac_tf|tests|examples)/[^"*]+\.py)"', (ROOT / "BUILD").read_text()))


def test_every_module_example_and_test_is_in_build():
    listed = _build_srcs()
    files = {
        str(path.relative_to(ROOT))
        for pattern in ("tkfac_tf/**/*.py", "tests/*.py", "examples/*.py")
        for path in ROOT.glob(pattern)
    }
    missing = sorted(files - listed)
    assert not missing, f"Add these files to BUILD: {missing}"
    stale = sorted(listed - files)
    assert not stale, f"BUILD lists files that do not exist: {stale}"


def test_every_test_file_has_a_py_test_target():
    text = (ROOT / "BUILD").read_text()
    for path in ROOT.glob("tests/test_*.py"):
        assert f'name = "{path.stem}"' in text, f"BUILD needs a py_test named {path.stem}"


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_readme_starts_with_two_commands_and_ci_runs_the_test_one():
    main_job, test_command = _readme_commands()
    assert "pip install" in main_job and "python" in main_job
    assert "pip install" in test_command and "pytest" in test_command
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci_script, "'.ci/run' must run README's test command verbatim"

"""The README's test command is exactly what CI runs, and its documented programs exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                  if line.startswith("python3 -m venv")][0]
    assert ci_command in (ROOT / "README.md").read_text()


def test_every_console_script_in_the_readme_is_in_programs_txt():
    programs = {line.split()[1] for line in (ROOT / "programs.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    mentioned = set(re.findall(r"\b(icnet-[a-z-]+)\b", (ROOT / "README.md").read_text()))
    mentioned.discard("icnet-ros")  # the pip distribution, as in `pip install icnet-ros[tensorrt]`
    assert mentioned <= programs, mentioned - programs


def test_readme_tables_of_parameters_and_launch_arguments_are_the_generated_ones():
    """Regenerate with `python -m icnet_ros.ros.node_config` and `python -m icnet_ros.ros.launch_plan`."""
    from icnet_ros.ros.launch_plan import arguments_markdown
    from icnet_ros.ros.node_config import parameters_markdown

    readme = (ROOT / "README.md").read_text()
    assert parameters_markdown() in readme
    assert arguments_markdown() in readme

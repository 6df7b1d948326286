"""pip build of icnet_ros. colcon builds the same tree through CMakeLists.txt (ament_cmake).

Console scripts come from programs.txt, which CMakeLists.txt reads too. Configuration, launch files
and message definitions install to <prefix>/share/icnet_ros/, the same place a colcon install
puts them, so icnet_ros.paths finds them the same way under both install paths.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def console_scripts():
    scripts = []
    for line in (ROOT / "programs.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        _ros_name, console_name, entry_point = line.split()
        if console_name != "-":
            scripts.append(f"{console_name} = {entry_point}")
    return scripts


def share_files():
    """(install dir, [files]) pairs for everything under config/, launch/ and msg/."""
    groups = {}
    for top in ("config", "launch", "msg"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(ROOT)
                groups.setdefault(f"share/icnet_ros/{rel.parent.as_posix()}", []).append(rel.as_posix())
    groups["share/icnet_ros"] = ["package.xml", "programs.txt"]
    return sorted(groups.items())


setup(
    packages=find_packages(include=["icnet_ros", "icnet_ros.*"]),
    package_data={"icnet_ros": ["assets/*"]},
    data_files=share_files(),
    entry_points={"console_scripts": console_scripts()},
)

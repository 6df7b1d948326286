"""package.xml is a valid ament_cmake interface package, and programs.txt agrees with setup.py."""
from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
from catkin_pkg.package import parse_package

REPO_ROOT = Path(__file__).resolve().parents[1]


def read_programs() -> list[tuple[str, str, str]]:
    """(ros_name, console_name, module:function) rows of programs.txt."""
    rows = []
    for line in (REPO_ROOT / "programs.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            fields = line.split()
            assert len(fields) == 3, f"programs.txt row {line!r} must have 3 columns"
            rows.append(tuple(fields))
    return rows


def setup_console_scripts() -> list[str]:
    """setup.py's own console_scripts() list, with setuptools.setup() stubbed so nothing is built."""
    with mock.patch("setuptools.setup"):
        namespace = runpy.run_path(str(REPO_ROOT / "setup.py"), run_name="setup_under_test")
    return namespace["console_scripts"]()


PROGRAMS = read_programs()


@pytest.fixture(scope="module")
def package():
    parsed = parse_package(str(REPO_ROOT / "package.xml"))
    parsed.validate()  # raises InvalidPackage, e.g. for a maintainer email catkin_pkg rejects
    return parsed


def test_package_is_an_ament_cmake_interface_package(package):
    assert package.name == "icnet_ros"
    assert package.package_format == 3
    assert package.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in [group.name for group in package.member_of_groups]
    assert "rosidl_default_generators" in [dep.name for dep in package.buildtool_depends]
    assert "rosidl_default_runtime" in [dep.name for dep in package.exec_depends]


def test_message_dependencies_are_declared(package):
    """Every package a msg/*.msg field refers to must be a dependency, or rosidl cannot find it."""
    depends = {dep.name for dep in package.build_depends + package.exec_depends}
    for path in (REPO_ROOT / "msg").glob("*.msg"):
        for line in path.read_text().splitlines():
            field_type = line.split("#")[0].split()[0] if line.split("#")[0].strip() else ""
            if "/" in field_type:
                assert field_type.split("/")[0] in depends, f"{path.name}: {field_type} not in package.xml"


def test_programs_are_unique_and_well_formed():
    ros_names = [row[0] for row in PROGRAMS]
    console_names = [row[1] for row in PROGRAMS if row[1] != "-"]
    assert len(set(ros_names)) == len(ros_names)
    assert len(set(console_names)) == len(console_names)
    for _ros_name, _console, entry_point in PROGRAMS:
        module, _, function = entry_point.partition(":")
        assert module.startswith("icnet_ros.") and function.isidentifier(), entry_point
    assert ("make_bag", "icnet-make-bag", "icnet_ros.bags.make_bag:main") in PROGRAMS


def test_every_program_is_a_setup_py_console_script():
    scripts = setup_console_scripts()
    for _ros_name, console_name, entry_point in PROGRAMS:
        if console_name != "-":
            assert f"{console_name} = {entry_point}" in scripts


@pytest.mark.parametrize("entry_point", [row[2] for row in PROGRAMS if row[1] != "-"])
def test_non_ros_entry_points_import(entry_point):
    module_name, function_name = entry_point.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    assert callable(function)


# Python modules that rosdep installs under another key.
PYTHON_ROSDEP_KEYS = {"numpy": "python3-numpy", "cv2": "python3-opencv", "yaml": "python3-yaml",
                      "tqdm": "python3-tqdm"}
ROS_PACKAGES_IMPORTED_AT_RUNTIME = ("icnet_ros/ros/node.py", "launch/segment.launch.py", "icnet_ros/paths.py",
                                    "icnet_ros/ros/launch_plan.py", "icnet_ros/ros/ros_bench.py")


@pytest.mark.parametrize("source", ROS_PACKAGES_IMPORTED_AT_RUNTIME)
def test_every_ros_package_the_node_and_launch_file_import_is_a_dependency(package, source):
    """rosdep installs only what package.xml names; a missing one fails on a user's robot, not here."""
    import ast

    depends = {dep.name for dep in package.exec_depends + package.build_export_depends}
    depends |= {dep.name for dep in package.build_depends if dep in package.exec_depends}
    depends |= {dep.name for dep in getattr(package, "depends", [])}
    tree = ast.parse((REPO_ROOT / source).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
    not_ros = {"icnet_ros", "torch", *sys.stdlib_module_names}
    ros_packages = imported - not_ros
    assert ros_packages, source
    missing = {name for name in ros_packages if PYTHON_ROSDEP_KEYS.get(name, name) not in depends}
    assert not missing, f"{source} imports {sorted(missing)}, which package.xml does not declare"

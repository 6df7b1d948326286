"""Where icnet_ros finds its shared files (config/, launch/, msg/) under every install path.

A source checkout keeps them beside the package; `pip install` and `colcon build` both put them in
<prefix>/share/icnet_ros/. Nothing here imports ROS, but a ROS environment's ament index is used
when present so that overlays resolve as ROS users expect.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

PACKAGE_NAME = "icnet_ros"
PACKAGE_DIR = Path(__file__).resolve().parent
SHARE_ENV_VAR = "ICNET_ROS_SHARE"


def _candidate_share_dirs() -> list[Path]:
    candidates = []
    if os.environ.get(SHARE_ENV_VAR):
        candidates.append(Path(os.environ[SHARE_ENV_VAR]))
    source_root = PACKAGE_DIR.parent
    if (source_root / "package.xml").is_file():  # a source checkout or an editable install
        candidates.append(source_root)
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE_NAME)))
    except Exception:  # not a ROS environment, or the package is not in the ament index
        pass
    for ancestor in PACKAGE_DIR.parents:  # <prefix>/lib/pythonX.Y/site-packages/icnet_ros
        candidates.append(ancestor / "share" / PACKAGE_NAME)
    return candidates


@lru_cache(maxsize=1)
def share_dir() -> Path:
    """The folder holding config/, launch/ and msg/; raises FileNotFoundError naming where it looked."""
    candidates = _candidate_share_dirs()
    for candidate in candidates:
        if (candidate / "config" / "classmaps").is_dir():
            return candidate
    looked = "\n  ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"icnet_ros cannot find its config/ folder. Looked in:\n  {looked}\n"
        f"Reinstall the package, or set {SHARE_ENV_VAR} to a folder that holds config/classmaps/."
    )


def config_dir() -> Path:
    return share_dir() / "config"


def asset_path(name: str) -> Path:
    """A file shipped inside the Python package (demo weights, the embedded drive)."""
    return PACKAGE_DIR / "assets" / name

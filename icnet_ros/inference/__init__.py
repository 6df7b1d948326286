"""ICNet inference without ROS: the segmentation engine, offline segmentation, benchmark, GPU check."""
from icnet_ros.inference.engine import Pending, Plan, Segmentation, SegmentationEngine, label_agreement
from icnet_ros.inference.frames import FrameError
from icnet_ros.inference.timing import StageTimings

__all__ = ["FrameError", "Pending", "Plan", "Segmentation", "SegmentationEngine", "StageTimings", "label_agreement"]

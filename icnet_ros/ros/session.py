"""The segmentation node's working parts between configure and cleanup, without ROS.

    create_engine(config)            configure: the checkpoint the settings select, on its device,
                                     prepared for the camera size (CUDA graphs, kernel tuning)
    SegmentationSession              the buffers, the processor, the publisher and their two threads:
        frame_arrived(...)           image callback: newest frame per camera, nothing else
        camera_info_arrived(...)     CameraInfo callback: kept to relay with the outputs
        start() / stop()             activate / deactivate
        set_config(config)           runtime parameter changes, picked up by the next frame

The node (node.py) only wires ROS topics, parameters and the lifecycle to these.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from icnet_ros.config import ConfigError
from icnet_ros.inference.engine import SegmentationEngine
from icnet_ros.inference.frames import CHANNEL_ORDERS
from icnet_ros.inference.graphs import DEFAULT_CAPACITY
from icnet_ros.inference.plan import weak_method
from icnet_ros.model.checkpoint import CheckpointError
from icnet_ros.model.icnet import BRANCHES
from icnet_ros.model.preprocess import parse_input_size
from icnet_ros.model.registry import ResolvedCheckpoint, resolve_checkpoint
from icnet_ros.ros.frame_buffer import IncomingFrame, LatestFrameBuffer
from icnet_ros.ros.health import HealthMonitor
from icnet_ros.ros.log_throttle import LogThrottle
from icnet_ros.ros.node_config import NodeConfig
from icnet_ros.ros.processor import IMAGE_OUTPUTS, OUTPUT_FLAGS, Demand, FrameProcessor, SegmentedFrame
from icnet_ros.ros.publisher import (
    CameraInfoCache,
    MessageTypes,
    ModelInfo,
    OutputPublisher,
    Publish,
    stamp_ns,
)
from icnet_ros.ros.topics import TopicError
from icnet_ros.ros.worker import BufferWorker

# What can go wrong at start-up, each with a message that says what to change.
STARTUP_ERRORS = (ConfigError, CheckpointError, TopicError, ValueError, RuntimeError, OSError)


def startup_error_message(error: BaseException) -> str:
    """One line for a start-up failure: a missing CUDA, a bad device or model, unreadable files."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, RuntimeError) and "cuda" in text.lower():
        return f"CUDA could not be used ({text}); check the driver and GPU, or set device:=cpu"
    return text


def create_engine(config: NodeConfig) -> tuple[SegmentationEngine, ResolvedCheckpoint]:
    """The engine for these settings, prepared for warmup_height x warmup_width when given."""
    checkpoint = resolve_checkpoint(config.model, config.model_dir, config.dataset, config.keep_rate)
    engine = SegmentationEngine.from_checkpoint(
        checkpoint.path, device=config.device, branch=config.branch, precision=config.precision,
        threads=config.cpu_threads or None, alpha=config.overlay_alpha, backend=config.backend,
        graph_cache_size=graph_cache_size(config), high_res_regions=config.high_res_regions)
    engine.input_size = parse_input_size(config.input_size, engine.config.input_size)
    warm_up(engine, config)
    return engine, checkpoint


def batch_sizes(config: NodeConfig) -> range:
    """The batches the node can hand the engine: the processor batches the frames waiting, one per
    camera at most, so any number from one to the number of cameras."""
    return range(1, len(config.image_topics) + 1)


def graph_cache_size(config: NodeConfig) -> int:
    """CUDA graph shapes to keep: every batch size the cameras can produce, in both channel orders and
    every branch (the branch may change at runtime), so that no frame ever waits for an eviction.
    Shapes are captured only when met or prepared: the bound costs nothing until used."""
    return max(DEFAULT_CAPACITY, len(batch_sizes(config)) * len(CHANNEL_ORDERS) * len(BRANCHES))


def warm_up(engine: SegmentationEngine, config: NodeConfig) -> None:
    """Prepare the engine for warmup_height x warmup_width (when given), every batch size the cameras
    can produce and both channel orders, so the first frame of each is as fast as the rest: at
    configure, and again at an activate after a deactivate released it."""
    if config.warmup_height and config.warmup_width:
        outputs = [name for name in IMAGE_OUTPUTS if getattr(config, OUTPUT_FLAGS[name])]
        for batch in batch_sizes(config):
            for channel_order in CHANNEL_ORDERS:  # the camera's encoding decides which one its frames use
                engine.prepare(config.warmup_height, config.warmup_width, batch=batch, channel_order=channel_order,
                               outputs=outputs)


class SegmentationSession:
    """Frames in, messages out, on two threads (see the module docstring)."""

    def __init__(self, engine: SegmentationEngine, config: NodeConfig, checkpoint: str | Path,
                 message_types: MessageTypes, publish: Publish, demand: Demand, clock_ns: Callable[[], int],
                 log: LogThrottle, reuse_messages: bool = True) -> None:
        topics = list(config.image_topics)
        self.engine = engine
        self.log = log
        self.health = HealthMonitor(topics, clock_ns())
        self.camera_infos = CameraInfoCache(len(topics))
        # the processor delivers through a weak method: session <-> processor would be a reference cycle,
        # keeping the engine (and its device memory) alive after cleanup until a later garbage collection
        self.processor = FrameProcessor(engine, config, weak_method(self._deliver), self.health, clock_ns, log,
                                        demand)
        self.publisher = OutputPublisher(message_types, publish, self.health, clock_ns, ModelInfo.of(engine, checkpoint),
                                         config, reuse_messages, self.camera_infos, demand)
        self._cameras = len(topics)
        self._frames = self._results = None
        self._workers: list[BufferWorker] = []
        self._engine_released = False  # by a deactivate: warm up again at the next activate

    # --- callbacks (executor thread) --------------------------------------------------------------
    def frame_arrived(self, camera: int, message: Any, compressed: bool, now_ns: int) -> None:
        frames = self._frames
        if frames is None:  # not active: a late message from before deactivate
            return
        replaced = frames.put(IncomingFrame(camera, message, compressed, now_ns))
        self.health.frame_received(camera, now_ns, replaced, stamp_ns(message.header))

    def camera_info_arrived(self, camera: int, message: Any) -> None:
        self.camera_infos.put(camera, message)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, now_ns: int) -> None:
        """Activate: fresh buffers (a closed one stays closed) and the two worker threads.

        Refused while a worker of the previous activation is still running (it outlived the stop
        timeout inside a long frame): two threads must never drive one engine.
        """
        if self.running:
            raise RuntimeError("a worker of the previous activation is still running (a frame took longer "
                               "than the stop timeout); activate again once it has ended")
        if self._engine_released:
            warm_up(self.engine, self.processor.config)
            self._engine_released = False
        self.health.activated(now_ns)
        self._frames, self._results = LatestFrameBuffer(self._cameras), LatestFrameBuffer(self._cameras)
        if self.processor.pipelined:  # one frame in flight: the next upload overlaps this compute
            segmentation = BufferWorker("segmentation", self._frames, self.processor.start, self.log,
                                        finish=self.processor.finish)
        else:  # submit does all the work on a CPU: finishing later would only add a frame of latency
            segmentation = BufferWorker("segmentation", self._frames, self.processor.process, self.log)
        self._workers = [segmentation,
                         BufferWorker("publishing", self._results, self.publisher.publish_frames, self.log)]
        for worker in self._workers:
            worker.start()

    def stop(self, timeout_s: float) -> bool:
        """Deactivate: stop both threads, then release the engine's captured graphs and buffers
        (the engine stays usable for a later activate); True when both threads ended."""
        self._frames = None
        ended = [worker.stop(timeout_s) for worker in self._workers]
        # a thread that did not end keeps its place: `running` stays true and start() refuses
        self._workers = [worker for worker, done in zip(self._workers, ended) if not done]
        if not self._workers:
            self.engine.close()
            self._engine_released = True
        return all(ended)

    def frames_waiting(self) -> int:
        """Cameras whose newest frame has not been taken yet (benchmarks keep one waiting)."""
        return 0 if self._frames is None else self._frames.waiting()

    @property
    def running(self) -> bool:
        return any(worker.alive for worker in self._workers)

    def set_config(self, config: NodeConfig) -> None:
        self.processor.config = config
        self.publisher.config = config
        self.log.interval_s = config.log_throttle_s

    def _deliver(self, frame: SegmentedFrame) -> None:
        """Segmentation thread -> publishing thread; never waits for a subscriber."""
        results = self._results
        if results is not None and results.put(frame):
            self.health.result_dropped(frame.camera)

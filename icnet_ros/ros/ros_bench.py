"""`ros2 run icnet_ros ros_bench`: the segmentation node measured over real DDS, as a user would check it.

Each command starts the node as its own process (`python -m icnet_ros.ros.node`, the program
`ros2 run icnet_ros segment_node` runs), plays a camera and listens from this process, then stops
the node with SIGINT and reports its exit code. Needs a sourced ROS 2 with icnet_ros built.

    ros_bench publish-cost --size 1024x2048 --frames 20      # publish_ms per set of subscribers: none, labels,
                                                             # + color + overlay raw, compressed, at --visual-scale
    ros_bench dds-loss --size 1024x2048 --rate 5 --count 100 [--dds-config large_images]
    ros_bench soak --size 128x256 --rate 30 --count 10000    # RSS and threads, nothing stuck, clean exit

Extra node parameters go after `--`, e.g. `-- -p device:=cuda -p dataset:=camvid`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from icnet_ros.msg import SegmentationTiming
from icnet_ros.paths import config_dir
from icnet_ros.ros.image_conversion import numpy_to_image
from icnet_ros.ros.launch_plan import DDS_CONFIGS
from icnet_ros.ros.node_config import JPEG_QUALITY, NODE_NAME
from icnet_ros.ros.topics import COMPRESSED_SUFFIX

NAMESPACE = "/bench_cam"
CAMERA_TOPIC = f"{NAMESPACE}/image_raw"
OUTPUTS = f"{NAMESPACE}/segmentation"
RAW_VISUALS = ("labels", "color", "overlay")
COMPRESSED_VISUALS = ("labels", "color/compressed", "overlay/compressed")
SERVICE_WAIT_S = 10.0
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
RELIABLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)


class NodeProcess:
    """The segmentation node in a process of its own, with RSS and thread counts read from /proc."""

    started: ClassVar[list[NodeProcess]] = []  # ended by main() whatever happens: a node left behind may hold a GPU

    def __init__(self, node_arguments: list[str], environment: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "icnet_ros.ros.node", "--ros-args", "-r", f"image:={CAMERA_TOPIC}",
                   "-r", f"__ns:={NAMESPACE}", *node_arguments]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, **(environment or {})})
        NodeProcess.started.append(self)
        self.log: list[str] = []
        # drain the node's output all along: a full pipe would block the node mid-run
        self._reader = threading.Thread(target=lambda: self.log.extend(iter(self.process.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, text: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in list(self.log)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the node did not start:\n" + "".join(self.log))
            time.sleep(0.1)

    def memory(self) -> dict[str, int]:
        """VmRSS (kB) and Threads of the node process."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                fields[key] = int(value.split()[0])
        return fields

    def stop(self, timeout_s: float = 30.0) -> tuple[int, float]:
        """SIGINT, as launch and Ctrl-C send it; (exit code, seconds to exit)."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(5.0)
        return code, time.monotonic() - start

    def end(self, timeout_s: float = 10.0) -> None:
        """Stop the node if it still runs (a benchmark that failed half-way): SIGINT, then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Bench:
    """A camera publisher and a probe in this process."""

    def __init__(self, size: tuple[int, int], reliable_camera: bool = False) -> None:
        self.node = rclpy.create_node("icnet_ros_bench")
        self.camera = self.node.create_publisher(Image, CAMERA_TOPIC, RELIABLE_QOS if reliable_camera else SENSOR_QOS)
        rng = np.random.default_rng(0)
        self.image = numpy_to_image(rng.integers(0, 256, (*size, 3), dtype=np.uint8), "rgb8", None, Image)
        self.image.header.frame_id = "bench_camera"
        self.timings: list[SegmentationTiming] = []
        self.node.create_subscription(SegmentationTiming, f"{OUTPUTS}/timing", self.timings.append, RELIABLE_QOS)
        self.diagnostics: list[DiagnosticArray] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, RELIABLE_QOS)
        self.sent_stamps: list[int] = []

    def listen(self, output: str, received_bytes: list[int] | None = None):
        """Subscribe to an output (a CompressedImage for .../compressed, else an Image); each message's
        data size goes to `received_bytes`."""
        kind = CompressedImage if output.endswith(COMPRESSED_SUFFIX) else Image
        def note(message) -> None:
            if received_bytes is not None:
                received_bytes.append(len(message.data))

        return self.node.create_subscription(kind, f"{OUTPUTS}/{output}", note, RELIABLE_QOS)

    def set_node_parameter(self, name: str, value) -> None:
        """Change one of the node's runtime parameters, as `ros2 param set` does."""
        client = self.node.create_client(SetParameters, f"{NAMESPACE}/{NODE_NAME}/set_parameters")
        try:
            if not client.wait_for_service(timeout_sec=SERVICE_WAIT_S):
                raise RuntimeError(f"the node's set_parameters service did not appear in {SERVICE_WAIT_S} s")
            request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
            future = client.call_async(request)
            while not future.done():
                rclpy.spin_once(self.node, timeout_sec=0.1)
            result = future.result().results[0]
            if not result.successful:
                raise RuntimeError(f"the node refused {name}={value!r}: {result.reason}")
        finally:
            self.node.destroy_client(client)

    def send(self) -> None:
        now = time.time_ns()
        self.image.header.stamp.sec, self.image.header.stamp.nanosec = now // 10**9, now % 10**9
        self.camera.publish(self.image)
        self.sent_stamps.append(now)

    def spin_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rclpy.spin_once(self.node, timeout_sec=min(0.01, max(0.0, deadline - time.monotonic())))

    def play(self, rate_hz: float, count: int, until=None) -> None:
        """Send `count` frames at `rate_hz` (spinning in between), or until `until()` is true."""
        period = 1.0 / rate_hz
        next_send = time.monotonic()
        for _ in range(count):
            if until is not None and until():
                return
            self.send()
            next_send += period
            self.spin_for(max(0.0, next_send - time.monotonic()))

    def camera_status(self) -> dict[str, str]:
        """The newest /diagnostics key/values of the node's camera."""
        for array in reversed(self.diagnostics):
            for status in array.status:
                if status.name.endswith("segmentation image"):  # the node's task for its `image` topic
                    return {kv.key: kv.value for kv in status.values}
        return {}

    def wait_subscribed(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.camera.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node never subscribed to {CAMERA_TOPIC}")
            self.spin_for(0.1)


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def publish_cost_cases(visual_scale: float) -> list[tuple[str, tuple[str, ...], float]]:
    """(case, outputs subscribed to, visual_scale): what each case of publish-cost measures."""
    reduced = f"at visual_scale {visual_scale:g}"
    return [("no subscriber", (), 1.0), ("labels", ("labels",), 1.0),
            ("labels + color + overlay", RAW_VISUALS, 1.0),
            ("labels + compressed color + overlay", COMPRESSED_VISUALS, 1.0),
            (f"labels + color + overlay {reduced}", RAW_VISUALS, visual_scale),
            (f"labels + compressed color + overlay {reduced}", COMPRESSED_VISUALS, visual_scale)]


def publish_cost(args, node_arguments: list[str]) -> dict:
    """Median publish_ms (the publishing thread's time per frame) and the bytes each output sends, per
    set of subscribers: labels only, the raw visual outputs, their compressed forms, and both at a
    reduced size (visual_scale, changed at runtime between the cases)."""
    node = NodeProcess(["-p", "stall_timeout_s:=60.0", "-p", f"jpeg_quality:={args.jpeg_quality}", *node_arguments])
    node.wait_for("segmenting")
    bench = Bench(args.size)
    bench.wait_subscribed()
    results = {}
    for case, outputs, visual_scale in publish_cost_cases(args.visual_scale):
        bench.set_node_parameter("visual_scale", visual_scale)
        sizes: dict[str, list[int]] = {output: [] for output in outputs}
        subscriptions = [bench.listen(output, sizes[output]) for output in outputs]
        bench.spin_for(2.0)  # discovery: the node sees its new subscribers
        bench.timings.clear()
        bench.play(args.rate, args.frames * 100, until=lambda: len(bench.timings) >= args.frames)
        bench.spin_for(1.0)
        measured = [t for t in bench.timings if sorted(t.outputs) == sorted(outputs)]
        results[case] = {"frames": len(measured),
                         "publish_ms_median": statistics.median(t.publish_ms for t in measured) if measured else None,
                         "total_ms_median": statistics.median(t.total_ms for t in measured) if measured else None,
                         "bytes_median": {output: statistics.median(sizes[output]) if sizes[output] else None
                                          for output in outputs}}
        for subscription in subscriptions:
            bench.node.destroy_subscription(subscription)
    code, seconds = node.stop()
    return {"size": f"{args.size[0]}x{args.size[1]}", "jpeg_quality": args.jpeg_quality, "cases": results,
            "node_exit_code": code, "exit_s": round(seconds, 2)}


def dds_config_environment(dds_config: str, rmw: str, environ: dict[str, str],
                           own_file: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The node's environment for --dds-config, as segment.launch.py gives it, for the DDS in use (`rmw`):
    Cyclone's file appended to CYCLONEDDS_URI; Fast DDS's as FASTRTPS_DEFAULT_PROFILES_FILE unless one is
    set already (Fast DDS reads one file: it is kept). `own_file` replaces the package's file and one already
    set (a copy tuned to a machine). Also returns what was used: rmw, variable, file."""
    cyclone, fastdds = (Path(own_file) if own_file else config_dir() / "dds" / name
                        for name in DDS_CONFIGS[dds_config])
    if rmw.startswith("rmw_cyclonedds"):
        uri = ",".join(filter(None, [environ.get("CYCLONEDDS_URI", "").strip(), f"file://{cyclone}"]))
        return {"CYCLONEDDS_URI": uri}, {"rmw": rmw, "variable": "CYCLONEDDS_URI", "file": str(cyclone)}
    if rmw.startswith("rmw_fastrtps"):
        variable = "FASTRTPS_DEFAULT_PROFILES_FILE"
        if environ.get(variable) and not own_file:
            return {}, {"rmw": rmw, "variable": variable, "file": environ[variable], "kept": "already set"}
        return {variable: str(fastdds)}, {"rmw": rmw, "variable": variable, "file": str(fastdds)}
    raise SystemExit(f"--dds-config: icnet_ros has no {dds_config} settings for {rmw}")


def dds_loss(args, node_arguments: list[str]) -> dict:
    """Frames sent best effort at `rate` that never reached the node, read from its diagnostics.
    --dds-config gives its settings to the node only, as the launch does (a camera driver would not get
    them); the camera in this process has what this process's environment gives it."""
    if args.dds_config_file and not args.dds_config:
        raise SystemExit("--dds-config-file needs --dds-config")
    rmw = rclpy.get_rmw_implementation_identifier()
    environment, used = {}, {"rmw": rmw}
    if args.dds_config:
        environment, used = dds_config_environment(args.dds_config, rmw, dict(os.environ), args.dds_config_file)
    node = NodeProcess(["-p", "stall_timeout_s:=60.0", "-p", "publish_color:=false", "-p", "publish_overlay:=false",
                        *node_arguments], environment)
    node.wait_for("segmenting")
    bench = Bench(args.size)
    subscription = bench.listen("labels")  # a consumer, so the node works as it would on a vehicle
    bench.wait_subscribed()
    bench.spin_for(2.0)
    bench.play(args.rate, args.count)
    bench.spin_for(5.0)  # the last frames land; diagnostics publish once a second
    status = bench.camera_status()
    bench.node.destroy_subscription(subscription)
    code, _ = node.stop()
    received = int(status.get("frames_received", 0))
    camera = {variable: os.environ[variable] for variable in ("CYCLONEDDS_URI", "FASTRTPS_DEFAULT_PROFILES_FILE")
              if os.environ.get(variable)}
    return {"size": f"{args.size[0]}x{args.size[1]}", "rate_hz": args.rate, "sent": args.count,
            "received": received, "lost": args.count - received, "node_reported_missing": status.get("frames_missing"),
            "dds_config": args.dds_config or "environment only", "node_dds_settings": used,
            "node_environment": environment, "camera_environment": camera, "node_exit_code": code}


def soak(args, node_arguments: list[str]) -> dict:
    """`count` frames through the node: memory and threads over time, the last frame out, a clean exit."""
    node = NodeProcess(["-p", "stall_timeout_s:=60.0", *node_arguments])
    node.wait_for("segmenting")
    bench = Bench(args.size)
    bench.listen("labels")
    bench.listen("overlay")
    bench.wait_subscribed()
    bench.spin_for(2.0)
    samples = []
    period = 1.0 / args.rate
    next_send = time.monotonic()
    for index in range(args.count):
        bench.send()
        if index % args.sample_every == 0:
            samples.append({"frames_sent": index, "timings": len(bench.timings), **node.memory()})
        next_send += period
        bench.spin_for(max(0.0, next_send - time.monotonic()))
    bench.spin_for(5.0)
    samples.append({"frames_sent": args.count, "timings": len(bench.timings), **node.memory()})
    status = bench.camera_status()
    last_stamp = bench.sent_stamps[-1]
    last_out = bench.timings[-1].header.stamp if bench.timings else None
    last_out_ns = None if last_out is None else last_out.sec * 10**9 + last_out.nanosec
    warm = samples[min(len(samples) - 1, max(1, len(samples) // 10))]  # after the first tenth: warm-up done
    code, seconds = node.stop()
    counts = {key: int(status.get(f"frames_{key}", 0)) for key in (
        "received", "segmented", "without_subscribers", "dropped", "unpublished", "malformed", "failed")}
    handled = sum(value for key, value in counts.items() if key != "received")
    return {
        "size": f"{args.size[0]}x{args.size[1]}", "rate_hz": args.rate, "sent": args.count,
        "timing_messages": len(bench.timings), "node_counts": counts,
        "every_received_frame_accounted": counts["received"] == handled,
        "last_frame_published": last_out_ns == last_stamp,
        "rss_kb": {"start": samples[0]["VmRSS"], "after_warm_up": warm["VmRSS"], "end": samples[-1]["VmRSS"]},
        "threads": {"start": samples[0]["Threads"], "after_warm_up": warm["Threads"], "end": samples[-1]["Threads"]},
        "rss_growth_after_warm_up_pct": round(100.0 * (samples[-1]["VmRSS"] - warm["VmRSS"]) / warm["VmRSS"], 2),
        "node_exit_code": code, "exit_s": round(seconds, 2), "samples": samples,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ros2 run icnet_ros ros_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cost = commands.add_parser("publish-cost", help="publish_ms with no subscriber, labels only, the visual "
                               "outputs raw and compressed, at full and at a reduced size")
    cost.add_argument("--frames", type=int, default=20)
    cost.add_argument("--rate", type=float, default=2.0)
    cost.add_argument("--visual-scale", type=float, default=0.5, help="the reduced size of the last two cases")
    cost.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help="the node's jpeg_quality")
    loss = commands.add_parser("dds-loss", help="frames lost between a best-effort camera and the node")
    loss.add_argument("--count", type=int, default=100)
    loss.add_argument("--rate", type=float, default=5.0)
    loss.add_argument("--dds-config", choices=sorted(DDS_CONFIGS), help="give the node the package's DDS "
                      "settings for the DDS in use (RMW_IMPLEMENTATION), as segment.launch.py does")
    loss.add_argument("--dds-config-file", help="with --dds-config: this file instead of the package's")
    soak_parser = commands.add_parser("soak", help="many frames: memory, threads, nothing stuck, clean exit")
    soak_parser.add_argument("--count", type=int, default=10000)
    soak_parser.add_argument("--rate", type=float, default=30.0)
    soak_parser.add_argument("--sample-every", type=int, default=500)
    for sub in (cost, loss, soak_parser):
        sub.add_argument("--size", type=parse_size, default=(1024, 2048), help="HxW of the camera frames")
        sub.add_argument("--json", help="write the result here too")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    node_arguments = []
    if "--" in argv:
        split = argv.index("--")
        argv, node_arguments = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    rclpy.init(args=[])  # the arguments after -- are the node's, not this process's
    try:
        result = {"publish-cost": publish_cost, "dds-loss": dds_loss, "soak": soak}[args.command](args, node_arguments)
    finally:
        for node in NodeProcess.started:
            node.end()
        rclpy.try_shutdown()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

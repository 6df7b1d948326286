"""Synthetic Cityscapes-style drives: procedurally rendered street scenes with exact labels.

A scene is a street in perspective: sky, buildings, trees and terrain at the sides, sidewalks, a
road with lane markings, walls and fences, and objects placed in depth: cars, trucks, buses, trams,
persons, riders on bicycles and motorcycles, and the small, thin things on which ICNet's cascade
matters (poles carrying traffic signs and lights, distant persons). A sequence moves the camera
forward: objects grow and slide outward from the vanishing point. Everything is a function of the
seed, so the same command always writes the same bytes. Output is the Cityscapes layout:

    icnet-make-drives --out data/synthetic --splits train=160,val=24 --height 256 --width 512
    icnet-make-drives --out data/drive --splits val=0 --sequences 1 --frames-per-sequence 30
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from icnet_ros.atomic import atomic_path, atomic_write_text
from icnet_ros.classmap import ClassMap, load_class_map
from icnet_ros.config import ConfigError, read_yaml_mapping

ANNOTATED_FRAME = 19  # Cityscapes annotates the 20th frame of each 30-frame snippet
MANIFEST = "icnet_drives.json"  # how each split was made; training copies it into a model's provenance
CAMERA_HEIGHT = 1.5  # metres
SPEED = 0.8  # metres per frame (about 50 km/h at 17 Hz)

# Base RGB appearance of each class; per-object variation and texture are added on top.
APPEARANCE = {
    "road": (90, 90, 95), "sidewalk": (160, 150, 155), "building": (120, 100, 90), "wall": (170, 160, 140),
    "fence": (120, 90, 60), "pole": (70, 70, 75), "traffic_light": (30, 30, 30), "traffic_sign": (220, 200, 30),
    "vegetation": (60, 110, 40), "terrain": (140, 150, 80), "sky": (120, 170, 220), "person": (150, 60, 70),
    "rider": (60, 60, 150), "car": (40, 60, 140), "truck": (200, 200, 210), "bus": (200, 120, 40),
    "train": (150, 160, 170), "motorcycle": (40, 40, 40), "bicycle": (170, 30, 40),
}
# (kind, width m, height m, how often) of objects on or beside the road; --object-mix overrides how often.
OBJECTS = [("car", 1.8, 1.5, 6), ("truck", 2.4, 3.2, 1), ("bus", 2.5, 3.2, 1), ("train", 2.6, 3.5, 0.4),
           ("person", 0.5, 1.75, 5), ("rider_bicycle", 0.6, 1.8, 2), ("rider_motorcycle", 0.8, 1.6, 1.5),
           ("pole_sign", 0.15, 3.0, 3), ("pole_light", 0.15, 4.0, 2.5), ("bicycle", 0.6, 1.0, 1)]


@dataclass
class Canvas:
    image: np.ndarray  # HxWx3 float32 RGB
    label: np.ndarray  # HxW uint8 class ids
    ids: dict[str, int]
    rng: np.random.Generator

    def fill(self, points, name: str, color=None, jitter=18.0) -> None:
        polygon = np.round(np.asarray(points)).astype(np.int32)
        base = np.asarray(color if color is not None else APPEARANCE[name], np.float32)
        shade = np.clip(base + self.rng.normal(0, jitter, 3), 0, 255)
        mask = np.zeros(self.label.shape, np.uint8)
        cv2.fillPoly(mask, [polygon], 1)
        self.paint(mask.astype(bool), name, shade)

    def box(self, left, top, right, bottom, name, color=None, jitter=18.0) -> None:
        self.fill([(left, top), (right, top), (right, bottom), (left, bottom)], name, color, jitter)

    def paint(self, mask: np.ndarray, name: str, color) -> None:
        self.image[mask] = color
        self.label[mask] = self.ids[name]


OBJECT_KINDS = [kind for kind, *_ in OBJECTS]


def object_weights(object_mix: dict[str, float] | None) -> np.ndarray:
    """How often each of OBJECT_KINDS is drawn: object_mix's value, else OBJECTS' own."""
    return np.asarray([(object_mix or {}).get(kind, how_often) for kind, _, _, how_often in OBJECTS], float)


def load_object_mix(path: Path) -> dict[str, float]:
    """How often each object kind appears (relative), from a YAML mapping such as
    config/synthetic/street_mix.yaml; kinds it leaves out keep OBJECTS' value."""
    try:
        mix = read_yaml_mapping(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    for kind, weight in mix.items():
        if kind not in OBJECT_KINDS:
            raise ConfigError(f"{path}: unknown object kind {kind!r}; the kinds are {OBJECT_KINDS}")
        is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not is_number or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"{path}: {kind} must be a finite non-negative number (how often, relative), "
                              f"got {weight!r}")
    if not object_weights(mix).any():
        raise ConfigError(f"{path}: every object kind has weight 0; give at least one a positive weight")
    return {kind: float(weight) for kind, weight in mix.items()}


def scene_objects(rng: np.random.Generator, count: int = 26, object_mix: dict[str, float] | None = None
                  ) -> list[dict]:
    """Objects in world coordinates: lateral x (m, right positive) and depth z (m)."""
    weights = object_weights(object_mix)
    objects = []
    for _ in range(count):
        kind = OBJECT_KINDS[rng.choice(len(OBJECT_KINDS), p=weights / weights.sum())]
        spec = next(o for o in OBJECTS if o[0] == kind)
        on_road = kind in ("car", "truck", "bus", "rider_motorcycle", "rider_bicycle")
        side = rng.choice([-1, 1])
        lateral = side * (rng.uniform(1.2, 5.0) if on_road else rng.uniform(5.5, 8.0))
        if kind == "train":
            lateral = side * 9.5
        objects.append({"kind": kind, "x": lateral, "z": rng.uniform(4.0, 80.0), "w": spec[1] * rng.uniform(0.9, 1.15),
                        "h": spec[2] * rng.uniform(0.9, 1.1), "color": rng.uniform(30, 230, 3)})
    return objects


@dataclass
class Scene:
    """One street; `render(t)` draws it after the camera moved t frames forward."""

    seed: int
    height: int
    width: int
    object_mix: dict[str, float] | None = None  # load_object_mix; None: OBJECTS' own

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.horizon = self.height * rng.uniform(0.40, 0.48)
        self.vanish_x = self.width * rng.uniform(0.42, 0.58)
        self.focal = self.width * rng.uniform(0.75, 0.95)
        self.road_half = rng.uniform(3.0, 4.5)
        self.sidewalk = rng.uniform(2.5, 4.0)
        self.left_kind, self.right_kind = rng.choice(["building", "vegetation", "wall_building", "terrain"], 2)
        self.building_tops = rng.uniform(0.05, 0.35, 16)
        self.building_colors = rng.uniform(60, 200, (16, 3))
        self.objects = scene_objects(rng, object_mix=self.object_mix)
        self.texture = rng.normal(0, 1, (self.height, self.width)).astype(np.float32)

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        """World (x right, y up from the road, z forward) to pixel (column, row)."""
        return self.vanish_x + self.focal * x / z, self.horizon + self.focal * (CAMERA_HEIGHT - y) / z

    def render(self, t: int, class_map: ClassMap) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, t])
        h, w = self.height, self.width
        canvas = Canvas(np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.uint8),
                        {n: class_map.index(n) for n in class_map.names}, rng)
        self._sky(canvas)
        for side, kind in ((-1, self.left_kind), (1, self.right_kind)):
            self._roadside(canvas, side, kind, t)
        self._ground(canvas, t)
        for obj in sorted(self.objects, key=lambda o: -self._depth(o, t)):
            depth = self._depth(obj, t)
            if 6.0 < depth < 120.0:  # nearer objects would fill the frame
                self._draw_object(canvas, obj, depth)
        image = canvas.image + self.texture[..., None] * 6.0 + rng.normal(0, 2.0, canvas.image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), canvas.label

    def _depth(self, obj, t):
        depth = obj["z"] - SPEED * t
        return depth + 80.0 if depth < 2.0 else depth  # objects passed by reappear far ahead

    def _sky(self, canvas):
        rows = np.linspace(0.0, 1.0, self.height, dtype=np.float32)[:, None, None]
        canvas.image[:] = np.asarray(APPEARANCE["sky"], np.float32) + rows * 60.0
        canvas.label[:] = canvas.ids["sky"]

    def _roadside(self, canvas, side, kind, t):
        bottom_depth = self.focal * CAMERA_HEIGHT / (self.height - self.horizon)
        near_x = self.project(side * (self.road_half + self.sidewalk), 0, bottom_depth)[0]
        far_x = self.vanish_x
        edge = self.width if side > 0 else 0
        if kind == "terrain":
            canvas.fill([(far_x, self.horizon), (edge, self.horizon), (edge, self.height), (near_x, self.height)],
                        "terrain")
        for index in range(8):
            if kind == "terrain" and index % 2:
                continue  # open grass between the trees  # building (or tree) blocks receding toward the vanishing point
            z_near, z_far = 4.0 + index * 12.0 - (SPEED * t) % 12.0, 16.0 + index * 12.0 - (SPEED * t) % 12.0
            x = side * (self.road_half + self.sidewalk + 0.5)
            top = 6.0 + 30.0 * self.building_tops[(index + t // 15) % 16]
            (x0, y0), (x1, y1) = self.project(x, top, max(z_near, 1.0)), self.project(x, top, z_far)
            bottom0, bottom1 = self.project(x, 0, max(z_near, 1.0))[1], self.project(x, 0, z_far)[1]
            points = [(x0, y0), (x1, y1), (x1, bottom1), (x0, bottom0)]
            points += [(edge, min(bottom0, self.height)), (edge, y0)]  # close the block at the image edge
            name = "vegetation" if kind in ("vegetation", "terrain") or (kind == "wall_building" and index % 3 == 2) else "building"
            canvas.fill(points, name, self.building_colors[index] if name == "building" else None)
        if kind == "wall_building":
            self._barrier(canvas, side, "wall", 1.2)
        elif (self.seed + side) % 3 == 0:
            self._barrier(canvas, side, "fence", 1.0)

    def _barrier(self, canvas, side, name, height):
        x = side * (self.road_half + self.sidewalk + 0.2)
        (x0, y0), (x1, y1) = self.project(x, height, 1.5), self.project(x, height, 60.0)
        b0, b1 = self.project(x, 0, 1.5)[1], self.project(x, 0, 60.0)[1]
        canvas.fill([(x0, y0), (x1, y1), (x1, b1), (x0, b0)], name)

    def _ground(self, canvas, t):
        h = self.height
        bottom_depth = self.focal * CAMERA_HEIGHT / (h - self.horizon)  # depth seen at the last row
        for half, name in ((self.road_half + self.sidewalk, "sidewalk"), (self.road_half, "road")):
            left, right = self.project(-half, 0, bottom_depth)[0], self.project(half, 0, bottom_depth)[0]
            canvas.fill([(self.vanish_x, self.horizon), (right, h), (left, h)], name, jitter=6.0)
        for z in np.arange(2.0 - (SPEED * t) % 6.0, 90.0, 6.0):  # dashed centre line, part of the road
            if z > 1.0:
                (xa, ya), (xb, yb) = self.project(-0.08, 0, z), self.project(0.08, 0, z + 3.0)
                mask = np.zeros(canvas.label.shape, np.uint8)
                cv2.fillPoly(mask, [np.int32([(xa, ya), (-xa + 2 * self.vanish_x, ya), (xb, yb),
                                              (2 * self.vanish_x - xb, yb)])], 1)
                canvas.image[mask.astype(bool)] = (235, 235, 235)

    def _draw_object(self, canvas, obj, depth):
        left, bottom = self.project(obj["x"] - obj["w"] / 2, 0, depth)
        right, top = self.project(obj["x"] + obj["w"] / 2, obj["h"], depth)
        kind = obj["kind"]
        if kind.startswith("pole"):
            self._pole(canvas, obj, left, right, top, bottom, depth)
        elif kind == "person":
            self._person(canvas, (left + right) / 2, top, bottom, "person", obj["color"])
        elif kind.startswith("rider"):
            vehicle = kind.split("_")[1]
            wheel_top = bottom - (bottom - top) * 0.45
            canvas.box(left, wheel_top, right, bottom, vehicle)
            self._person(canvas, (left + right) / 2, top, wheel_top + (bottom - wheel_top) * 0.3, "rider", obj["color"])
        elif kind == "bicycle":
            canvas.box(left, top, right, bottom, "bicycle")
        else:
            canvas.box(left, top, right, bottom, kind, obj["color"])
            window_bottom = top + (bottom - top) * (0.45 if kind == "car" else 0.35)
            inset = (right - left) * 0.12
            canvas.image[int(max(top + (bottom - top) * 0.1, 0)):int(max(window_bottom, 0)),
                         int(max(left + inset, 0)):int(max(right - inset, 0))] = (25, 30, 40)

    def _pole(self, canvas, obj, left, right, top, bottom, depth):
        centre = (left + right) / 2
        half = max((right - left) / 2, 0.6)
        canvas.box(centre - half, top, centre + half, bottom, "pole")
        head = self.focal * 0.6 / depth
        if obj["kind"] == "pole_sign":
            canvas.fill(cv2.ellipse2Poly((int(centre), int(top + head / 2)), (int(head / 2) + 1, int(head / 2) + 1),
                                         0, 0, 360, 30), "traffic_sign")
        else:
            canvas.box(centre - head / 3, top, centre + head / 3, top + head, "traffic_light")
            for row, color in enumerate(((220, 40, 30), (230, 200, 30), (40, 200, 60))):
                y = int(top + head * (row + 0.5) / 3)
                cv2.circle(canvas.image, (int(centre), y), max(int(head / 8), 0), color, -1)

    def _person(self, canvas, centre, top, bottom, name, color):
        tall = bottom - top
        canvas.box(centre - tall * 0.13, top + tall * 0.18, centre + tall * 0.13, bottom, name, color)
        radius = max(int(tall * 0.1), 1)
        canvas.fill(cv2.ellipse2Poly((int(centre), int(top + radius)), (radius, radius), 0, 0, 360, 30), name,
                    (200, 160, 130))


# --- writing the Cityscapes layout ------------------------------------------------------------------
def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def write_annotated(root: Path, split: str, city: str, sequence: int, image, label, class_map) -> None:
    stem = f"{city}_{sequence:06d}_{ANNOTATED_FRAME:06d}"
    write_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image[..., ::-1])
    gt = root / "gtFine" / split / city
    write_png(gt / f"{stem}_gtFine_labelTrainIds.png", label)
    write_png(gt / f"{stem}_gtFine_labelIds.png", class_map.class_to_source_lut().astype(np.uint8)[label])


def make_drives(out: Path, splits: dict[str, int], height: int, width: int, seed: int = 0, city: str = "synth",
                sequences: int = 0, frames_per_sequence: int = 30, class_map: ClassMap | None = None,
                object_mix: dict[str, float] | None = None) -> dict:
    """Write annotated frames per split and `sequences` replayable snippets; returns counts.

    object_mix: how often each object kind appears (load_object_mix); None keeps the generator's own.
    """
    class_map = class_map or load_class_map("cityscapes")
    counts = {}
    for split_index, (split, count) in enumerate(splits.items()):
        for sequence in range(count):
            scene = Scene(seed * 100_003 + split_index * 10_007 + sequence, height, width, object_mix)
            write_annotated(out, split, city, sequence, *scene.render(ANNOTATED_FRAME, class_map), class_map)
        counts[split] = count
    record_splits(out, {split: {"frames": count, "seed": seed, "height": height, "width": width, "city": city,
                                "object_mix": object_mix} for split, count in splits.items()})
    sequence_split = next(iter(splits), "val")
    for sequence in range(sequences):
        scene = Scene(seed * 100_003 + 99_991 + sequence, height, width, object_mix)
        for frame in range(frames_per_sequence):
            image, _ = scene.render(frame, class_map)
            name = f"{city}_{sequence:06d}_{frame:06d}_leftImg8bit.png"
            write_png(out / "leftImg8bit_sequence" / sequence_split / city / name, image[..., ::-1])
    counts["sequence_frames"] = sequences * frames_per_sequence
    return counts


def record_splits(out: Path, splits: dict[str, dict]) -> None:
    """Add how these splits were made to out's manifest, keeping the other splits' records."""
    manifest = read_manifest(out) or {"generator": "icnet-make-drives", "splits": {}}
    manifest["splits"].update(splits)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(root: Path) -> dict | None:
    """The manifest of drives written under root, None where there is none (other data sets)."""
    path = Path(root) / MANIFEST
    if not str(root) or not path.is_file():  # "" is no data root, not the working directory
        return None
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ConfigError(f"{path}: not a drives manifest (expected an object with 'splits'); delete it or "
                          f"write the drives again with icnet-make-drives")
    return manifest


def parse_splits(text: str) -> dict[str, int]:
    splits = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        if not count.isdigit():
            raise argparse.ArgumentTypeError(f"--splits takes name=count pairs like train=160,val=24, got {item!r}")
        splits[name.strip()] = int(count)
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icnet-make-drives", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--splits", type=parse_splits, default={"train": 160, "val": 24})
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--city", default="synth")
    parser.add_argument("--sequences", type=int, default=0, help="replayable snippets in leftImg8bit_sequence/")
    parser.add_argument("--frames-per-sequence", type=int, default=30)
    parser.add_argument("--object-mix", type=Path,
                        help="YAML of how often each object kind appears (e.g. config/synthetic/street_mix.yaml: "
                             "real streets' proportions); default: the generator's own, rich in rare vehicles")
    args = parser.parse_args(argv)
    try:
        object_mix = load_object_mix(args.object_mix) if args.object_mix else None
    except (ConfigError, OSError) as error:
        print(f"icnet-make-drives: {error}", file=sys.stderr)
        return 2
    counts = make_drives(args.out, args.splits, args.height, args.width, args.seed, args.city, args.sequences,
                         args.frames_per_sequence, object_mix=object_mix)
    print(f"wrote {counts} at {args.height}x{args.width} to {args.out} (Cityscapes layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

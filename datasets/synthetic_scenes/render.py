"""Procedural indoor scenes rendered by vectorised numpy ray casting, with exact per-pixel ground truth.

World frame: metres, y up, the room spans [0, size_x] x [0, size_y] x [0, size_z] with the floor at y = 0.
Camera frame (OpenCV): x right, y down, z forward. Pixel (u, v) has its centre at (u + 0.5, v + 0.5) and looks
along ((u + 0.5 - cx) / fx, (v + 0.5 - cy) / fy, 1) in the camera frame, so the ray parameter of a hit is its
z-depth.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CLASS_NAMES = ("floor", "wall", "ceiling", "cabinet", "table", "sphere", "cylinder")
FLOOR, WALL, CEILING, CABINET, TABLE, SPHERE, CYLINDER = range(len(CLASS_NAMES))
OBJECT_CLASSES = (CABINET, TABLE, SPHERE, CYLINDER)
IGNORE_LABEL = 255
HORIZONTAL_FOV_DEG = 62.0

_EPS = 1e-4
# Preferred hue per class; instance hues scatter widely around it and are sometimes uniform, so colour overlaps.
_CLASS_HUE = {FLOOR: 0.08, WALL: 0.12, CEILING: 0.15, CABINET: 0.05, TABLE: 0.1, SPHERE: 0.6, CYLINDER: 0.35}


def intrinsics(height: int, width: int) -> dict[str, float]:
    """Pinhole intrinsics (pixels) of the synthetic camera: square pixels, centred principal point."""
    focal = (width / 2.0) / math.tan(math.radians(HORIZONTAL_FOV_DEG) / 2.0)
    return {"fx": focal, "fy": focal, "cx": width / 2.0, "cy": height / 2.0}


@dataclasses.dataclass(frozen=True)
class Primitive:
    """One ray-castable solid: `kind` in {'box', 'sphere', 'cylinder'} with its geometry in `params`."""

    kind: str
    class_id: int
    params: dict


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """A piece of furniture made of primitives sharing one class, albedo and texture."""

    class_id: int
    parts: tuple[Primitive, ...]
    centre: np.ndarray
    yaw: float
    colour: np.ndarray
    accent: np.ndarray
    pattern_scale: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """A box room, its furniture, a point light and a camera (position + camera-to-world rotation)."""

    room_size: np.ndarray
    objects: tuple[SceneObject, ...]
    surface_colours: dict
    surface_pattern_scale: dict
    light_position: np.ndarray
    light_colour: np.ndarray
    ambient: float
    camera_position: np.ndarray
    camera_rotation: np.ndarray


def _yaw_rotation(yaw: float) -> np.ndarray:
    """Rotation about world y; columns are the local axes expressed in the world frame."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    sector = (hue % 1.0) * 6.0
    index, fraction = int(sector) % 6, sector - int(sector)
    p, q, t = value * (1 - saturation), value * (1 - saturation * fraction), value * (1 - saturation * (1 - fraction))
    return np.array([(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][index])


def _instance_colour(rng: np.random.Generator, class_id: int) -> np.ndarray:
    hue = rng.uniform() if rng.uniform() < 0.35 else _CLASS_HUE[class_id] + rng.normal(0.0, 0.12)
    return _hsv_to_rgb(hue, rng.uniform(0.15, 0.75), rng.uniform(0.45, 0.95))


def camera_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Camera-to-world rotation (columns: camera x right, y down, z forward) for a y-up world; pitch > 0 looks down."""
    forward = np.array([math.cos(pitch) * math.sin(yaw), -math.sin(pitch), math.cos(pitch) * math.cos(yaw)])
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = math.cos(roll), math.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, forward], axis=1)


def _box(class_id: int, centre, half_extents, yaw: float) -> Primitive:
    return Primitive("box", class_id, {"centre": np.asarray(centre, float), "half": np.asarray(half_extents, float),
                                       "rotation": _yaw_rotation(yaw)})


def _make_object(rng: np.random.Generator, class_id: int, x: float, z: float, yaw: float):
    """Samples the size of one object standing on the floor at (x, z); returns its primitives and footprint radius."""
    rotation = _yaw_rotation(yaw)
    if class_id == CABINET:
        half = np.array([rng.uniform(0.2, 0.6), rng.uniform(0.25, 1.0), rng.uniform(0.15, 0.3)])
        parts = (_box(class_id, [x, half[1], z], half, yaw),)
        radius = math.hypot(half[0], half[2])
    elif class_id == TABLE:
        half_w, half_d, height = rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.5), rng.uniform(0.65, 0.8)
        thickness, leg = rng.uniform(0.03, 0.05), rng.uniform(0.025, 0.045)
        parts = [_box(class_id, [x, height - thickness, z], [half_w, thickness, half_d], yaw)]
        for sx in (-1, 1):
            for sz in (-1, 1):
                offset = rotation @ np.array([sx * (half_w - 2 * leg), 0.0, sz * (half_d - 2 * leg)])
                leg_height = (height - 2 * thickness) / 2
                parts.append(_box(class_id, [x + offset[0], leg_height, z + offset[2]], [leg, leg_height, leg], yaw))
        parts = tuple(parts)
        radius = math.hypot(half_w, half_d)
    elif class_id == SPHERE:
        radius = rng.uniform(0.15, 0.45)
        parts = (Primitive("sphere", class_id, {"centre": np.array([x, radius, z]), "radius": radius}),)
    else:
        radius = rng.uniform(0.1, 0.35)
        parts = (Primitive("cylinder", class_id, {"centre": np.array([x, 0.0, z]), "radius": radius,
                                                  "height": rng.uniform(0.3, 1.6)}),)
    return parts, radius


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draws a random room with 3-8 objects on the floor, a light near the ceiling and a camera inside the room."""
    room = np.array([rng.uniform(3.0, 6.0), rng.uniform(2.4, 3.2), rng.uniform(3.0, 7.0)])
    # Near one wall, facing into the room, so that most of the floor and furniture is in view.
    wall_axis, wall_side = int(rng.integers(2)), int(rng.integers(2))
    extent = room[[0, 2]]
    camera_xz = np.array([rng.uniform(0.4, extent[0] - 0.4), rng.uniform(0.4, extent[1] - 0.4)])
    distance_to_wall = rng.uniform(0.3, 0.4 * extent[wall_axis])
    camera_xz[wall_axis] = distance_to_wall if wall_side == 0 else extent[wall_axis] - distance_to_wall
    camera_position = np.array([camera_xz[0], rng.uniform(1.0, 1.8), camera_xz[1]])
    to_centre = room[[0, 2]] / 2 - camera_xz
    yaw = math.atan2(to_centre[0], to_centre[1]) + rng.uniform(-0.45, 0.45)
    rotation = camera_rotation(yaw, math.radians(rng.uniform(5.0, 30.0)), math.radians(rng.uniform(-4.0, 4.0)))

    objects, footprints = [], [(camera_xz, 0.35)]
    num_objects = int(rng.integers(3, 9))
    for _attempt in range(50 * num_objects):
        if len(objects) == num_objects:
            break
        class_id = int(rng.choice(OBJECT_CLASSES))
        object_yaw = rng.uniform(0.0, math.pi)
        x, z = rng.uniform(0.0, room[0]), rng.uniform(0.0, room[2])
        parts, radius = _make_object(rng, class_id, x, z, object_yaw)
        inside = radius + 0.05 <= x <= room[0] - radius - 0.05 and radius + 0.05 <= z <= room[2] - radius - 0.05
        clear = all(np.hypot(x - c[0], z - c[1]) > radius + r + 0.05 for c, r in footprints)
        if inside and clear:
            footprints.append((np.array([x, z]), radius))
            objects.append(SceneObject(class_id, parts, np.array([x, 0.0, z]), object_yaw,
                                       _instance_colour(rng, class_id), _instance_colour(rng, class_id),
                                       rng.uniform(0.6, 1.6)))

    light = np.array([rng.uniform(0.3, room[0] - 0.3), room[1] - rng.uniform(0.1, 0.5), rng.uniform(0.3, room[2] - 0.3)])
    return Scene(
        room_size=room,
        objects=tuple(objects),
        surface_colours={c: _instance_colour(rng, c) for c in (FLOOR, WALL, CEILING)},
        surface_pattern_scale={c: rng.uniform(0.6, 1.6) for c in (FLOOR, WALL, CEILING)},
        light_position=light,
        light_colour=_hsv_to_rgb(rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.25), 1.0),
        ambient=rng.uniform(0.2, 0.4),
        camera_position=camera_position,
        camera_rotation=rotation,
    )


def _intersect_room(origin: np.ndarray, direction: np.ndarray, size: np.ndarray):
    """Exit point of rays starting inside the room box: (t, class id, inward normal)."""
    safe = np.where(np.abs(direction) < 1e-12, 1e-12, direction)
    t_axes = (np.where(safe > 0, size, 0.0) - origin) / safe
    axis = np.argmin(t_axes, axis=-1)
    rows = np.arange(direction.shape[0])
    normal = np.zeros_like(direction)
    normal[rows, axis] = -np.sign(safe[rows, axis])
    class_id = np.where(axis == 1, np.where(safe[:, 1] < 0, FLOOR, CEILING), WALL)
    return t_axes[rows, axis], class_id, normal


def _intersect_box(origin, direction, params):
    """Slab test in the box frame; per-axis columns because numpy reductions over a length-3 axis are slow."""
    rotation, half = params["rotation"], params["half"]
    local_origin = np.broadcast_to((origin - params["centre"]) @ rotation, direction.shape)
    local_direction = direction @ rotation
    local_direction = np.where(np.abs(local_direction) < 1e-12, 1e-12, local_direction)
    entries, exits = [], []
    for axis in range(3):
        t_low = (-half[axis] - local_origin[:, axis]) / local_direction[:, axis]
        t_high = (half[axis] - local_origin[:, axis]) / local_direction[:, axis]
        entries.append(np.minimum(t_low, t_high))
        exits.append(np.maximum(t_low, t_high))
    t_near = np.maximum(np.maximum(entries[0], entries[1]), entries[2])
    t_far = np.minimum(np.minimum(exits[0], exits[1]), exits[2])
    hit = (t_near <= t_far) & (t_near > _EPS)
    local_normal = np.stack([np.where(entries[axis] == t_near, -np.sign(local_direction[:, axis]), 0.0)
                             for axis in range(3)], axis=-1)
    return np.where(hit, t_near, np.inf), local_normal @ rotation.T


def _intersect_sphere(origin, direction, params):
    offset = origin - params["centre"]
    a = np.einsum("ij,ij->i", direction, direction)
    b = 2.0 * np.einsum("ij,ij->i", np.broadcast_to(offset, direction.shape), direction)
    c = np.einsum("ij,ij->i", np.broadcast_to(offset, direction.shape), np.broadcast_to(offset, direction.shape))
    c = c - params["radius"] ** 2
    discriminant = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(discriminant, 0.0))) / (2 * a)
    t = np.where((discriminant >= 0) & (t > _EPS), t, np.inf)
    normal = (origin + np.where(np.isfinite(t), t, 0.0)[:, None] * direction - params["centre"]) / params["radius"]
    return t, normal


def _intersect_cylinder(origin, direction, params):
    """Vertical cylinder standing on the floor: side wall and top cap."""
    centre, radius, height = params["centre"], params["radius"], params["height"]
    origin = np.broadcast_to(origin, direction.shape)
    ox, oz = origin[:, 0] - centre[0], origin[:, 2] - centre[2]
    dx, dz = direction[:, 0], direction[:, 2]
    a = np.maximum(dx * dx + dz * dz, 1e-12)
    b = 2.0 * (ox * dx + oz * dz)
    discriminant = b * b - 4 * a * (ox * ox + oz * oz - radius**2)
    t_side = (-b - np.sqrt(np.maximum(discriminant, 0.0))) / (2 * a)
    y_side = origin[:, 1] + t_side * direction[:, 1]
    t_side = np.where((discriminant >= 0) & (t_side > _EPS) & (y_side >= 0) & (y_side <= height), t_side, np.inf)
    dy = np.where(np.abs(direction[:, 1]) < 1e-12, 1e-12, direction[:, 1])
    t_cap = (height - origin[:, 1]) / dy
    cap_x, cap_z = ox + t_cap * dx, oz + t_cap * dz
    t_cap = np.where((t_cap > _EPS) & (cap_x**2 + cap_z**2 <= radius**2), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    finite_t = np.where(np.isfinite(t_side), t_side, 0.0)
    side_normal = np.stack([ox + finite_t * dx, np.zeros_like(dx), oz + finite_t * dz], axis=-1) / radius
    cap_normal = np.broadcast_to(np.array([0.0, 1.0, 0.0]), direction.shape)
    return t, np.where((t_cap < t_side)[:, None], cap_normal, side_normal)


_INTERSECTORS = {"box": _intersect_box, "sphere": _intersect_sphere, "cylinder": _intersect_cylinder}


def _cast_objects(origin, direction, objects):
    """Nearest object hit per ray: (t, object index or -1, world normal)."""
    t_best = np.full(direction.shape[0], np.inf)
    index = np.full(direction.shape[0], -1)
    normal = np.zeros_like(direction)
    for object_index, scene_object in enumerate(objects):
        for part in scene_object.parts:
            t, part_normal = _INTERSECTORS[part.kind](origin, direction, part.params)
            closer = t < t_best
            t_best = np.where(closer, t, t_best)
            index = np.where(closer, object_index, index)
            normal = np.where(closer[:, None], part_normal, normal)
    return t_best, index, normal


def _hash01(values: np.ndarray) -> np.ndarray:
    return np.modf(np.abs(np.sin(values * 12.9898 + 78.233) * 43758.5453))[0]


def _surface_albedo(class_id: int, points, colour, accent, scale) -> np.ndarray:
    """Room surface textures from world coordinates: floor planks, wallpaper stripes, ceiling tiles."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    if class_id == FLOOR:
        plank = np.floor(x / (0.25 * scale))
        shade = 0.75 + 0.25 * _hash01(plank + 7.0 * np.floor(z / (1.2 * scale) + 0.5 * plank))
        grain = 0.9 + 0.1 * np.sin(40.0 * z + 3.0 * np.sin(5.0 * x))
        return colour * (shade * grain)[:, None]
    if class_id == WALL:
        along = x + z
        stripe = (np.sin(2 * np.pi * along / (0.3 * scale)) > 0.6)[:, None]
        return np.where(stripe, 0.7 * colour + 0.3 * accent, colour) * (0.95 + 0.05 * np.sin(3 * y))[:, None]
    grid = (np.modf(np.abs(x) / (0.6 * scale))[0] < 0.05) | (np.modf(np.abs(z) / (0.6 * scale))[0] < 0.05)
    return np.where(grid[:, None], 0.6 * colour, colour)


def _object_albedo(scene_object: SceneObject, points, normals) -> np.ndarray:
    """Object textures in object-local coordinates: drawer panels, wood grain, ball segments, rings."""
    local = (points - scene_object.centre) @ _yaw_rotation(scene_object.yaw)
    x, y, z = local[:, 0], local[:, 1], local[:, 2]
    colour, accent, scale = scene_object.colour, scene_object.accent, scene_object.pattern_scale
    if scene_object.class_id == CABINET:
        drawer_line = np.modf(y / (0.35 * scale))[0] < 0.06
        handle = (np.abs(x) < 0.08) & (np.modf(y / (0.35 * scale))[0] > 0.45) & (np.modf(y / (0.35 * scale))[0] < 0.55)
        return np.where((drawer_line | handle)[:, None], 0.5 * colour + 0.5 * accent, colour)
    if scene_object.class_id == TABLE:
        grain = 0.8 + 0.2 * np.sin(25.0 * scale * (x + 0.15 * np.sin(6.0 * z)))
        return colour * grain[:, None]
    if scene_object.class_id == SPHERE:
        segment = np.sin(3.0 * np.arctan2(normals[:, 2], normals[:, 0])) > 0
        return np.where(segment[:, None], colour, accent)
    ring = np.sin(2 * np.pi * y / (0.2 * scale)) > 0.3
    return np.where(ring[:, None], accent, colour)


def _invalid_depth_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sensor-like holes: a few random ellipses plus sparse dropout (about 1-4% of the pixels)."""
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    invalid = rng.uniform(size=(height, width)) < 0.004
    for _ in range(int(rng.integers(1, 4))):
        centre_v, centre_u = rng.uniform(0, height), rng.uniform(0, width)
        radius_v, radius_u = rng.uniform(0.02, 0.08) * height, rng.uniform(0.02, 0.08) * width
        invalid |= ((rows - centre_v) / radius_v) ** 2 + ((cols - centre_u) / radius_u) ** 2 <= 1.0
    return invalid


def render(scene: Scene, height: int, width: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Ray casts `scene`; returns the record fields image, segmentation, depth, normal (see module docstring)."""
    camera = intrinsics(height, width)
    v, u = np.mgrid[0:height, 0:width] + 0.5
    rays_camera = np.stack([(u - camera["cx"]) / camera["fx"], (v - camera["cy"]) / camera["fy"],
                            np.ones_like(u)], axis=-1).reshape(-1, 3)
    directions = rays_camera @ scene.camera_rotation.T
    origin = scene.camera_position

    t, class_id, normals = _intersect_room(origin, directions, scene.room_size)
    instance = class_id.copy()
    t_object, object_index, object_normals = _cast_objects(origin, directions, scene.objects)
    on_object = t_object < t
    t = np.where(on_object, t_object, t)
    normals = np.where(on_object[:, None], object_normals, normals)
    object_classes = np.array([o.class_id for o in scene.objects] + [0])
    class_id = np.where(on_object, object_classes[object_index], class_id)
    instance = np.where(on_object, len(CLASS_NAMES) + object_index, instance)
    points = origin + t[:, None] * directions

    albedo = np.zeros_like(points)
    for surface in (FLOOR, WALL, CEILING):
        mask = (~on_object) & (class_id == surface)
        albedo[mask] = _surface_albedo(surface, points[mask], scene.surface_colours[surface],
                                       scene.surface_colours[FLOOR], scene.surface_pattern_scale[surface])
    for index, scene_object in enumerate(scene.objects):
        mask = on_object & (object_index == index)
        albedo[mask] = _object_albedo(scene_object, points[mask], normals[mask])

    to_light = scene.light_position - points
    distance = np.linalg.norm(to_light, axis=-1)
    lambert = np.maximum(np.einsum("ij,ij->i", normals, to_light) / distance, 0.0)
    t_blocker, _, _ = _cast_objects(points + 1e-3 * normals, to_light, scene.objects)
    lit = (t_blocker >= 1.0).astype(np.float64)
    radiance = scene.ambient + 1.1 * lambert * lit / (1.0 + 0.04 * distance**2)
    image = albedo * radiance[:, None] * scene.light_colour
    image = image.reshape(height, width, 3) + rng.normal(0.0, 0.02, size=(height, width, 3))

    depth = t.reshape(height, width)
    normal_camera = (normals @ scene.camera_rotation).reshape(height, width, 3)
    normal_camera /= np.linalg.norm(normal_camera, axis=-1, keepdims=True)
    segmentation = class_id.reshape(height, width).astype(np.uint8)
    segmentation[_occlusion_boundaries(instance.reshape(height, width), depth)] = IGNORE_LABEL
    invalid = _invalid_depth_mask(rng, height, width)
    depth = np.where(invalid, 0.0, depth)
    normal_camera[invalid] = 0.0
    return {
        "image": np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8),
        "segmentation": segmentation,
        "depth": depth[..., None].astype(np.float32),
        "normal": normal_camera.astype(np.float32),
    }


def _occlusion_boundaries(instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Occluded-side pixels of depth jumps (> 5%) between instances: labelled ignore, like annotation gaps."""
    boundary = np.zeros(instance.shape, bool)
    for axis in (0, 1):
        before, after = np.delete(depth, -1, axis=axis), np.delete(depth, 0, axis=axis)
        edge = (np.diff(instance, axis=axis) != 0) & (np.abs(after - before) > 0.05 * np.minimum(before, after))
        pad_before, pad_after = [(0, 0), (0, 0)], [(0, 0), (0, 0)]
        pad_before[axis], pad_after[axis] = (1, 0), (0, 1)
        boundary |= np.pad(edge & (after > before), pad_before) | np.pad(edge & (after <= before), pad_after)
    return boundary


def render_example(seed: int, split: str, index: int, height: int, width: int) -> dict[str, np.ndarray]:
    """The example `index` of `split`: deterministic from (seed, split, index) alone."""
    split_code = int.from_bytes(split.encode(), "little") % (2**31)
    rng = np.random.default_rng([seed, split_code, index])
    return render(sample_scene(rng), height, width, rng)

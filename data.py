"""The data CamGeo trains and evaluates on by default: a synthetic world of rooms (RealEstate10K-format folders:
re10k.py).

Nothing can be downloaded on our machines, so the default dataset is a procedural imitation of
RealEstate10K (indoor walkthroughs) at toy scale. Every clip is a deterministic function of an
integer seed: the seed draws a room with a few textured objects, a smooth camera path with
hand-shake, and a field of view; a vectorised torch ray-caster then renders RGB and exact depth.
Because cameras and depth are exact, the same clips are the ground truth for the geometric
evaluation and the training data of the small VGGT teacher.

World frame (metres). The room is the axis-aligned box |x| <= W/2, |y| <= H/2, |z| <= D/2. The
world y axis points DOWN, like the y axis of an OpenCV camera: the floor is the plane y = +H/2 and
the ceiling y = -H/2. So a camera whose w2c rotation is the identity is upright and looks along
+z. A camera's yaw turns it about the vertical (y) axis, with forward = (sin yaw, 0, cos yaw);
positive pitch looks down.

Time. A camera path is a function of continuous time s in [0, 1]; frame i of an F-frame clip is
s = i / (F - 1) (a one-frame clip is s = 0). num_frames therefore changes only how densely the
same path is sampled, and height / width change only the pixel grid: the same seed gives the same
scene, path and field of view at any clip length and resolution.

Public API: render_clip, SyntheticClips, frames_to_uint8. Lower-level pieces used by the tests: sample_world
(scene + path without rendering), object_clearance, render.

    python data.py --gif clip.gif --seed 3 --frames 16 --size 64   # look at a clip
    python data.py --bench                                         # clips per second, one core
"""
import argparse
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Scene constants. The paper trains on RealEstate10K; these ranges make toy indoor rooms.

ROOM_WIDTH_RANGE = (4.0, 8.0)  # x extent, metres
ROOM_DEPTH_RANGE = (4.0, 8.0)  # z extent
ROOM_HEIGHT_RANGE = (2.5, 3.5)  # y extent
NUM_OBJECTS_RANGE = (2, 5)  # inclusive
OBJECT_KINDS = ("box", "ball", "cylinder")
OBJECT_WALL_GAP = 0.3  # objects keep this far from the walls
OBJECT_OBJECT_GAP = 0.3  # and this far apart (between bounding circles on the floor)

# Named colours (linear-ish RGB). The prompt names them, so text conditioning carries meaning.
COLOURS = {
    "red": (0.80, 0.15, 0.15), "orange": (0.95, 0.55, 0.10), "yellow": (0.95, 0.85, 0.20),
    "green": (0.20, 0.65, 0.25), "teal": (0.10, 0.60, 0.60), "blue": (0.15, 0.30, 0.85),
    "purple": (0.55, 0.25, 0.70), "pink": (0.95, 0.55, 0.70), "brown": (0.50, 0.32, 0.18),
    "grey": (0.55, 0.55, 0.55), "white": (0.92, 0.92, 0.90),
}
PATTERNS = ("striped", "checkered", "mottled")
# Texture periods in metres. Long enough that the pattern survives 32x32 pixels (a wall 3 m away
# spans about 30 pixels there), short enough that motion and parallax are visible.
ROOM_PERIOD_RANGE = (0.8, 1.4)
OBJECT_PERIOD_RANGE = (0.4, 0.8)  # objects are 0.3-1.2 m: one to three stripes or cells
EDGE_SHARPNESS = 3.0  # tanh gain that turns a sine into a soft square wave: smooth, not aliased
NOISE_TABLE_SIZE = 16  # lattice of the value noise (wraps around every 16 cells)

# Fake directional light from above. It depends only on the surface normal, so shading is the
# same from every view (Lambertian world: a surface point has one colour).
LIGHT_DIRECTION = (0.4, -1.0, 0.3)  # towards the light; y is down, so "up and a bit aside"
AMBIENT = 0.6

# ----------------------------------------------------------------------------------------------
# Camera constants.

FOV_X_RANGE_DEG = (50.0, 70.0)  # horizontal field of view, drawn per clip; square pixels
EYE_HEIGHT_RANGE = (1.0, 1.5)  # above the floor, metres
PATH_KINDS = ("dolly", "pan", "truck", "orbit", "dolly_pan", "truck_pan")
EASE = 0.5  # mix of constant speed and smoothstep: walkthroughs speed up and slow down
PITCH_RANGE_DEG = (-2.0, 12.0)  # start/end pitch; slightly biased downwards, towards the objects
# Hand-shake: a sum of a few random-phase sinusoids, low frequency (cycles per clip), so that
# SLERP between sparse keyframes is wrong in between: the case the paper is about.
SHAKE_NUM_SINES = 3
SHAKE_FREQ_RANGE = (0.7, 3.0)  # cycles per clip
SHAKE_POSITION_AMPLITUDE = 0.015  # metres per sinusoid (sum of three: a few cm)
SHAKE_ROTATION_AMPLITUDE_DEG = 0.5  # degrees per sinusoid (sum: a degree or two)
ROOM_MARGIN = 0.3  # camera centre keeps this far from walls, floor and ceiling
OBJECT_MARGIN = 0.3  # and this far from every object surface
PATH_CHECK_SAMPLES = 65  # fixed check times, independent of num_frames, so paths never depend on it
MAX_PATH_TRIES = 50  # per scene; then the scene is redrawn (same generator: still deterministic)
MAX_SCENE_TRIES = 20

# Dataset splits: disjoint seed ranges [start, stop).
SPLIT_SEEDS = {"train": (0, 1_000_000), "val": (1_000_000, 1_100_000), "test": (2_000_000, 2_100_000)}

SUPERSAMPLE_FACTORS = (1, 3)  # odd, so the centre sub-sample is the pixel centre (exact depth)
RAY_EPS = 1e-4  # hits closer than this along the ray are ignored
DIRECTION_EPS = 1e-9  # stand-in for a zero ray-direction component (avoids 0/0 in slab tests)

# ----------------------------------------------------------------------------------------------
# The scene


@dataclass
class Material:
    """A texture that is a function of the 3D surface point (and of which face it is on)."""
    colour_name: str
    pattern: str  # one of PATTERNS
    colour: torch.Tensor  # (3,)
    second_colour: torch.Tensor  # (3,) a lighter or darker shade of the same colour
    period: float  # metres
    axis: torch.Tensor  # (3,) unit, the stripe direction
    phase: torch.Tensor  # (3,) radians
    noise_table: torch.Tensor  # (NOISE_TABLE_SIZE**3,) values in [0, 1] for "mottled"


@dataclass
class SceneObject:
    kind: str  # "box" | "ball" | "cylinder"; all rest on the floor
    centre: np.ndarray  # (3,) world
    half_size: np.ndarray  # (3,) box half extents; ball: (r, r, r); cylinder: (r, half height, r)
    yaw: float  # boxes only: rotation about the vertical axis, radians
    material: Material

    def footprint_radius(self):
        return float(np.hypot(self.half_size[0], self.half_size[2]) if self.kind == "box" else self.half_size[0])


@dataclass
class Scene:
    size: np.ndarray  # (3,) room extents W, H, D
    walls: Material
    floor: Material
    ceiling: Material
    objects: list = field(default_factory=list)

    def prompt(self):
        """The scene in words, from its actual attributes, e.g. "a room with striped red walls and a
        mottled grey floor, with a checkered blue box and a striped yellow ball"."""
        room = (f"a room with {self.walls.pattern} {self.walls.colour_name} walls and a "
                f"{self.floor.pattern} {self.floor.colour_name} floor")
        things = [f"a {o.material.pattern} {o.material.colour_name} {o.kind}" for o in self.objects]
        if not things:
            return room
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{room}, with {listed}"


def yaw_rotation(yaw):
    """Rotation about the world y axis taking +z to (sin yaw, 0, cos yaw). (3, 3) float64."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def ease(s):
    """Progress along a path at time s in [0, 1] (a float or an array): a mix (EASE) of constant speed and
    smoothstep, so a walkthrough speeds up and slows down."""
    return (1 - EASE) * s + EASE * s * s * (3 - 2 * s)


def pick(rng, options):
    # rng.choice would do, but it is slow on small lists and this runs for every clip.
    return options[int(rng.integers(len(options)))]


def random_signs(rng, count):
    return np.where(rng.random(count) < 0.5, -1.0, 1.0)


def sample_material(rng, period_range, colour_names):
    colour_name = pick(rng, colour_names)
    colour = np.array(COLOURS[colour_name])
    # Pair the named colour with a darker or lighter shade of itself so the name stays true.
    if colour_name == "white" or rng.random() < 0.5:
        second = colour * 0.55
    else:
        second = colour + 0.5 * (1.0 - colour)
    # Stripe axis with every component sizeable, so stripes show on every axis-aligned face.
    axis = rng.uniform(0.4, 1.0, size=3) * random_signs(rng, 3)
    axis = axis / np.linalg.norm(axis)
    as_torch = lambda a: torch.tensor(a, dtype=torch.float32)
    return Material(
        colour_name=colour_name, pattern=pick(rng, PATTERNS), colour=as_torch(colour),
        second_colour=as_torch(second), period=float(rng.uniform(*period_range)), axis=as_torch(axis),
        phase=as_torch(rng.uniform(0, 2 * math.pi, size=3)),
        noise_table=as_torch(rng.random(NOISE_TABLE_SIZE ** 3)))


def sample_scene(rng):
    """A room and 2-5 non-overlapping objects standing on its floor."""
    size = np.array([rng.uniform(*ROOM_WIDTH_RANGE), rng.uniform(*ROOM_HEIGHT_RANGE),
                     rng.uniform(*ROOM_DEPTH_RANGE)])  # W, H, D
    all_colours = list(COLOURS)
    walls = sample_material(rng, ROOM_PERIOD_RANGE, all_colours)
    floor = sample_material(rng, ROOM_PERIOD_RANGE, [c for c in all_colours if c != walls.colour_name])
    ceiling = sample_material(rng, ROOM_PERIOD_RANGE, [c for c in ("white", "grey") if c != walls.colour_name])
    scene = Scene(size=size, walls=walls, floor=floor, ceiling=ceiling)
    floor_y = size[1] / 2
    num_objects = int(rng.integers(NUM_OBJECTS_RANGE[0], NUM_OBJECTS_RANGE[1] + 1))
    object_colours = [c for c in all_colours if c not in (walls.colour_name, floor.colour_name)]
    for _ in range(num_objects):
        kind = pick(rng, OBJECT_KINDS)
        material = sample_material(rng, OBJECT_PERIOD_RANGE, object_colours)
        if kind == "box":
            half = rng.uniform([0.2, 0.2, 0.2], [0.6, 0.6, 0.6])
            yaw = float(rng.uniform(0, math.pi / 2)) if rng.random() < 0.5 else 0.0
        elif kind == "ball":
            half, yaw = np.full(3, rng.uniform(0.2, 0.5)), 0.0
        else:
            radius = rng.uniform(0.15, 0.4)
            half, yaw = np.array([radius, rng.uniform(0.2, 0.75), radius]), 0.0
        obj = SceneObject(kind, np.zeros(3), half, yaw, material)
        reach = obj.footprint_radius() + OBJECT_WALL_GAP
        if reach >= size[0] / 2 - 0.5 or reach >= size[2] / 2 - 0.5:
            continue
        for _ in range(20):  # rejection-sample a free spot on the floor; give up on this object if none
            x = rng.uniform(-size[0] / 2 + reach, size[0] / 2 - reach)
            z = rng.uniform(-size[2] / 2 + reach, size[2] / 2 - reach)
            gaps = [np.hypot(x - o.centre[0], z - o.centre[2]) - o.footprint_radius() - obj.footprint_radius()
                    for o in scene.objects]
            free = all(gap > OBJECT_OBJECT_GAP for gap in gaps)
            if free:
                obj.centre = np.array([x, floor_y - half[1], z])
                scene.objects.append(obj)
                break
    return scene


def object_clearance(scene, points):
    """Signed distance from points (N, 3) to the nearest object surface (negative inside). (N,)"""
    distances = [np.full(len(points), np.inf)]
    for obj in scene.objects:
        local = (points - obj.centre) @ yaw_rotation(obj.yaw)  # (N, 3) in the object's frame
        if obj.kind == "box":
            q = np.abs(local) - obj.half_size
            d = np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)
        elif obj.kind == "ball":
            d = np.linalg.norm(local, axis=1) - obj.half_size[0]
        else:
            radial = np.hypot(local[:, 0], local[:, 2]) - obj.half_size[0]
            q = np.stack([radial, np.abs(local[:, 1]) - obj.half_size[1]], 1)
            d = np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)
        distances.append(d)
    return np.min(np.stack(distances), axis=0)


# ----------------------------------------------------------------------------------------------
# Camera paths


@dataclass
class CameraPath:
    """A smooth base motion plus hand-shake, as a function of continuous time s in [0, 1]."""
    kind: str
    start: np.ndarray  # (3,) camera centre at s = 0 (not used by "orbit")
    displacement: np.ndarray  # (3,) centre moves start -> start + displacement
    yaw: tuple  # (start, end) radians
    pitch: tuple  # (start, end) radians, positive looks down
    orbit_centre: np.ndarray  # (3,) for "orbit": circle centre at eye height
    orbit_radius: float
    shake_freq: np.ndarray  # (6, SHAKE_NUM_SINES) cycles per clip: x, y, z, yaw, pitch, roll
    shake_phase: np.ndarray  # (6, SHAKE_NUM_SINES)
    shake_amplitude: np.ndarray  # (6, SHAKE_NUM_SINES) metres / radians

    def c2w(self, times):
        """Camera-to-world poses at times (T,) in [0, 1]. (T, 4, 4) float64."""
        s = np.asarray(times, dtype=np.float64)
        eased = ease(s)
        waves = np.sin(2 * math.pi * self.shake_freq[:, :, None] * s + self.shake_phase[:, :, None])
        shake = (self.shake_amplitude[:, :, None] * waves).sum(1)  # (6, T)
        base_yaw = self.yaw[0] + eased * (self.yaw[1] - self.yaw[0])
        yaw = base_yaw + shake[3]
        pitch = self.pitch[0] + eased * (self.pitch[1] - self.pitch[0]) + shake[4]
        roll = shake[5]
        if self.kind == "orbit":  # base_yaw is the angle around the orbit centre; the camera faces it
            direction = np.stack([np.sin(base_yaw), np.zeros_like(s), np.cos(base_yaw)], 1)
            centre = self.orbit_centre - self.orbit_radius * direction
        else:
            centre = self.start + eased[:, None] * self.displacement
        centre = centre + shake[:3].T
        zero, one = np.zeros_like(s), np.ones_like(s)
        cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
        matrix = lambda rows: np.stack([np.stack(row, -1) for row in rows], -2)  # nested (T,) -> (T, 3, 3)
        r_yaw = matrix([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
        r_pitch = matrix([[one, zero, zero], [zero, cp, sp], [zero, -sp, cp]])  # +z -> (0, sin p, cos p): down
        r_roll = matrix([[cr, -sr, zero], [sr, cr, zero], [zero, zero, one]])
        poses = np.tile(np.eye(4), (len(s), 1, 1))
        poses[:, :3, :3] = r_yaw @ r_pitch @ r_roll
        poses[:, :3, 3] = centre
        return poses


def sample_path(rng, scene):
    """One candidate path (not yet checked against the room and the objects)."""
    width, height, depth = scene.size
    eye_y = height / 2 - rng.uniform(EYE_HEIGHT_RANGE[0], min(EYE_HEIGHT_RANGE[1], height - ROOM_MARGIN - 0.2))
    kind = pick(rng, PATH_KINDS)
    deg = math.radians
    start = np.array([rng.uniform(-width / 2 + 0.6, width / 2 - 0.6), eye_y,
                      rng.uniform(-depth / 2 + 0.6, depth / 2 - 0.6)])
    # Look towards the room centre or an object, give or take 20 degrees, so the view is of the room.
    targets = [np.zeros(3)] + [o.centre for o in scene.objects]
    target = targets[int(rng.integers(len(targets)))]
    yaw0 = math.atan2(target[0] - start[0], target[2] - start[2]) + deg(rng.uniform(-20, 20))
    forward, right = np.array([math.sin(yaw0), 0, math.cos(yaw0)]), np.array([math.cos(yaw0), 0, -math.sin(yaw0)])
    sign = float(random_signs(rng, 1)[0])
    displacement, yaw_change = np.zeros(3), 0.0
    orbit_centre, orbit_radius = np.zeros(3), 0.0
    if kind == "dolly":
        displacement = sign * rng.uniform(0.6, 1.5) * forward
    elif kind == "pan":
        yaw_change = sign * deg(rng.uniform(20, 50))
        displacement = rng.uniform(-0.1, 0.1) * forward
    elif kind == "truck":
        displacement = sign * rng.uniform(0.5, 1.2) * right
    elif kind == "dolly_pan":
        displacement = sign * rng.uniform(0.4, 1.0) * forward
        yaw_change = float(random_signs(rng, 1)[0]) * deg(rng.uniform(10, 30))
    elif kind == "truck_pan":  # slide sideways while turning back towards where we were looking
        displacement = sign * rng.uniform(0.5, 1.0) * right
        yaw_change = -sign * deg(rng.uniform(10, 25))
    else:  # orbit around an object (or the room centre if there is none)
        obj = scene.objects[int(rng.integers(len(scene.objects)))] if scene.objects else None
        orbit_centre = np.array([obj.centre[0] if obj else 0.0, eye_y, obj.centre[2] if obj else 0.0])
        orbit_radius = (obj.footprint_radius() if obj else 0.0) + rng.uniform(1.0, 2.0)
        yaw0 = float(rng.uniform(0, 2 * math.pi))
        yaw_change = sign * deg(rng.uniform(20, 45))
    pitch = (deg(rng.uniform(*PITCH_RANGE_DEG)), deg(rng.uniform(*PITCH_RANGE_DEG)))
    amplitude = np.concatenate([np.full((3, SHAKE_NUM_SINES), SHAKE_POSITION_AMPLITUDE),
                                np.full((3, SHAKE_NUM_SINES), deg(SHAKE_ROTATION_AMPLITUDE_DEG))])
    return CameraPath(
        kind=kind, start=start, displacement=displacement, yaw=(yaw0, yaw0 + yaw_change), pitch=pitch,
        orbit_centre=orbit_centre, orbit_radius=float(orbit_radius),
        shake_freq=rng.uniform(*SHAKE_FREQ_RANGE, size=(6, SHAKE_NUM_SINES)),
        shake_phase=rng.uniform(0, 2 * math.pi, size=(6, SHAKE_NUM_SINES)),
        shake_amplitude=amplitude * rng.uniform(0.5, 1.0, size=(6, SHAKE_NUM_SINES)))


def path_is_valid(scene, path):
    centres = path.c2w(np.linspace(0, 1, PATH_CHECK_SAMPLES))[:, :3, 3]  # (S, 3)
    inside_room = np.all(np.abs(centres) <= scene.size / 2 - ROOM_MARGIN)
    return bool(inside_room and np.all(object_clearance(scene, centres) >= OBJECT_MARGIN))


@dataclass
class World:
    scene: Scene
    path: CameraPath
    fov_x: float  # radians, horizontal

    def intrinsics(self, height, width):
        """K (3, 3) float32 in pixels of a height x width image; square pixels, centred principal point."""
        focal = (width / 2) / math.tan(self.fov_x / 2)
        return torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=torch.float32)


def sample_world(seed):
    """Scene, camera path and field of view for a seed, without rendering. Deterministic in seed.

    A path that leaves the room (with ROOM_MARGIN) or comes within OBJECT_MARGIN of an object
    is redrawn from the same generator; after MAX_PATH_TRIES the scene itself is redrawn.
    """
    rng = np.random.default_rng(seed)
    for _ in range(MAX_SCENE_TRIES):
        scene = sample_scene(rng)
        for _ in range(MAX_PATH_TRIES):
            path = sample_path(rng, scene)
            if path_is_valid(scene, path):
                return World(scene, path, math.radians(rng.uniform(*FOV_X_RANGE_DEG)))
    raise RuntimeError(f"seed {seed}: no valid camera path found; widen the margins or ranges")


def frame_times(num_frames):
    """Continuous times in [0, 1] of the frames of a clip. (F,)"""
    return np.linspace(0, 1, num_frames) if num_frames > 1 else np.zeros(1)


# ----------------------------------------------------------------------------------------------
# Ray casting. Rays are o + t * d with d = R_c2w @ K^-1 [u, v, 1]: d has camera z = 1, so the hit
# parameter t is already the depth along the optical axis. Shapes: origins (F, 1, 3), dirs (F, P, 3).


def safe_directions(d):
    # Replace zero components by a tiny positive number so slab tests never divide 0 by 0.
    return torch.where(d.abs() < DIRECTION_EPS, torch.full_like(d, DIRECTION_EPS), d)


def intersect_room(half, origins, dirs):
    """Exit point of rays from inside the room box. -> t (F, P), inward normal (F, P, 3), face (F, P)
    with face 0 = wall, 1 = floor, 2 = ceiling."""
    d = safe_directions(dirs)
    bound = torch.where(d > 0, half, -half)
    t_axis = (bound - origins) / d  # (F, P, 3)
    t, axis = t_axis.min(-1)
    normal = -torch.sign(d) * torch.nn.functional.one_hot(axis, 3).to(d.dtype)
    going_down = d[..., 1] > 0  # y is down: rays going down end on the floor
    face = torch.where(axis == 1, torch.where(going_down, 1, 2), 0)
    return t, normal, face


def intersect_box(obj, origins, dirs):
    """Slab test in the box's own frame (boxes may be turned about the vertical axis)."""
    rotation = torch.tensor(yaw_rotation(obj.yaw), dtype=torch.float32)
    o = (origins - torch.tensor(obj.centre, dtype=torch.float32)) @ rotation  # world -> box frame
    d = safe_directions(dirs @ rotation)
    half = torch.tensor(obj.half_size, dtype=torch.float32)
    t1, t2 = (-half - o) / d, (half - o) / d
    t_enter, axis = torch.minimum(t1, t2).max(-1)
    t_exit = torch.maximum(t1, t2).min(-1).values
    hit = (t_enter <= t_exit) & (t_enter > RAY_EPS)
    normal_local = -torch.sign(d) * torch.nn.functional.one_hot(axis, 3).to(d.dtype)
    return torch.where(hit, t_enter, torch.inf), normal_local @ rotation.T


def intersect_ball(obj, origins, dirs):
    centre, radius = torch.tensor(obj.centre, dtype=torch.float32), float(obj.half_size[0])
    oc = origins - centre
    a = (dirs * dirs).sum(-1)
    b = (oc * dirs).sum(-1)
    c = (oc * oc).sum(-1) - radius ** 2
    discriminant = b * b - a * c
    t = (-b - discriminant.clamp(min=0).sqrt()) / a
    hit = (discriminant > 0) & (t > RAY_EPS)
    t = torch.where(hit, t, torch.inf)
    normal = (origins + t.clamp(max=1e6)[..., None] * dirs - centre) / radius
    return t, normal


def intersect_cylinder(obj, origins, dirs):
    """Vertical cylinder: the side (a circle in x-z) and the two flat caps."""
    centre = torch.tensor(obj.centre, dtype=torch.float32)
    radius, half_height = float(obj.half_size[0]), float(obj.half_size[1])
    oc = origins - centre
    a = (dirs[..., 0] ** 2 + dirs[..., 2] ** 2).clamp(min=DIRECTION_EPS)
    b = oc[..., 0] * dirs[..., 0] + oc[..., 2] * dirs[..., 2]
    c = oc[..., 0] ** 2 + oc[..., 2] ** 2 - radius ** 2
    discriminant = b * b - a * c
    t_side = (-b - discriminant.clamp(min=0).sqrt()) / a
    y_side = oc[..., 1] + t_side * dirs[..., 1]
    side_hit = (discriminant > 0) & (t_side > RAY_EPS) & (y_side.abs() <= half_height)
    t_side = torch.where(side_hit, t_side, torch.inf)
    dy = safe_directions(dirs[..., 1])
    t_caps = []
    for cap_y in (-half_height, half_height):
        t_cap = (cap_y - oc[..., 1]) / dy
        x, z = oc[..., 0] + t_cap * dirs[..., 0], oc[..., 2] + t_cap * dirs[..., 2]
        t_caps.append(torch.where((x * x + z * z <= radius ** 2) & (t_cap > RAY_EPS), t_cap, torch.inf))
    t_all = torch.stack([t_side] + t_caps, -1)  # (F, P, 3)
    t, part = t_all.min(-1)
    point = oc + t.clamp(max=1e6)[..., None] * dirs
    side_normal = point * torch.tensor([1.0, 0.0, 1.0]) / radius
    cap_normal = torch.zeros_like(point)
    cap_normal[..., 1] = torch.where(part == 1, -1.0, 1.0)  # part 1 is the top cap (smaller y: up)
    return t, torch.where((part == 0)[..., None], side_normal, cap_normal)


# ----------------------------------------------------------------------------------------------
# Textures and shading


def value_noise(material, points):
    """Smooth 3D value noise in [0, 1]: trilinear interpolation of a random lattice. (N,)"""
    n = NOISE_TABLE_SIZE
    grid = points / material.period + material.phase
    cell = torch.floor(grid)
    frac = grid - cell
    frac = frac * frac * (3 - 2 * frac)  # smoothstep: no visible lattice creases
    corners = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)])  # (8, 3) cube corners
    lattice = (cell.long()[:, None, :] + corners) % n  # (N, 8, 3)
    values = material.noise_table[(lattice * torch.tensor([n * n, n, 1])).sum(-1)]  # (N, 8)
    weights = torch.where(corners.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)  # (N, 8) trilinear
    return (weights * values).sum(-1)


def texture(material, points, normals):
    """Albedo (N, 3) of surface points (N, 3) with normals (N, 3), both in the surface's own frame."""
    if material.pattern == "striped":
        wave = torch.sin(2 * math.pi * (points @ material.axis) / material.period + material.phase[0])
        mix = 0.5 + 0.5 * torch.tanh(EDGE_SHARPNESS * wave)
    elif material.pattern == "checkered":
        # 2D checker on the two axes across the face: the factor along the normal is dropped, so a
        # face lying on a checker line does not turn into a grey blur.
        waves = torch.tanh(EDGE_SHARPNESS * torch.sin(math.pi * points / material.period + material.phase))
        across = torch.nn.functional.one_hot(normals.abs().argmax(-1), 3).bool()
        mix = 0.5 + 0.5 * torch.where(across, torch.ones_like(waves), waves).prod(-1)
    else:  # mottled: two octaves of value noise, contrast stretched
        noise = (value_noise(material, points) + 0.5 * value_noise(material, 2 * points + 7.0)) / 1.5
        mix = ((noise - 0.5) * 2.0 + 0.5).clamp(0, 1)
    return material.colour + mix[:, None] * (material.second_colour - material.colour)


def shading(normals):
    light = torch.tensor(LIGHT_DIRECTION, dtype=torch.float32)
    return AMBIENT + (1 - AMBIENT) * (normals @ (light / light.norm())).clamp(min=0)


def render(scene, c2w, K, height, width, supersample=1):
    """Ray-cast all frames at once. c2w (F, 4, 4), K (3, 3) pixels of height x width.

    Returns video (F, 3, H, W) in [0, 1] and depth (F, H, W): z along the optical axis at pixel
    centres. With supersample = 3, RGB averages 3x3 sub-pixel rays; depth stays the centre ray's.
    """
    if supersample not in SUPERSAMPLE_FACTORS:
        raise ValueError(f"supersample must be one of {SUPERSAMPLE_FACTORS}, got {supersample}")
    c2w = torch.as_tensor(c2w, dtype=torch.float32)
    num_frames, s = len(c2w), supersample
    rows, cols = height * s, width * s
    # Sub-pixel centres in pixel units of the H x W image; s odd, so the middle one is the centre.
    v = (torch.arange(rows, dtype=torch.float32) + 0.5) / s
    u = (torch.arange(cols, dtype=torch.float32) + 0.5) / s
    v, u = torch.meshgrid(v, u, indexing="ij")
    camera_dirs = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
    camera_dirs = camera_dirs.reshape(-1, 3)  # (P, 3), P = rows * cols
    dirs = camera_dirs @ c2w[:, :3, :3].transpose(1, 2)  # (F, P, 3) world, camera z = 1
    origins = c2w[:, None, :3, 3]  # (F, 1, 3)

    half = torch.tensor(scene.size / 2, dtype=torch.float32)
    t_room, normal_room, face = intersect_room(half, origins, dirs)
    hits = [(t_room, normal_room)]
    for obj in scene.objects:
        intersect = {"box": intersect_box, "ball": intersect_ball, "cylinder": intersect_cylinder}[obj.kind]
        hits.append(intersect(obj, origins, dirs))
    t_all = torch.stack([t for t, _ in hits], -1)  # (F, P, 1 + objects)
    depth, nearest = t_all.min(-1)
    all_normals = torch.stack([n for _, n in hits], -2)  # (F, P, 1 + objects, 3)
    normals = all_normals.gather(-2, nearest[..., None, None].expand(-1, -1, 1, 3))[..., 0, :]
    points = origins + depth[..., None] * dirs  # (F, P, 3)

    # Surface id: 0 walls, 1 floor, 2 ceiling, 3 + k object k.
    surface = torch.where(nearest == 0, face, nearest + 2)
    materials = [scene.walls, scene.floor, scene.ceiling] + [o.material for o in scene.objects]
    albedo = torch.zeros_like(points)
    for index, material in enumerate(materials):
        mask = surface == index
        if not mask.any():
            continue
        p, n = points[mask], normals[mask]
        if index >= 3:  # objects are textured in their own frame, so patterns move with them
            obj = scene.objects[index - 3]
            rotation = torch.tensor(yaw_rotation(obj.yaw), dtype=torch.float32)
            p, n = (p - torch.tensor(obj.centre, dtype=torch.float32)) @ rotation, n @ rotation
        albedo[mask] = texture(material, p, n)
    colour = (albedo * shading(normals)[..., None]).clamp(0, 1)

    video = colour.reshape(num_frames, rows, cols, 3).permute(0, 3, 1, 2)  # (F, 3, H*s, W*s)
    depth = depth.reshape(num_frames, rows, cols)
    if s > 1:
        video = torch.nn.functional.avg_pool2d(video, s)
        depth = depth[:, s // 2::s, s // 2::s]
    return video.contiguous(), depth.contiguous()


def render_clip(seed, num_frames=8, height=32, width=32, supersample=1):
    """A clip of the synthetic world. Deterministic in seed; scene and path do not depend on size.

    Returns dict(video (F, 3, H, W) float32 in [0, 1], depth (F, H, W) float32 (z along the optical
    axis), w2c (F, 4, 4) float32, K (3, 3) float32 pixels of H x W, prompt str).
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be positive, got {num_frames}, {height}, {width}")
    world = sample_world(seed)
    c2w = world.path.c2w(frame_times(num_frames))  # (F, 4, 4) float64
    K = world.intrinsics(height, width)
    video, depth = render(world.scene, c2w, K, height, width, supersample)
    return dict(video=video, depth=depth, w2c=torch.tensor(np.linalg.inv(c2w), dtype=torch.float32),
                K=K, prompt=world.scene.prompt())


class SyntheticClips(torch.utils.data.Dataset):
    """Clips of the synthetic world; item i of a split is render_clip(SPLIT_SEEDS[split][0] + i)."""

    def __init__(self, split="train", num_frames=8, height=32, width=32, length=None):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
        self.first_seed, stop = SPLIT_SEEDS[split]
        available = stop - self.first_seed
        if length is not None and not 0 < length <= available:
            raise ValueError(f"length must be in 1..{available} for split {split!r}, got {length}")
        self.length = available if length is None else length
        self.num_frames, self.height, self.width = num_frames, height, width

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        return render_clip(self.first_seed + index, self.num_frames, self.height, self.width)


# ----------------------------------------------------------------------------------------------
# Image files


def frames_to_uint8(video):
    """(F, 3, H, W) float video in [0, 1] -> (F, H, W, 3) uint8 numpy frames, as image files store them."""
    return (video.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------
# Command line: look at a clip, or measure the renderer.


def save_gif(video, path, frame_ms=100):
    frames = frames_to_uint8(video)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def bench():
    torch.set_num_threads(1)
    print("render_clip on one CPU thread (scene + path + RGB + depth)")
    for num_frames, size in ((8, 32), (16, 32), (16, 64), (16, 128)):
        render_clip(0, num_frames, size, size)  # warm-up
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < 2.0:
            render_clip(count, num_frames, size, size)
            count += 1
        elapsed = (time.perf_counter() - start) / count
        print(f"  {num_frames:2d} frames {size:3d}x{size:<3d}: {1 / elapsed:7.1f} clips/s  "
              f"({1000 * elapsed:6.1f} ms/clip)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gif", help="render a clip to this animated GIF and print its prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="height and width in pixels")
    parser.add_argument("--supersample", type=int, default=1, choices=SUPERSAMPLE_FACTORS,
                        help="RGB anti-aliasing: average s x s rays per pixel")
    parser.add_argument("--bench", action="store_true", help="print clips/s for a few sizes on one thread")
    args = parser.parse_args()
    if not args.gif and not args.bench:
        parser.error("give --gif PATH and/or --bench")
    if args.gif:
        clip = render_clip(args.seed, args.frames, args.size, args.size, supersample=args.supersample)
        save_gif(clip["video"], args.gif)
        print(clip["prompt"])
    if args.bench:
        bench()

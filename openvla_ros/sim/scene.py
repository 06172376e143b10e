"""The simulated workcell: a Franka Panda (pybullet_data) on a table with a red and a blue cube.

pybullet runs in DIRECT mode (no GUI, no OpenGL) and only advances when `step()` is called, so the
simulation can run faster or slower than real time and tests drive it deterministically: the same
seed gives the same cube placement and the same trajectory. Time is simulated (`scene.time`), never
read from the wall clock.

Frames: the robot base (panda_link0) sits at the world origin on the table top (z = 0), so world
coordinates are base-frame coordinates, which is what the IK's workspace box and twists use.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np
import pybullet
import pybullet_data

PANDA_URDF_RELPATH = os.path.join("franka_panda", "panda.urdf")
PANDA_ARM_JOINTS = tuple(f"panda_joint{i}" for i in range(1, 8))
PANDA_FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")
PANDA_BASE_FRAME = "panda_link0"
PANDA_TIP_FRAME = "panda_grasptarget"  # between the fingertips, 0.105 m below panda_hand
# Franka's "ready" posture: hand pointing down above the table, elbow up, far from limits.
PANDA_REST_POSTURE = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)
PANDA_FINGER_OPEN_M = 0.04  # per finger, from the URDF's upper limit

DEFAULT_PHYSICS_HZ = 240.0
CUBE_COLOURS = {"red": (0.85, 0.1, 0.1, 1.0), "blue": (0.1, 0.25, 0.85, 1.0)}
# 5 cm: from the default camera a cube then spans ~20 px, most of one 28 px cell of the demo's tiny
# backbone (4 cm cubes trained to 0.1-0.2 closed-loop success where 5 cm reached 0.3, issue #8).
DEFAULT_CUBE_SIZE_M = 0.05
# Cube centres are drawn in this base-frame rectangle: in front of the robot, comfortably inside
# its reach with the hand pointing down, and inside the default camera's view.
DEFAULT_CUBE_REGION = ((0.40, -0.22), (0.65, 0.22))
DEFAULT_MIN_CUBE_SEPARATION_M = 0.12
# Randomised episode starts put the tip in this base-frame box (hand pointing down): over the whole
# cube region, from just above the cubes' tops up to the rest posture's height (0.49 m).
START_TIP_REGION = ((0.30, -0.25, 0.08), (0.65, 0.25, 0.45))
START_MIN_CUBE_CLEARANCE_M = 0.08  # a random start this close to a cube centre is redrawn
SUCCESS_RADIUS_M = 0.05  # tip within this distance of the target cube's centre = reached
TASK_REACH_CUBE = "reach-cube"

TABLE_SIZE_M = (1.2, 1.2, 0.04)
TABLE_CENTRE_XY = (0.35, 0.0)
TABLE_COLOUR = (0.75, 0.68, 0.55, 1.0)
TABLE_HEIGHT_M = 0.6  # the floor plane lies this far below the table top

_INSTRUCTION_RE = re.compile(r"\b(" + "|".join(CUBE_COLOURS) + r")\b", re.IGNORECASE)


def panda_urdf_path() -> str:
    """The Franka Panda URDF shipped with pybullet_data (also what the IK loads)."""
    return os.path.join(pybullet_data.getDataPath(), PANDA_URDF_RELPATH)


def instruction_for(target: str, task: str = TASK_REACH_CUBE) -> str:
    """Language instruction of the task for a target colour, e.g. "reach the red cube"."""
    _check_colour(target)
    if task != TASK_REACH_CUBE:
        raise ValueError(f"unknown task {task!r}; known: {TASK_REACH_CUBE!r}")
    return f"reach the {target} cube"


def target_from_instruction(instruction: str) -> str:
    """The cube colour an instruction names (exactly one colour must be named)."""
    found = {m.lower() for m in _INSTRUCTION_RE.findall(str(instruction))}
    if len(found) != 1:
        raise ValueError(f"instruction {instruction!r} must name exactly one of {sorted(CUBE_COLOURS)}")
    return found.pop()


def target_for_seed(seed: int) -> str:
    """Target colour of seeded episode `seed` (drawn from its own stream, both colours occur)."""
    rng = np.random.default_rng([int(seed), 1])
    colours = sorted(CUBE_COLOURS)
    return colours[int(rng.integers(len(colours)))]


def _check_colour(target: str) -> None:
    if target not in CUBE_COLOURS:
        raise ValueError(f"unknown cube colour {target!r}; known: {sorted(CUBE_COLOURS)}")


@dataclass(frozen=True)
class CameraConfig:
    """Pinhole camera looking at the workspace; `fov_deg` is the vertical field of view."""

    width: int = 224
    height: int = 224
    # In front of the robot, above the table, looking down at the cube region: the cubes fill more
    # of the frame than from a level view (a learnt policy localises them better) and the hand is in
    # view from the rest posture on.
    eye: tuple[float, float, float] = (1.05, 0.0, 0.95)
    target: tuple[float, float, float] = (0.42, 0.0, 0.08)
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    fov_deg: float = 48.0
    near: float = 0.05
    far: float = 3.0

    def __post_init__(self):
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 8 or v > 4096:
                raise ValueError(f"camera {name} must be an integer in [8, 4096], got {v!r}")
        for name in ("eye", "target", "up"):
            v = np.asarray(getattr(self, name), dtype=float)
            if v.shape != (3,) or not np.all(np.isfinite(v)):
                raise ValueError(f"camera {name} must be 3 finite numbers, got {getattr(self, name)!r}")
        if np.linalg.norm(np.subtract(self.target, self.eye)) < 1e-6:
            raise ValueError(f"camera eye {self.eye} and target {self.target} coincide")
        if not (0 < self.fov_deg < 180):
            raise ValueError(f"camera fov_deg must be in (0, 180), got {self.fov_deg!r}")
        if not (0 < self.near < self.far):
            raise ValueError(f"camera near/far must satisfy 0 < near < far, got {self.near}, {self.far}")

    def intrinsics(self) -> tuple[float, float, float, float]:
        """(fx, fy, cx, cy) in pixels, for a CameraInfo message."""
        fy = 0.5 * self.height / math.tan(math.radians(self.fov_deg) / 2)
        return fy, fy, 0.5 * self.width, 0.5 * self.height


class PandaScene:
    """A pybullet Panda, table, red and blue cube and camera; see the module docstring."""

    def __init__(
        self,
        seed: int = 0,
        *,
        physics_dt: float = 1.0 / DEFAULT_PHYSICS_HZ,
        camera: CameraConfig | None = None,
        cube_size: float = DEFAULT_CUBE_SIZE_M,
        cube_region: tuple[tuple[float, float], tuple[float, float]] = DEFAULT_CUBE_REGION,
        min_cube_separation: float = DEFAULT_MIN_CUBE_SEPARATION_M,
        rest_posture: tuple[float, ...] = PANDA_REST_POSTURE,
        urdf_path: str | None = None,
    ):
        if not (math.isfinite(physics_dt) and 0 < physics_dt <= 0.05):
            raise ValueError(f"physics_dt must be in (0, 0.05] s, got {physics_dt!r}")
        if not (math.isfinite(cube_size) and 0.01 <= cube_size <= 0.1):
            raise ValueError(f"cube_size must be in [0.01, 0.1] m, got {cube_size!r}")
        (x0, y0), (x1, y1) = cube_region
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"cube_region must be ((xmin, ymin), (xmax, ymax)), got {cube_region!r}")
        if math.hypot(x1 - x0, y1 - y0) < min_cube_separation:
            raise ValueError(f"cube_region {cube_region} is too small for separation {min_cube_separation} m")
        rest = np.asarray(rest_posture, dtype=float)
        if rest.shape != (len(PANDA_ARM_JOINTS),) or not np.all(np.isfinite(rest)):
            raise ValueError(f"rest_posture must be {len(PANDA_ARM_JOINTS)} finite numbers, got {rest_posture!r}")
        self.physics_dt = float(physics_dt)
        self.camera = camera or CameraConfig()
        self.cube_size = float(cube_size)
        self.cube_region = ((float(x0), float(y0)), (float(x1), float(y1)))
        self.min_cube_separation = float(min_cube_separation)
        self.rest_posture = rest
        self.urdf_path = urdf_path or panda_urdf_path()
        self._client = pybullet.connect(pybullet.DIRECT)
        self._step_count = 0
        self.seed = int(seed)
        self._cube_ids: dict[str, int] = {}
        self.reset(seed)

    # ---- lifecycle -----------------------------------------------------------------------
    def _pb(self, fn, *args, **kw):
        return fn(*args, physicsClientId=self._client, **kw)

    def _build(self) -> None:
        # Rebuilt on every reset so no solver warm-start or contact cache leaks between episodes.
        pb = pybullet
        self._pb(pb.resetSimulation)
        self._pb(pb.setGravity, 0, 0, -9.81)
        self._pb(pb.setTimeStep, self.physics_dt)
        self._pb(pb.setAdditionalSearchPath, pybullet_data.getDataPath())
        self._pb(pb.loadURDF, "plane.urdf", [0, 0, -TABLE_HEIGHT_M])
        half = [s / 2 for s in TABLE_SIZE_M]
        col = self._pb(pb.createCollisionShape, pb.GEOM_BOX, halfExtents=half)
        vis = self._pb(pb.createVisualShape, pb.GEOM_BOX, halfExtents=half, rgbaColor=TABLE_COLOUR)
        self._table = self._pb(pb.createMultiBody, 0, col, vis, [*TABLE_CENTRE_XY, -half[2]])
        self._robot = self._pb(pb.loadURDF, self.urdf_path, [0, 0, 0], useFixedBase=True,
                               flags=pb.URDF_USE_INERTIA_FROM_FILE)
        self._joint_index: dict[str, int] = {}
        self._link_index: dict[str, int] = {}
        for i in range(self._pb(pb.getNumJoints, self._robot)):
            info = self._pb(pb.getJointInfo, self._robot, i)
            self._joint_index[info[1].decode()] = i
            self._link_index[info[12].decode()] = i
        missing = [j for j in PANDA_ARM_JOINTS + PANDA_FINGER_JOINTS if j not in self._joint_index]
        if missing or PANDA_TIP_FRAME not in self._link_index:
            raise ValueError(f"{self.urdf_path} lacks Panda joints {missing} or link {PANDA_TIP_FRAME!r}")
        self._arm = [self._joint_index[j] for j in PANDA_ARM_JOINTS]
        self._fingers = [self._joint_index[j] for j in PANDA_FINGER_JOINTS]
        self._tip = self._link_index[PANDA_TIP_FRAME]
        infos = [self._pb(pb.getJointInfo, self._robot, j) for j in self._arm]
        self.joint_lower = np.array([i[8] for i in infos])
        self.joint_upper = np.array([i[9] for i in infos])
        self._max_force = [i[10] for i in infos]
        self._max_velocity = [i[11] for i in infos]
        h = self.cube_size / 2
        self._cube_ids = {}
        for colour, rgba in CUBE_COLOURS.items():
            col = self._pb(pb.createCollisionShape, pb.GEOM_BOX, halfExtents=[h, h, h])
            vis = self._pb(pb.createVisualShape, pb.GEOM_BOX, halfExtents=[h, h, h], rgbaColor=rgba)
            self._cube_ids[colour] = self._pb(pb.createMultiBody, 0.05, col, vis, [0, 0, h])

    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        """Arm at the rest posture, gripper open, cubes re-placed from `seed`; time back to 0.

        Returns the cube centre positions by colour.
        """
        if seed is not None:
            self.seed = int(seed)
        self._build()
        for j, q in zip(self._arm, self.rest_posture):
            self._pb(pybullet.resetJointState, self._robot, j, float(q))
        for j in self._fingers:
            self._pb(pybullet.resetJointState, self._robot, j, PANDA_FINGER_OPEN_M)
        self._q_target = self.rest_posture.copy()
        self._gripper_target = 1.0
        self._apply_arm_targets()
        self._apply_gripper_target()
        rng = np.random.default_rng(self.seed)
        (x0, y0), (x1, y1) = self.cube_region
        placed: list[np.ndarray] = []
        for colour in CUBE_COLOURS:  # fixed order: red then blue
            for _ in range(1000):
                xy = rng.uniform((x0, y0), (x1, y1))
                if all(np.linalg.norm(xy - p) >= self.min_cube_separation for p in placed):
                    break
            else:  # pragma: no cover - region validated against the separation in __init__
                raise ValueError(f"cannot place cubes {self.min_cube_separation} m apart in {self.cube_region}")
            placed.append(xy)
            yaw = float(rng.uniform(-math.pi / 4, math.pi / 4))
            quat = self._pb(pybullet.getQuaternionFromEuler, [0, 0, yaw])
            self._pb(pybullet.resetBasePositionAndOrientation, self._cube_ids[colour],
                     [float(xy[0]), float(xy[1]), self.cube_size / 2], quat)
        self._step_count = 0
        return self.cube_positions()

    def close(self) -> None:
        if self._client is not None and self._client >= 0:
            try:
                pybullet.disconnect(physicsClientId=self._client)
            except pybullet.error:
                pass
            self._client = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- time ----------------------------------------------------------------------------
    @property
    def time(self) -> float:
        """Simulated seconds since the last reset."""
        return self._step_count * self.physics_dt

    def step(self, n: int = 1) -> None:
        """Advance the physics by `n` fixed steps of `physics_dt`."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"step count must be a non-negative integer, got {n!r}")
        for _ in range(int(n)):
            self._pb(pybullet.stepSimulation)
        self._step_count += int(n)

    # ---- arm -----------------------------------------------------------------------------
    @property
    def joint_names(self) -> tuple[str, ...]:
        return PANDA_ARM_JOINTS

    def get_joint_positions(self) -> np.ndarray:
        states = self._pb(pybullet.getJointStates, self._robot, self._arm)
        return np.array([s[0] for s in states])

    def get_joint_velocities(self) -> np.ndarray:
        states = self._pb(pybullet.getJointStates, self._robot, self._arm)
        return np.array([s[1] for s in states])

    def joint_state(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Names, positions, velocities of the arm and finger joints (for /joint_states)."""
        idx = self._arm + self._fingers
        states = self._pb(pybullet.getJointStates, self._robot, idx)
        names = list(PANDA_ARM_JOINTS + PANDA_FINGER_JOINTS)
        return names, np.array([s[0] for s in states]), np.array([s[1] for s in states])

    def set_joint_targets(self, q) -> None:
        """Position-control targets for the 7 arm joints (radians, `joint_names` order).

        Non-finite or out-of-limit targets raise ValueError and leave the previous targets active.
        """
        self._q_target = self.validated_joint_targets(q)
        self._apply_arm_targets()

    def validated_joint_targets(self, q) -> np.ndarray:
        """`q` as 7 finite joint positions within the limits (a float array), else ValueError naming it."""
        try:
            q = np.array(q, dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"joint targets must be numeric, got {q!r}") from exc
        if q.shape != (len(self._arm),) or not np.all(np.isfinite(q)):
            raise ValueError(f"joint targets must be {len(self._arm)} finite numbers, got {q.tolist()}")
        tol = 1e-6
        bad = (q < self.joint_lower - tol) | (q > self.joint_upper + tol)
        if np.any(bad):
            names = [PANDA_ARM_JOINTS[i] for i in np.flatnonzero(bad)]
            raise ValueError(f"joint targets {q.tolist()} outside the limits of {names}")
        return q

    @property
    def joint_targets(self) -> np.ndarray:
        return self._q_target.copy()

    def set_arm_posture(self, q) -> None:
        """Teleport the arm to joint positions `q` at rest and hold them there (a start other than rest).

        Only for setting up an episode (it bypasses the dynamics); validated as `set_joint_targets`.
        """
        self.set_joint_targets(q)
        for j, value in zip(self._arm, self._q_target):
            self._pb(pybullet.resetJointState, self._robot, j, float(value))

    def _apply_arm_targets(self) -> None:
        self._pb(pybullet.setJointMotorControlArray, self._robot, self._arm, pybullet.POSITION_CONTROL,
                 targetPositions=self._q_target.tolist(), forces=self._max_force)

    def set_gripper(self, opening: float) -> None:
        """Gripper command in [0, 1]: 0 closed, 1 fully open (the /vla/gripper_command convention)."""
        try:
            v = float(opening)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"gripper opening must be a number in [0, 1], got {opening!r}") from exc
        if not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"gripper opening must be a number in [0, 1], got {opening!r}")
        self._gripper_target = v
        self._apply_gripper_target()

    def gripper_opening(self) -> float:
        """Measured opening in [0, 1] (mean of the two fingers)."""
        states = self._pb(pybullet.getJointStates, self._robot, self._fingers)
        return float(np.clip(np.mean([s[0] for s in states]) / PANDA_FINGER_OPEN_M, 0.0, 1.0))

    def _apply_gripper_target(self) -> None:
        pos = self._gripper_target * PANDA_FINGER_OPEN_M
        self._pb(pybullet.setJointMotorControlArray, self._robot, self._fingers, pybullet.POSITION_CONTROL,
                 targetPositions=[pos, pos], forces=[20.0, 20.0])

    def tip_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Tip frame (panda_grasptarget) in the base frame: position (3,), quaternion xyzw (4,)."""
        ls = self._pb(pybullet.getLinkState, self._robot, self._tip, computeForwardKinematics=True)
        return np.array(ls[4]), np.array(ls[5])

    def tip_position(self) -> np.ndarray:
        return self.tip_pose()[0]

    # ---- cubes and task ------------------------------------------------------------------
    @property
    def cube_colours(self) -> tuple[str, ...]:
        return tuple(CUBE_COLOURS)

    def cube_position(self, colour: str) -> np.ndarray:
        _check_colour(colour)
        pos, _ = self._pb(pybullet.getBasePositionAndOrientation, self._cube_ids[colour])
        return np.array(pos)

    def cube_positions(self) -> dict[str, np.ndarray]:
        return {c: self.cube_position(c) for c in CUBE_COLOURS}

    def instruction_for(self, target: str) -> str:
        return instruction_for(target)

    def distance_to(self, target: str) -> float:
        """Distance (m) from the tip to the centre of the `target` cube."""
        return float(np.linalg.norm(self.tip_position() - self.cube_position(target)))

    def is_success(self, target: str, radius: float = SUCCESS_RADIUS_M) -> bool:
        return self.distance_to(target) <= radius

    # ---- pose state (what a camera sees) --------------------------------------------------
    def pose_state(self) -> dict:
        """Joint positions (arm + fingers) and cube poses: enough to redraw the scene elsewhere."""
        _, positions, _ = self.joint_state()
        cubes = {}
        for colour, body in self._cube_ids.items():
            pos, quat = self._pb(pybullet.getBasePositionAndOrientation, body)
            cubes[colour] = (tuple(pos), tuple(quat))
        return {"joints": positions.tolist(), "cubes": cubes}

    def set_pose_state(self, state: dict) -> None:
        """Place the arm and cubes as in `pose_state()` of another scene (no physics; for rendering)."""
        joints = state["joints"]
        idx = self._arm + self._fingers
        if len(joints) != len(idx):
            raise ValueError(f"pose state needs {len(idx)} joint positions, got {len(joints)}")
        for j, q in zip(idx, joints):
            self._pb(pybullet.resetJointState, self._robot, j, float(q))
        for colour, (pos, quat) in state["cubes"].items():
            _check_colour(colour)
            self._pb(pybullet.resetBasePositionAndOrientation, self._cube_ids[colour], list(pos), list(quat))

    # ---- camera --------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """RGB image (height, width, 3) uint8 from the configured camera (CPU tiny renderer)."""
        cam = self.camera
        view = self._pb(pybullet.computeViewMatrix, list(cam.eye), list(cam.target), list(cam.up))
        proj = self._pb(pybullet.computeProjectionMatrixFOV, cam.fov_deg, cam.width / cam.height, cam.near, cam.far)
        _, _, rgba, _, _ = self._pb(pybullet.getCameraImage, cam.width, cam.height, view, proj,
                                    renderer=pybullet.ER_TINY_RENDERER, shadow=0,
                                    flags=pybullet.ER_NO_SEGMENTATION_MASK)
        img = np.asarray(rgba, dtype=np.uint8).reshape(cam.height, cam.width, 4)
        return np.ascontiguousarray(img[:, :, :3])

"""Camera geometry for the dataset builders: intrinsics, back-projection, normals from depth, depth PNG decoding.

Conventions: camera frame x right, y down, z forward (OpenCV); pixel (u, v) = (column, row) with integer
coordinates at pixel centres; depth in metres along the optical axis (z), 0 = invalid. NumPy only, so the
TFDS builders run without JAX or TensorFlow.
"""

from __future__ import annotations

import numpy as np

KINECT_V1_IMAGE_SIZE = (480, 640)
KINECT_V1_INTRINSICS = np.array(
    [[518.857901, 0.0, 325.582449], [0.0, 519.469611, 253.736166], [0.0, 0.0, 1.0]]
)  # NYU Depth v2 toolbox (camera_params.m), RGB camera at 640x480.

SUNRGBD_MAX_DEPTH_METRES = 8.0  # SUNRGBDtoolbox read3dPoints.m clips decoded depth to 8 m.


def intrinsics_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """Returns the 3x3 pinhole intrinsics matrix K for focal lengths and principal point in pixels."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=np.float64)


def check_intrinsics(intrinsics) -> np.ndarray:
    """Returns `intrinsics` as a float64 3x3 array, or raises ValueError if it is not a pinhole K matrix."""
    matrix = np.asarray(intrinsics, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"intrinsics must be a 3x3 matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"intrinsics must be finite, got {matrix.tolist()}")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0]) or matrix[1, 0] != 0.0:
        raise ValueError(f"intrinsics must look like [[fx,s,cx],[0,fy,cy],[0,0,1]], got {matrix.tolist()}")
    if matrix[0, 0] == 0.0 or matrix[1, 1] == 0.0:
        raise ValueError(f"intrinsics need non-zero focal lengths, got {matrix.tolist()}")
    return matrix


def scale_intrinsics(intrinsics, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Returns K for an image resized from `from_size` to `to_size` (both (height, width)), per axis.

    Pixel centres map as u' = (u + 0.5) * sx - 0.5, which is what bilinear/nearest resizing with
    half-pixel centres (PIL, jax.image.resize) does, so cx' = (cx + 0.5) * sx - 0.5.
    """
    matrix = check_intrinsics(intrinsics).copy()
    scale_y = to_size[0] / from_size[0]
    scale_x = to_size[1] / from_size[1]
    matrix[0, 0] *= scale_x
    matrix[0, 1] *= scale_x
    matrix[0, 2] = (matrix[0, 2] + 0.5) * scale_x - 0.5
    matrix[1, 1] *= scale_y
    matrix[1, 2] = (matrix[1, 2] + 0.5) * scale_y - 0.5
    return matrix


def crop_intrinsics(intrinsics, top: int, left: int) -> np.ndarray:
    """Returns K for the crop of an image whose top-left corner is at pixel (top, left)."""
    matrix = check_intrinsics(intrinsics).copy()
    matrix[0, 2] -= left
    matrix[1, 2] -= top
    return matrix


def _depth_2d(depth) -> np.ndarray:
    array = np.asarray(depth)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"depth must have shape [H, W] or [H, W, 1], got {np.shape(depth)}")
    return array.astype(np.float64)


def backproject(depth, intrinsics) -> np.ndarray:
    """Returns the camera-frame 3D point [H, W, 3] of every pixel (x = (u - cx) z / fx, ...)."""
    z = _depth_2d(depth)
    matrix = check_intrinsics(intrinsics)
    inverse = np.linalg.inv(matrix)
    rows, cols = np.indices(z.shape, dtype=np.float64)
    pixels = np.stack([cols, rows, np.ones_like(cols)], axis=-1)
    rays = pixels @ inverse.T
    return rays * z[..., None]


def normals_from_depth(
    depth, intrinsics, *, step: int = 1, max_relative_depth_jump: float = 0.1
) -> np.ndarray:
    """Returns unit surface normals [H, W, 3] (float32, camera frame, facing the camera) from a depth map.

    The tangents are central differences of the back-projected points over +-`step` pixels. A pixel gets
    an all-zero normal when its depth or any of the four neighbours used is invalid (<= 0 or not finite),
    outside the image, or differs from the centre depth by more than `max_relative_depth_jump` times the
    centre depth (a depth discontinuity rather than a surface).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    z = _depth_2d(depth)
    points = backproject(np.where(np.isfinite(z), z, 0.0), intrinsics)
    height, width = z.shape
    valid = np.isfinite(z) & (z > 0)
    if height <= 2 * step or width <= 2 * step:
        return np.zeros((height, width, 3), np.float32)

    def shifted(array, d_row, d_col, fill):
        out = np.full_like(array, fill)
        src_rows = slice(max(d_row, 0), height + min(d_row, 0))
        dst_rows = slice(max(-d_row, 0), height + min(-d_row, 0))
        src_cols = slice(max(d_col, 0), width + min(d_col, 0))
        dst_cols = slice(max(-d_col, 0), width + min(-d_col, 0))
        out[dst_rows, dst_cols] = array[src_rows, src_cols]
        return out

    offsets = {"right": (0, step), "left": (0, -step), "down": (step, 0), "up": (-step, 0)}
    neighbour_points = {name: shifted(points, *offset, 0.0) for name, offset in offsets.items()}
    usable = valid.copy()
    safe_z = np.where(valid, z, 1.0)
    for offset in offsets.values():
        neighbour_valid = shifted(valid, *offset, False)
        neighbour_z = shifted(np.where(valid, z, 0.0), *offset, 0.0)
        continuous = np.abs(neighbour_z - z) <= max_relative_depth_jump * safe_z
        usable &= neighbour_valid & continuous

    along_rows = neighbour_points["down"] - neighbour_points["up"]
    along_cols = neighbour_points["right"] - neighbour_points["left"]
    normals = np.cross(along_rows, along_cols)
    facing_away = np.sum(normals * points, axis=-1) > 0
    normals = np.where(facing_away[..., None], -normals, normals)
    length = np.linalg.norm(normals, axis=-1)
    usable &= length > 0
    normals = normals / np.where(usable, length, 1.0)[..., None]
    return np.where(usable[..., None], normals, 0.0).astype(np.float32)


def decode_sunrgbd_depth(png_values, max_depth: float = SUNRGBD_MAX_DEPTH_METRES) -> np.ndarray:
    """Returns metres (float32) from SUN RGB-D 16-bit depth PNG values: a 3-bit right rotation of the
    16-bit word gives millimetres; values above `max_depth` are clipped to it as the official toolbox does."""
    values = np.asarray(png_values).astype(np.uint32) & 0xFFFF
    millimetres = ((values >> 3) | (values << 13)) & 0xFFFF
    metres = millimetres.astype(np.float32) / 1000.0
    return np.minimum(metres, np.float32(max_depth))


def encode_sunrgbd_depth(metres) -> np.ndarray:
    """Returns the SUN RGB-D 16-bit PNG values (uint16) for depths in metres: the inverse of
    `decode_sunrgbd_depth` up to its clip; used to write test fixtures and to pin the format down."""
    millimetres = np.round(np.asarray(metres, dtype=np.float64) * 1000.0).astype(np.uint32) & 0xFFFF
    return (((millimetres << 3) | (millimetres >> 13)) & 0xFFFF).astype(np.uint16)

"""Normals from depth on surfaces with known normals; intrinsics scaling; SUN RGB-D depth PNG decoding."""

import numpy as np
import pytest

from auxmtl_jax import geometry

K = geometry.intrinsics_matrix(fx=60.0, fy=55.0, cx=31.5, cy=23.0)
SHAPE = (48, 64)


def _rays(intrinsics, shape):
    rows, cols = np.indices(shape, dtype=np.float64)
    pixels = np.stack([cols, rows, np.ones_like(cols)], axis=-1)
    return pixels @ np.linalg.inv(intrinsics).T


def _plane_depth(normal, distance, intrinsics=K, shape=SHAPE):
    """Depth of the plane {P : normal . P = -distance}; `normal` faces the camera (negative z part)."""
    denominator = _rays(intrinsics, shape) @ normal
    return np.where(denominator < 0, -distance / np.where(denominator < 0, denominator, -1.0), 0.0)


def _angles_degrees(a, b):
    cosine = np.clip(np.sum(a * b, axis=-1), -1.0, 1.0)
    return np.degrees(np.arccos(cosine))


@pytest.mark.parametrize(
    "normal",
    [(0.0, 0.0, -1.0), (0.5, 0.0, -1.0), (0.0, -0.7, -1.0), (-0.4, 0.6, -0.8), (0.8, 0.0, -0.6)],
)
def test_plane_normals_are_exact_and_face_the_camera(normal):
    normal = np.asarray(normal) / np.linalg.norm(normal)
    depth = _plane_depth(normal, distance=2.0)
    assert np.all(depth > 0), "fixture: the plane must fill the view"
    normals = geometry.normals_from_depth(depth[..., None], K)

    assert normals.shape == SHAPE + (3,) and normals.dtype == np.float32
    interior = normals[1:-1, 1:-1]
    np.testing.assert_allclose(interior, np.broadcast_to(normal, interior.shape), atol=1e-5)
    assert np.all(normals[0] == 0) and np.all(normals[:, -1] == 0), "borders lack neighbours -> invalid"


def test_sphere_normals_point_radially_outwards():
    centre, radius = np.array([0.2, -0.1, 3.0]), 1.0
    rays = _rays(K, SHAPE)
    a = np.sum(rays * rays, -1)
    b = -2.0 * rays @ centre
    c = centre @ centre - radius**2
    discriminant = b * b - 4 * a * c
    hit = discriminant > 0
    depth = np.where(hit, (-b - np.sqrt(np.where(hit, discriminant, 0.0))) / (2 * a), 0.0)
    points = rays * depth[..., None]
    expected = (points - centre) / radius

    normals = geometry.normals_from_depth(depth, K)
    valid = np.any(normals != 0, axis=-1)
    assert not np.any(valid & ~hit), "background (depth 0) must stay invalid"
    assert valid.sum() > 0.8 * hit.sum()
    errors = _angles_degrees(normals[valid], expected[valid])
    assert np.median(errors) < 0.5 and np.percentile(errors, 95) < 2.5 and errors.max() < 10.0
    np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=-1), 1.0, atol=1e-5)


def test_invalid_depth_and_discontinuities_give_zero_normals():
    depth = np.full(SHAPE, 2.0)
    depth[10, 20] = 0.0
    depth[30, 40] = np.nan
    depth[:, 50:] = 4.0
    normals = geometry.normals_from_depth(depth, K)
    invalid = ~np.any(normals != 0, axis=-1)
    for row, col in [(10, 20), (9, 20), (11, 20), (10, 19), (10, 21), (30, 40), (31, 40)]:
        assert invalid[row, col], (row, col)
    assert np.all(invalid[1:-1, 49:51]), "the 2 m -> 4 m step is a discontinuity"
    assert not invalid[5, 5] and not invalid[5, 55]


def test_wider_step_reaches_further_and_still_recovers_the_plane():
    normal = np.array([0.3, -0.2, -1.0]) / np.linalg.norm([0.3, -0.2, -1.0])
    normals = geometry.normals_from_depth(_plane_depth(normal, 1.5), K, step=3)
    assert np.all(normals[:3] == 0) and np.all(normals[:, -3:] == 0)
    np.testing.assert_allclose(normals[3:-3, 3:-3], np.broadcast_to(normal, (42, 58, 3)), atol=1e-5)


def test_normals_from_depth_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth must have shape"):
        geometry.normals_from_depth(np.ones((4, 5, 2)), K)
    with pytest.raises(ValueError, match="3x3"):
        geometry.normals_from_depth(np.ones((4, 5)), np.eye(2))
    with pytest.raises(ValueError, match="step"):
        geometry.normals_from_depth(np.ones((4, 5)), K, step=0)


def test_scaled_intrinsics_project_points_to_the_resized_pixel_grid():
    points = np.array([[0.3, -0.2, 2.0], [-0.5, 0.4, 3.0], [0.0, 0.0, 1.0]])
    from_size, to_size = (48, 64), (24, 96)
    scaled = geometry.scale_intrinsics(K, from_size, to_size)
    original = (points @ K.T)[:, :2] / points[:, 2:]
    resized = (points @ scaled.T)[:, :2] / points[:, 2:]
    scale = np.array([to_size[1] / from_size[1], to_size[0] / from_size[0]])
    np.testing.assert_allclose(resized, (original + 0.5) * scale - 0.5)
    np.testing.assert_allclose(geometry.scale_intrinsics(scaled, to_size, from_size), K)


def test_crop_intrinsics_shifts_the_principal_point():
    cropped = geometry.crop_intrinsics(K, top=5, left=7)
    np.testing.assert_allclose(cropped[:2, 2], K[:2, 2] - [7, 5])
    np.testing.assert_allclose(cropped[[0, 1], [0, 1]], K[[0, 1], [0, 1]])


def test_sunrgbd_depth_png_bit_rotation_round_trips_and_clips():
    metres = np.array([[0.0, 0.5, 1.234], [3.999, 7.5, 9.0]])
    encoded = geometry.encode_sunrgbd_depth(metres)
    assert encoded.dtype == np.uint16
    assert encoded[0, 1] == ((500 << 3) | (500 >> 13)) & 0xFFFF
    decoded = geometry.decode_sunrgbd_depth(encoded)
    np.testing.assert_allclose(decoded, np.minimum(metres, 8.0), atol=5e-4)
    assert decoded[1, 2] == pytest.approx(8.0) and decoded[0, 0] == 0.0

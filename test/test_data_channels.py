"""Images reach training in RGB order from every source.

Each source is written with an image whose three channels differ (R 210, G 90, B 20) in the way
that source stores images (raw rgb8/bgr8 messages, JPEG CompressedImage, HDF5 arrays, HDF5 JPEG
buffers standard and ACT-style), cached for training, and the cached 224 px image must still be
that colour. (LeRobot videos and RLDS JPEGs have the same check in their own test files.)
"""
from __future__ import annotations

import numpy as np
import pytest

from openvla_ros.data.images import decode_image_bytes, encode_image_bytes
from openvla_ros.eval.bag_writer import BagWriter
from openvla_ros.training.data import EpisodeReadOptions, cache_dataset

COLOUR = np.array([210, 90, 20])


def _image(h=24, w=32):
    return np.broadcast_to(COLOUR.astype(np.uint8), (h, w, 3)).copy()


def assert_rgb(images, tol=8):
    """Every image's mean colour is COLOUR (so R, G and B were not swapped anywhere)."""
    means = np.asarray(images, dtype=np.float64).reshape(len(images), -1, 3).mean(axis=1)
    np.testing.assert_allclose(means, np.broadcast_to(COLOUR, means.shape), atol=tol)


def _cached(tmp_path, path, **read):
    ds = cache_dataset("d", [path], EpisodeReadOptions(**read), tmp_path / "cache")
    return np.asarray(ds.episodes[0].images)


@pytest.mark.parametrize("kind", ["rgb8", "bgr8", "jpeg", "png"])
def test_bag_images_are_cached_in_rgb_order(tmp_path, kind):
    path = tmp_path / "bag"
    with BagWriter(path, "mcap") as w:
        w.write_string("/vla/instruction", 0.9, "go")
        for i in range(3):
            if kind in ("jpeg", "png"):
                w.write_compressed_image("/cam/compressed", 1.0 + 0.2 * i, _image(), codec=kind)
            else:
                w.write_image("/cam", 1.0 + 0.2 * i, _image(), encoding=kind)
            w.write_float64_array("/cmd", 1.0 + 0.2 * i, [i, 0.0])
    images = _cached(tmp_path, path, action_topic="/cmd")
    assert images.shape == (3, 224, 224, 3)
    assert_rgb(images)


def _write_hdf5(path, images, compress=False):
    import h5py

    with h5py.File(path, "w") as f:
        if compress:
            f.attrs["compress"] = True
            width = max(len(b) for b in images) + 7  # zero padding, as ACT pads its buffers
            data = np.zeros((len(images), width), np.uint8)
            for i, b in enumerate(images):
                data[i, :len(b)] = np.frombuffer(b, np.uint8)
            f.create_dataset("observations/images/cam", data=data)
        else:
            f.create_dataset("observations/images/cam", data=np.stack(images))
        f.create_dataset("action", data=np.zeros((len(images), 2)))
        f.create_dataset("language_raw", data=[b"go"])


def test_hdf5_arrays_are_cached_in_rgb_order(tmp_path):
    _write_hdf5(tmp_path / "ep.hdf5", [_image()] * 3)
    assert_rgb(_cached(tmp_path, tmp_path / "ep.hdf5"))


def test_standard_hdf5_jpegs_are_cached_in_rgb_order(tmp_path):
    _write_hdf5(tmp_path / "ep.hdf5", [encode_image_bytes(_image())] * 3, compress=True)
    assert_rgb(_cached(tmp_path, tmp_path / "ep.hdf5"))


def test_act_style_hdf5_jpegs_need_bgr_and_are_then_cached_in_rgb_order(tmp_path):
    import cv2

    act = cv2.imencode(".jpg", _image())[1].tobytes()  # ACT passes its RGB array straight to OpenCV
    _write_hdf5(tmp_path / "ep.hdf5", [act] * 3, compress=True)
    assert_rgb(_cached(tmp_path, tmp_path / "ep.hdf5", jpeg_channels="bgr"))
    swapped = _cached(tmp_path / "other", tmp_path / "ep.hdf5")  # read as a standard JPEG: blue and red swap
    assert swapped[..., 2].mean() > 150 and swapped[..., 0].mean() < 60


def test_decode_image_bytes_rejects_garbage_naming_the_image():
    with pytest.raises(ValueError, match="frame 3: not a decodable image"):
        decode_image_bytes(b"not a jpeg", where="frame 3")
    with pytest.raises(ValueError, match="stored channel order"):
        decode_image_bytes(encode_image_bytes(_image()), stored="grb")

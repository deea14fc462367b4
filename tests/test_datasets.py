"""load_data / ImageDataset: file discovery, labels, sharding, the original's crops, conversions
and errors that name the file."""

import random

import numpy as np
import pytest
import torch as th
from PIL import Image

from guided_diffusion import image_datasets, logger
from guided_diffusion.image_datasets import (
    DataError,
    ImageDataset,
    _list_image_files_recursively,
    center_crop_arr,
    load_data,
    random_crop_arr,
)


def gradient_image(w, h, mode="RGB"):
    """A smooth, asymmetric image: x ramps red, y ramps green."""
    xs = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    ys = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    arr = np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture
def image_dir(tmp_path):
    """Nested folders with jpg, grayscale png, RGBA png, gif and a non-image file."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    gradient_image(40, 24).save(tmp_path / "dog_1.jpg")
    gradient_image(20, 20, "L").save(tmp_path / "cat_1.png")
    gradient_image(24, 40, "RGBA").save(tmp_path / "sub" / "cat_2.PNG")
    gradient_image(16, 16, "P").save(tmp_path / "sub" / "deeper" / "bird_x_1.gif")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_files_are_found_recursively_in_sorted_order(image_dir):
    files = _list_image_files_recursively(str(image_dir))
    rel = [f[len(str(image_dir)) + 1 :] for f in files]
    assert rel == ["cat_1.png", "dog_1.jpg", "sub/cat_2.PNG", "sub/deeper/bird_x_1.gif"]


def test_load_data_labels_from_file_name_prefix(image_dir):
    data = load_data(
        data_dir=str(image_dir), batch_size=4, image_size=8, class_cond=True,
        deterministic=True, random_flip=False,
    )
    x, cond = next(data)
    assert x.shape == (4, 3, 8, 8) and x.dtype == th.float32
    assert x.min() >= -1 and x.max() <= 1
    # classes: sorted {"bird", "cat", "dog"}; files in listing order cat, dog, cat, bird.
    assert cond["y"].dtype == th.int64
    assert cond["y"].tolist() == [1, 2, 1, 0]
    x2, _ = next(data)  # the stream goes on forever, in the same order when deterministic
    assert th.equal(x, x2)


def test_label_from_folder(tmp_path):
    for cls in ["zebra", "ant"]:
        (tmp_path / cls).mkdir()
        gradient_image(8, 8).save(tmp_path / cls / "img_0.png")
    _, cond = next(load_data(data_dir=str(tmp_path), batch_size=2, image_size=8,
                             class_cond=True, deterministic=True, label_from="folder"))
    assert cond["y"].tolist() == [0, 1]  # ant/, zebra/
    gradient_image(8, 8).save(tmp_path / "loose_0.png")
    with pytest.raises(ValueError, match="loose_0.png"):
        load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, class_cond=True,
                  label_from="folder")


def test_shards_follow_rank_and_world_size(image_dir, monkeypatch):
    paths = _list_image_files_recursively(str(image_dir))
    ds = ImageDataset(8, paths, classes=[0, 1, 2, 3], shard=1, num_shards=2)
    assert ds.local_images == paths[1::2] and ds.local_classes == [1, 3]
    monkeypatch.setattr(image_datasets.dist_util, "get_rank", lambda: 1)
    monkeypatch.setattr(image_datasets.dist_util, "get_world_size", lambda: 3)
    x, cond = next(load_data(data_dir=str(image_dir), batch_size=1, image_size=8,
                             class_cond=True, deterministic=True, random_flip=False))
    assert cond["y"].tolist() == [2]  # paths[1::3] == [dog_1.jpg]


def test_center_crop_follows_the_original_recipe():
    img = gradient_image(100, 60)
    out = center_crop_arr(img, 16)
    # 100x60 -> BOX halving while the short side >= 32: 50x30; bicubic to 16/30: 27x16; center.
    half = img.resize((50, 30), resample=Image.BOX)
    full = np.array(half.resize((27, 16), resample=Image.BICUBIC))
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, full[:, 5:21])


def test_random_crop_covers_80_to_100_percent_of_the_short_side():
    random.seed(0)
    img = gradient_image(64, 64)  # red ramps 0..255 across the whole width
    fracs = []
    for _ in range(30):
        out = random_crop_arr(img, 16)
        assert out.shape == (16, 16, 3)
        fracs.append((int(out[0, -1, 0]) - int(out[0, 0, 0])) / 255)
    # The short side is resized to 16..20 px, so a 16 px crop spans 15/19..15/15 of the ramp.
    assert 0.7 < min(fracs) < 0.9 and max(fracs) > 0.95
    assert max(fracs) <= 1.01


def test_random_flip_mirrors_left_right(monkeypatch):
    random.seed(1)
    monkeypatch.setattr(image_datasets, "read_image", lambda path: gradient_image(8, 8))
    ds = ImageDataset(8, ["any.png"], random_flip=True)
    arr = center_crop_arr(gradient_image(8, 8), 8).astype(np.float32) / 127.5 - 1
    seen = set()
    for _ in range(20):
        x, _ = ds[0]
        hwc = np.transpose(x, [1, 2, 0])
        if np.array_equal(hwc, arr):
            seen.add("same")
        else:
            np.testing.assert_array_equal(hwc, arr[:, ::-1])
            seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_grayscale_and_rgba_become_rgb(image_dir):
    paths = _list_image_files_recursively(str(image_dir))
    ds = ImageDataset(8, paths, random_flip=False)
    for i in range(len(ds)):
        x, cond = ds[i]
        assert x.shape == (3, 8, 8) and cond == {}
    gray, _ = ds[0]  # cat_1.png, mode L: three equal channels
    np.testing.assert_array_equal(gray[0], gray[1])


def test_corrupt_image_is_found_at_start_naming_the_file(tmp_path):
    gradient_image(8, 8).save(tmp_path / "ok_0.png")
    gradient_image(8, 8).save(tmp_path / "ok_2.png")
    (tmp_path / "bad_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    # The scan decodes every image before the first batch, not when the loader reaches it.
    with pytest.raises(DataError, match=r"1 of 3 images cannot be read: .*bad_1.png"):
        load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, deterministic=True)
    with logger.scoped_configure(dir=str(tmp_path / "log"), format_strs=["log"]):
        data = load_data(data_dir=str(tmp_path), batch_size=2, image_size=8,
                         deterministic=True, skip_bad_images=True)
    assert next(data)[0].shape == (2, 3, 8, 8)  # the two readable images
    assert "leaving out 1 of 3 images" in (tmp_path / "log" / "log.txt").read_text()


def test_labels_beyond_num_classes_are_refused_at_start(tmp_path):
    for name in ("a_0.png", "b_0.png", "c_0.png"):
        gradient_image(8, 8).save(tmp_path / name)
    with pytest.raises(DataError, match=r"3 classes but --num_classes is 2: class 'c' \(label 2\)"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8, class_cond=True,
                  num_classes=2)
    data = load_data(data_dir=str(tmp_path), batch_size=3, image_size=8, class_cond=True,
                     num_classes=3, deterministic=True)
    assert next(data)[1]["y"].tolist() == [0, 1, 2]


def test_errors_for_missing_or_too_few_images(tmp_path):
    with pytest.raises(ValueError, match="unspecified data directory"):
        load_data(data_dir="", batch_size=1, image_size=8)
    with pytest.raises(ValueError, match="no images"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=8)
    gradient_image(8, 8).save(tmp_path / "a_0.png")
    with pytest.raises(ValueError, match="fewer than the batch size 2"):
        load_data(data_dir=str(tmp_path), batch_size=2, image_size=8)

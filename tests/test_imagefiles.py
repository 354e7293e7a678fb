"""utils/imagefiles.py: the one image lister and reader, checked against the pixels written."""
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from utils.data import ImageFolderDataset
from utils.errors import UserError
from utils.imagefiles import (IMAGE_EXTENSIONS, ImageFiles, UnreadableImage, image_problem, open_image,
                              read_image, to_pixels)


def write(path, pixels):
    """Save uint8 pixels ([H, W] grey or [H, W, 3] RGB) losslessly; returns them."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def folder(tmp_path):
    """grey a.png, RGB sub/b.PNG, a text file and a folder named like an image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    pixels = {"a.png": write(str(root / "a.png"), rng.integers(0, 256, (5, 7), dtype=np.uint8)),
              os.path.join("sub", "b.PNG"): write(str(root / "sub" / "b.PNG"),
                                                  rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))}
    (root / "notes.txt").write_text("not an image")
    (root / "c.png.d").mkdir()
    return str(root), pixels


def test_one_extension_list_holds_the_common_formats():
    assert {".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff"} <= set(IMAGE_EXTENSIONS)
    assert all(extension == extension.lower() and extension.startswith(".") for extension in IMAGE_EXTENSIONS)


def test_a_folder_is_listed_recursively_or_not(folder):
    root, pixels = folder
    assert ImageFiles(root).names == sorted(pixels)
    assert ImageFiles(root, recursive=False).names == ["a.png"]


def test_pixels_are_those_written(folder):
    root, pixels = folder
    files = ImageFiles(root)
    grey, rgb = pixels["a.png"], pixels[os.path.join("sub", "b.PNG")]
    np.testing.assert_array_equal(files.read_pixels("a.png"), np.repeat(grey[np.newaxis], 3, axis=0))
    np.testing.assert_array_equal(files.read_pixels("a.png", channels=1), grey[np.newaxis])
    np.testing.assert_array_equal(files.read_pixels(os.path.join("sub", "b.PNG")), rgb.transpose(2, 0, 1))
    as_float = files.read_float(os.path.join("sub", "b.PNG"), 3)
    assert as_float.dtype == torch.float32 and as_float.is_contiguous()
    torch.testing.assert_close(as_float, torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float() / 127.5 - 1,
                               rtol=0, atol=0)
    torch.testing.assert_close(read_image(os.path.join(root, "a.png"), 1),
                               torch.from_numpy(grey[np.newaxis].copy()).float() / 127.5 - 1, rtol=0, atol=0)


def test_a_zip_lists_and_reads_as_the_folder_and_survives_pickling(folder, tmp_path):
    root, pixels = folder
    archive = str(tmp_path / "images.zip")
    with zipfile.ZipFile(archive, "w") as handle:
        for name in sorted(pixels) + ["notes.txt"]:
            handle.write(os.path.join(root, name), name)
    files = ImageFiles(archive)
    assert files.names == sorted(pixels)
    assert files.label("a.png") == f"{archive}:a.png"
    expected = ImageFiles(root).read_pixels(os.path.join("sub", "b.PNG"))
    np.testing.assert_array_equal(files.read_pixels(os.path.join("sub", "b.PNG")), expected)
    copy = pickle.loads(pickle.dumps(files))   # as a DataLoader worker gets it: the open zip is not sent
    np.testing.assert_array_equal(copy.read_pixels(os.path.join("sub", "b.PNG")), expected)
    files.close()
    copy.close()


def test_resizing_and_conversion_follow_pil():
    image = PIL.Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    expected = np.asarray(image.convert("L").resize((2, 2), PIL.Image.BILINEAR))
    np.testing.assert_array_equal(to_pixels(image, 1, resolution=2), expected[np.newaxis])
    np.testing.assert_array_equal(to_pixels(image, 3, resolution=4), np.asarray(image).transpose(2, 0, 1))


def test_missing_and_wrong_paths_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^image folder not found: .*absent$"):
        ImageFiles(str(tmp_path / "absent"))
    with pytest.raises(UserError, match=r"^data folder not found: .*absent \(give --data_path\)$"):
        ImageFiles(str(tmp_path / "absent"), what="data folder", hint="give --data_path")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is neither a folder nor a .zip of images"):
        ImageFiles(str(tmp_path / "file.txt"))
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(UserError, match="cannot open zip"):
        ImageFiles(str(tmp_path / "broken.zip"))
    with pytest.raises(UserError, match="is not a folder"):
        ImageFiles(str(tmp_path / "broken.zip"), zips=False)


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "junk.png").write_bytes(b"not a png")
    data = root / "cut.png"
    write(str(data), np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data.write_bytes(data.read_bytes()[:200])
    files = ImageFiles(str(root), fix="remove it")
    with pytest.raises(UnreadableImage) as caught:
        files.read_pixels("junk.png")
    assert str(caught.value) == f"unreadable image {root / 'junk.png'} (not an image format PIL reads); remove it"
    assert caught.value.label == str(root / "junk.png") and caught.value.reason == "not an image format PIL reads"
    with files.open("cut.png") as image:   # the header is intact
        assert image.size == (32, 32)
    with pytest.raises(UnreadableImage, match="cut.png"):   # the pixels are not
        files.read_pixels("cut.png")
    with pytest.raises(UnreadableImage, match="junk.png"):
        with open_image(str(root / "junk.png")):
            pass


def test_image_problem_says_what_does_not_fit():
    image = PIL.Image.new("RGBA", (4, 3))
    assert image_problem(image, "x.png", size=(4, 3), modes=("RGBA",)) is None
    assert image_problem(image, "x.png") is None
    assert image_problem(image, "x.png", modes=("L", "RGB"), mode_fix="use RGB") == \
        "image x.png has PIL mode RGBA, expected L or RGB; use RGB"
    assert image_problem(image, "x.png", size=(5, 5), size_fix="check --res") == \
        "image x.png is 4x3, expected 5x5; check --res"


def test_the_training_dataset_reads_a_zip_exactly_and_skips_unreadable_images(tmp_path, capsys):
    rng = np.random.default_rng(2)
    pixels = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(2)]
    archive = str(tmp_path / "data.zip")
    with zipfile.ZipFile(archive, "w") as handle:
        for index, array in enumerate(pixels):
            write(str(tmp_path / f"{index}.png"), array)
            handle.write(tmp_path / f"{index}.png", f"{index}.png")
        handle.writestr("2.png", b"broken")
    dataset = ImageFolderDataset(archive, 4, 3, bad_images="skip")
    assert dataset.names == ["0.png", "1.png", "2.png"]
    image, index = dataset[1]
    assert index == 1
    torch.testing.assert_close(image, torch.from_numpy(pixels[1].transpose(2, 0, 1).copy()).float() / 127.5 - 1,
                               rtol=0, atol=0)
    assert dataset[2][1] == 0 and dataset.skipped == 1   # the next readable image, wrapping around
    assert f"skipped unreadable image {archive}:2.png (not an image format PIL reads)" in capsys.readouterr().err
    assert dataset[2][1] == 0 and dataset.skipped == 2   # the next epoch: skipped again, and not said again
    assert capsys.readouterr().err == ""
    assert dataset.scan()["bad"] == [("2.png", "not an image format PIL reads")]
    with pytest.raises(UserError, match=r"unreadable image .*2.png .*--bad_images skip"):
        ImageFolderDataset(archive, 4, 3)[2]


def test_a_skipped_image_is_reported_once_by_all_the_loader_workers(tmp_path, capfd):
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(6):
        write(str(folder / f"{index}.png"), rng.integers(0, 256, (4, 4), dtype=np.uint8))
    png = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(png[:len(png) // 2])   # a valid header, truncated pixels: passes the scan
    dataset = ImageFolderDataset(str(folder), 4, 1, bad_images="skip")
    assert dataset.scan()["bad"] == []
    # batches go to the two workers in turn: each of them meets the image, in two epochs
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=[2, 2, 0, 2], num_workers=2,
                                         persistent_workers=True)
    capfd.readouterr()
    for epoch in range(2):
        assert [int(index) for _, index in loader] == [3, 3, 0, 3]
    err = capfd.readouterr().err
    assert err.count("skipped unreadable image") == 1 and "2.png" in err, err
    del loader


def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path):
    # PIL's convert("L") clips a 16-bit image's values to 255 (a nearly white picture); v must become round(v / 257)
    values = np.array([[0, 128, 129, 257, 385, 386], [1000, 32767, 32768, 65407, 65408, 65535]], dtype=np.uint16)
    path = str(tmp_path / "deep.png")
    PIL.Image.fromarray(values).save(path)
    with open_image(path) as image:
        assert image.mode.startswith("I;16")
        grey, rgb = to_pixels(image, 1), to_pixels(image, 3)
    expected = np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)   # the exact rounding
    assert expected[0].tolist() == [0, 0, 1, 1, 1, 2] and expected[1, -1] == 255
    np.testing.assert_array_equal(grey[0], expected)
    np.testing.assert_array_equal(rgb, np.repeat(expected[None], 3, axis=0))
    # the same file through a folder reader and the training dataset's [-1, 1] scale
    files = ImageFiles(str(tmp_path))
    np.testing.assert_array_equal(files.read_pixels("deep.png", channels=1)[0], expected)
    np.testing.assert_allclose(read_image(path, 1)[0].numpy(), expected / 127.5 - 1, atol=1e-6)
    PIL.Image.fromarray(values).save(str(tmp_path / "deep.pgm"))   # a 16-bit PGM opens as mode I: 16-bit too
    np.testing.assert_array_equal(files.read_pixels("deep.pgm", channels=1)[0], expected)


def test_32_bit_and_float_pixels_in_0_255_are_kept_and_others_refused_naming_the_file(tmp_path):
    kept = np.array([[0, 17, 255]], dtype=np.int32)
    PIL.Image.fromarray(kept).save(str(tmp_path / "int.tif"))
    PIL.Image.fromarray(kept.astype(np.float32)).save(str(tmp_path / "whole.tif"))
    for name in ("int.tif", "whole.tif"):
        np.testing.assert_allclose(read_image(str(tmp_path / name), 1)[0].numpy(), kept / 127.5 - 1, atol=1e-6)
    bad = {"wide.tif": np.array([[0, 4000]], dtype=np.int32), "negative.tif": np.array([[-1, 3]], dtype=np.int32),
           "unit.tif": np.array([[0.0, 0.5, 1.0]], dtype=np.float32)}
    for name, values in bad.items():
        path = str(tmp_path / name)
        PIL.Image.fromarray(values).save(path)
        with pytest.raises(UnreadableImage) as caught:
            read_image(path, 1)
        message = str(caught.value)
        assert path in message and "not whole numbers in 0-255" in message and "\n" not in message
        assert f"from {values.min():g} to {values.max():g}" in message


def test_16_bit_grey_of_any_byte_order_counts_as_grey():
    from utils.data import conversions
    for mode in ("I;16", "I;16B", "I;16L", "I;16N", "L"):
        scan = {"sizes": {(4, 4): 1}, "modes": {mode: 1}}
        assert conversions(scan, 4, 1) == (False, False) and conversions(scan, 4, 3) == (False, True), mode
    assert conversions({"sizes": {(4, 4): 1}, "modes": {"RGB": 1}}, 4, 1) == (False, True)

"""utils/data.py and utils/io.py helpers: the paper's resize filter, path suggestions, download reasons."""

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import _to_tensor, download_reason
from utils.io import did_you_mean


def test_resizing_is_the_papers_transforms_resize():
    """The paper loads images with transforms.Resize (bilinear on PIL images), ToTensor, Normalize(0.5, 0.5)."""
    from torchvision import transforms

    rng = np.random.RandomState(0)
    for mode, channels, size in (("L", 1, (30, 30)), ("RGB", 3, (64, 48))):
        shape = size[::-1] + ((3,) if mode == "RGB" else ())
        image = Image.fromarray(rng.randint(0, 256, size=shape, dtype=np.uint8), mode)
        paper = transforms.Compose([transforms.Resize((20, 20)), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * channels, [0.5] * channels)])(image)
        ours = _to_tensor(image, 20, channels, flip=False)
        torch.testing.assert_close(ours, paper, rtol=0, atol=1e-6)


def test_a_path_without_its_separators_gets_the_real_one(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cifar10_de.json").write_text("{}")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "flow_model_5_ema.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    # what a POSIX shell makes of configs\cifar10_de.json, .\configs\cifar10_de.json, runs\x\flow_model_5_ema.pth
    assert "did you mean configs/cifar10_de.json?" in did_you_mean("configscifar10_de.json")
    assert "did you mean configs/cifar10_de.json?" in did_you_mean(".configscifar10_de.json")
    assert "did you mean runs/x/flow_model_5_ema.pth?" in did_you_mean("runsxflow_model_5_ema.pth")
    assert f"did you mean {tmp_path}/configs/cifar10_de.json?" in did_you_mean(f"{tmp_path}/configscifar10_de.json")
    assert did_you_mean("configs/cifar10_de.json") == ""      # exists: nothing to say
    assert did_you_mean("configsmissing.json") == ""          # no split exists either
    assert did_you_mean("") == ""


@pytest.mark.parametrize("message, expected", [
    ("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n<urlopen error one>\n"
     "Tried http://b/, got:\n<urlopen error [Errno -2] Name or service not known>\n",
     "Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2] Name or service not known>"),
    ("<urlopen error timed out>", "<urlopen error timed out>"),
])
def test_download_reason_keeps_the_file_and_the_last_reason(message, expected):
    assert download_reason(RuntimeError(message)) == expected

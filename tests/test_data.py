"""utils/data.py and utils/io.py helpers: the paper's resize filter, path suggestions, download reasons."""

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import _to_tensor, download_reason
from utils.errors import UserError
from utils.io import did_you_mean, load_json, load_torch, not_found


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
    # quoted ('configs\cifar10_de.json'), the backslashes survive: the same file with / instead
    assert did_you_mean("configs\\cifar10_de.json") == (
        "; did you mean configs/cifar10_de.json? (this is a POSIX system: folders are separated by /)")
    assert did_you_mean("runs\\x\\flow_model_5_ema.pth").startswith("; did you mean runs/x/flow_model_5_ema.pth?")
    assert did_you_mean("configs\\missing.json") == ""


def test_a_file_or_folder_of_the_wrong_kind_is_named_so(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "a.json").write_text("{}")
    assert not_found(str(tmp_path / "configs"), "--config_de file") == (
        f"--config_de {tmp_path / 'configs'} is a folder, not a file")
    assert not_found(str(tmp_path / "a.json"), "--im_dir folder", kind="folder") == (
        f"--im_dir {tmp_path / 'a.json'} is a file, not a folder")
    assert not_found(str(tmp_path / "b.json"), "--config_de file") == (
        f"--config_de file not found: {tmp_path / 'b.json'}")
    with pytest.raises(UserError, match="is a folder, not a file"):
        load_json(str(tmp_path / "configs"), what="--config_de file")
    with pytest.raises(UserError, match="checkpoint .* is a folder, not a file"):
        load_torch(str(tmp_path / "configs"))


@pytest.mark.parametrize("message, expected", [
    ("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n<urlopen error one>\n"
     "Tried http://b/, got:\n<urlopen error [Errno -2] Name or service not known>\n",
     "Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2] Name or service not known>"),
    ("<urlopen error timed out>", "<urlopen error timed out>"),
])
def test_download_reason_keeps_the_file_and_the_last_reason(message, expected):
    assert download_reason(RuntimeError(message)) == expected

"""The README's commands: the paper's seven run as written (on a machine without CUDA they stop in one line
that says so, leaving nothing behind), and every torchrun example can be pasted as it is."""
import os
import re
import shlex
import pytest
import torch

from tests.conftest import ROOT
from utils.errors import cli_main

# The paper's README commands, with / in the paths (DESIGN.md); <...> are the places the user fills in.
PAPER_COMMANDS = [
    "python train_reverse_img_ddp.py --gpu 0,1 --dir ./runs/cifar10-beta20/ --weight_prior 20 --learning_rate 2e-4 --dataset cifar10 --warmup_steps 5000 --optimizer adam --batchsize 128 --iterations 500000 --config_en configs/cifar10_en.json --config_de configs/cifar10_de.json",
    "python train_reverse_img_ddp.py --gpu 0,1 --dir ./runs/mnist-beta20/ --weight_prior 20 --learning_rate 3e-4 --dataset mnist --warmup_steps 8000 --optimizer adam --batchsize 256 --iterations 60000 --config_en configs/mnist_en.json --config_de configs/mnist_de.json",
    "python train_reverse_img_ddp.py --gpu 0,1,2,3,4,5,6,7 --dir runs/ffhq-beta20 --weight_prior 20 --learning_rate 2e-4 --dataset ffhq --warmup_steps 39060 --batchsize 256 --iterations 800000 --config_en configs/ffhq_en.json --config_de configs/ffhq_de.json",
    "python distill.py --gpu 0 --config_de ./configs/mnist_de.json --dir test --im_dir <gen>/samples --im_dir_test <gen_test>/samples --z_dir <gen>/zs --z_dir_test <gen_test>/zs --batchsize 256 --ckpt <run>/flow_model_60000_ema.pth",
    "python generate.py --gpu 0 --dir test --N 100 --res 28 --input_nc 1 --num_samples 10 --ckpt <run>/flow_model_60000_ema.pth --config_de configs/mnist_de.json",
    "python generate.py --gpu 0,1,2,3,4,5,6,7 --dir runs/ffhq-independent/200000-heun-N121/ --solver heun --N 121 --res 64 --input_nc 3 --num_samples 100 --ckpt runs/ffhq-independent/flow_model_200000_ema.pth --config_de configs/ffhq_de.json --batchsize 128 --save_traj",
    "python fid.py calc --images=runs/reverse/cifar10-learned-beta10-smallE/300000-N128/samples --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
]


def readme_lines():
    with open(os.path.join(ROOT, "README.md")) as handle:
        return [line.strip() for line in handle]


def doc_lines():
    lines = readme_lines()
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if name.endswith(".md"):
            with open(os.path.join(ROOT, "docs", name)) as handle:
                lines += [line.strip() for line in handle]
    return lines


def test_the_papers_commands_are_in_the_readme():
    text = "\n".join(readme_lines())
    for command in PAPER_COMMANDS:
        written = command.replace("<gen>", "").replace("<gen_test>", "").replace("<run>", "")
        stem = written.split(" --")[0]
        assert stem in text, command


def test_torchrun_examples_need_no_unset_variables():
    lines = doc_lines()
    torchrun = [line for line in lines if line.startswith("torchrun ")]
    assert torchrun
    for line in torchrun:
        assert "$" not in line, line        # e.g. --master_addr=$MASTER fails in torchrun when MASTER is unset
        if "--nnodes" in line and "--standalone" not in line:
            assert re.search(r"--master_addr=\S+", line), line
    assert any(line.startswith("torchrun --standalone") for line in readme_lines())


def run_in_process(argv, capsys):
    """One README command through its script's own main, in this process: (exit code, output lines)."""
    script = argv[1][:-len(".py")]
    module = __import__(script)
    try:
        if script == "fid":
            module.main(argv[2:])
        else:
            cli_main(module.main, argv[2:])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, [line for line in (captured.out + captured.err).splitlines() if line.strip()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", PAPER_COMMANDS[:6], ids=["cifar10", "mnist", "ffhq", "distill", "generate",
                                                             "generate-heun"])
def test_gpu_commands_stop_in_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, command):
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command.replace("<gen>", "gen").replace("<gen_test>", "gen_test").replace("<run>", "run"))
    code, lines = run_in_process(argv, capsys)
    assert code == 1 and len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["configs"]    # no --dir, no data folder


def test_the_fid_command_stops_in_one_line_without_the_samples(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, lines = run_in_process(shlex.split(PAPER_COMMANDS[6]), capsys)
    # the missing samples are named before the reference statistics are fetched (no network here)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: image folder not found: runs/reverse/cifar10-learned-beta10-smallE/"), lines
    assert os.listdir(tmp_path) == []

"""The frozen run description of image training (training/run.py) and the one loop's schedule (training/loop.py)."""
import dataclasses
import os
import pickle

import pytest

import train_reverse_img_ddp as trainer
from training import loop
from training.run import ImageRun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(**options):
    return ImageRun(options={"iterations": 5, "dir": "runs/x", **options}, flow_config={"in_channels": 1},
                    encoder_config=None, gpu_ids=(0, 1), world_size=2, spawn=True, is_main=True, cpu_shards=1,
                    amp="none", amp_reason="--amp none given")


def test_run_is_frozen_reads_options_and_survives_pickling():
    run = make_run()
    assert run.iterations == 5 and run.flow_config == {"in_channels": 1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.iterations = 6
    with pytest.raises(AttributeError, match="no option or field 'nope'"):
        run.nope
    again = pickle.loads(pickle.dumps(run))   # what a spawned --gpu worker receives
    assert again == run and again.dir == "runs/x"
    record = run.record()
    assert record["resolved_config_de"] == {"in_channels": 1} and record["amp_used"] == "none"
    assert record["iterations"] == 5


def test_check_args_resolves_without_changing_the_namespace():
    args = trainer.parse_args(["--independent", "--dataset", "folder", "--data_path", "nowhere", "--dir", "runs/x",
                               "--config_de", os.path.join(ROOT, "configs", "tiny28_de.json")])
    run = trainer.check_args(args)
    assert run.coupling == "independent" and run.encoder_config is None
    assert args.coupling is None   # the namespace as parsed


class Recorder:
    """A task that records which hooks ran at which iteration."""

    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

        class Log:
            def line(inner, text):
                self.events.append(("line", text.split(":")[0]))

            def close(inner):
                pass
        self.log = Log()

    def step(self, iteration):
        self.events.append(("step", iteration))
        if iteration == self.stop_at:
            import signal
            signal.raise_signal(signal.SIGTERM)

    def check(self, iteration):
        pass

    def evaluate(self, iteration):
        self.events.append(("evaluate", iteration))

    def write_stats(self, iteration, progress):
        self.events.append(("stats", iteration))

    def save(self, iteration, numbered, final):
        self.events.append(("save", iteration, numbered, final))


def test_loop_schedule_and_stop_on_a_signal():
    schedule = loop.Schedule(log_every=2, evaluate_every=3, save_every=4, snapshot_every=100)
    task = Recorder()
    assert loop.run(task, 1, 5, schedule, desc="t") is None
    got = [event for event in task.events if event[0] != "step"]
    assert got == [("stats", 2), ("evaluate", 3), ("stats", 4), ("save", 4, True, False),
                   ("evaluate", 5), ("stats", 5), ("save", 5, False, True)]
    task = Recorder(stop_at=2)
    assert loop.run(task, 1, 5, schedule, desc="t") == "SIGTERM"
    # the state is saved first, then the stats; the run stops after iteration 2
    assert [event for event in task.events if event[0] != "line"] == [("step", 1), ("step", 2),
                                                                      ("save", 2, False, False), ("stats", 2)]
    task = Recorder()
    assert loop.run(task, 6, 5, schedule, desc="t") is None and task.events == [("line", "nothing to do")]

"""A checked image-training run, frozen: the one description the CLI builds and every rank reads.

``ImageRun`` holds the command's arguments as resolved by the checks (``options``: ``--independent`` folded
into ``coupling``, the default ``data_path`` filled in; the ``argparse`` namespace itself is never changed)
and what the checks derived from them (network configs, processes, CPU shards, precision, the data's
description, the state to resume). The options read as attributes (``run.iterations``); ``record()`` is what
config.json holds.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ImageRun:
    options: dict                   # the resolved command-line arguments, by name
    flow_config: dict               # the flow network's config (validated), from --config_de
    encoder_config: Optional[dict]  # the encoder's (learned coupling), from --config_en, else None
    gpu_ids: tuple                  # --gpu, parsed
    world_size: int                 # processes
    spawn: bool                     # this process starts one worker per GPU
    is_main: bool                   # rank 0 (the one that writes)
    cpu_shards: int                 # batch shards in threads per CPU step (utils/cpu_shards.py)
    amp: str                        # "none" or "bf16": what --amp resolved to
    amp_reason: str                 # why
    omp_wait_policy: tuple = ()     # (value, why): it changes CPU speed several-fold (utils/threads.py)
    cpu_fast_path: tuple = (False, "")   # (on, why): bf16 CPU fast path (models/fast_cpu.py)
    excluded_images: tuple = ()     # unreadable images left out (--bad_images skip)
    data_summary: Optional[str] = None   # the data, as the first log line says it
    resume_path: Optional[str] = None    # the training state to continue from

    def __getattr__(self, name):
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__} has no option or field {name!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def record(self):
        """config.json: the resolved arguments and the configs, shards and precision they led to."""
        return {**self.options, "resolved_config_de": self.flow_config, "resolved_config_en": self.encoder_config,
                "cpu_shards_used": self.cpu_shards, "amp_used": self.amp, "amp_reason": self.amp_reason,
                "omp_wait_policy": list(self.omp_wait_policy), "cpu_fast_path_used": bool(self.cpu_fast_path[0]),
                "cpu_fast_path_reason": self.cpu_fast_path[1]}

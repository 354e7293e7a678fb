"""Shared plumbing for the entry scripts, split by concern.

- ``utils.errors``: one-line CLI errors (``UserError``, ``cli_main``).
- ``utils.io``: atomic writes, checkpoint loading with clear errors, JSON.
- ``utils.runlock``: one owner per run folder (a lock on ``<dir>/.run.lock``).
- ``utils.config``: network-config loading and validation.
- ``utils.dist``: devices, ``--gpu`` parsing, process groups (torchrun or spawn).
- ``utils.data``: datasets (torchvision, image folders, zips) and image saving.
- ``utils.train``: seeding, EMA, learning-rate warmup, logging.
"""

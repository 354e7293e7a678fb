"""Shared plumbing for the entry scripts, split by concern.

- ``utils.errors``: one-line CLI errors (``UserError``, ``cli_main``, ``click_main``).
- ``utils.io``: atomic writes, checkpoint loading with clear errors, JSON.
- ``utils.download``: files fetched once into a cache folder.
- ``utils.runlock``: one owner per run folder (a lock on ``<dir>/.run.lock``).
- ``utils.dist``: devices, ``--gpu`` / ``--device`` parsing, process groups (torchrun or spawn), collectives.
- ``utils.imagefiles``: the image extensions, listing folders and zips, reading and checking images.
- ``utils.data``: datasets (torchvision, image folders, zips).
- ``utils.train``: seeding, EMA, learning-rate warmup, logging.
"""

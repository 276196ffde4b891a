"""Tests of engine/ and common/: flags, config files, the loop, resume, checkpoints, processes, devices,
the layers, RepDistiller's import paths (helper/)."""

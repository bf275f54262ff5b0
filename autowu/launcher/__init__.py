"""The launcher's parts (``launch/train.py``, ``python -m autowu.launcher``): run settings, one epoch of
training, checkpoints, stop signals, nodes, the run's log and picture, ending a process."""

"""Where users train: Lightning (:mod:`.lightning`) and Accelerate (:mod:`.accelerate`).

Each module imports its framework only when used (``pip install "adaptive-batch[lightning]"`` or
``[accelerate]``); importing this package imports neither.
"""

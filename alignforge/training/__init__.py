from alignforge.training.checkpoint import CheckpointManager
from alignforge.training.loop import (
    NonFiniteLossError,
    Objective,
    TrainLoop,
    make_accelerator,
    place_frozen,
    to_device,
    write_json,
)

__all__ = [
    "CheckpointManager",
    "NonFiniteLossError",
    "Objective",
    "TrainLoop",
    "make_accelerator",
    "place_frozen",
    "to_device",
    "write_json",
]

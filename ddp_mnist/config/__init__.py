"""The training job's settings: `TrainConfig` (train_config.py), the vocabulary of its fields (options.py).

`from ddp_mnist.config import TrainConfig` is the short import; modules of the package import the
submodules.
"""

from ddp_mnist.config.options import GROUPS, MODELS, RECIPES, TARGET_ACCURACY, recipe_values
from ddp_mnist.config.train_config import TrainConfig
from ddp_mnist.config.validation import TRAJECTORY_KEYS

__all__ = [
    "GROUPS",
    "MODELS",
    "RECIPES",
    "TARGET_ACCURACY",
    "TRAJECTORY_KEYS",
    "TrainConfig",
    "recipe_values",
]

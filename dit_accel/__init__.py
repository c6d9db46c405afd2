"""dit_accel: training-free acceleration of diffusion transformers in HuggingFace diffusers.

    import dit_accel
    dit_accel.accelerate(pipe, "fbcache")
    image = pipe("a cat").images[0]
    print(dit_accel.stats(pipe))
    dit_accel.remove(pipe)
"""

from .api import accelerate, accelerated, is_accelerated, policy_of, remove, reset, stats
from .calibrate import calibrate
from .config import PolicyError
from .policy import Policy, load_policy, preset_names
from .stats import Stats

__version__ = "0.1.0"

__all__ = ["Policy", "PolicyError", "Stats", "accelerate", "accelerated", "calibrate", "is_accelerated",
           "load_policy",
           "policy_of", "preset_names", "remove", "reset", "stats", "__version__"]

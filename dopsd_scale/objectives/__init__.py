"""Training objectives: D-OPSD roll-out distillation and the SFT baseline."""

from .dopsd import DOPSDObjective, parse_steps
from .sft import SFTObjective

__all__ = ["DOPSDObjective", "SFTObjective", "parse_steps"]

"""The original DELIA import path: `from delia.DSFTTrainer import DSFTTrainer` keeps working."""

from .trainer import DSFTTrainer

__all__ = ["DSFTTrainer"]

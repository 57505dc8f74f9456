"""Prompt data: the DataModule (DialogSum or any prompt dataset), row filters and nested fields."""

from detox_lightning.data.datamodule import DialogSumDataModule

__all__ = ["DialogSumDataModule"]

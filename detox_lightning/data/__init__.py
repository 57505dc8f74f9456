"""Prompt data: the DataModule (DialogSum or any prompt dataset), local data files, row filters and
nested fields, and the resumable data order."""

from detox_lightning.data.datamodule import DialogSumDataModule

__all__ = ["DialogSumDataModule"]

"""`python train.py fit|validate|test --config ...`: LightningCLI over the modules of this package."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from detox_lightning.data import DialogSumDataModule
from detox_lightning.errors import ConfigError


class DetoxCLI(LightningCLI):
    """LightningCLI with the links between data and model settings."""

    def add_arguments_to_parser(self, parser) -> None:
        # The PPO batch is the DataLoader batch: one setting, read by both.
        parser.link_arguments("data.batch_size", "model.init_args.batch_size")


def main(args: list[str] | None = None) -> None:
    """Run the CLI; bad input ends with one `error: ...` line on stderr and exit code 2."""
    try:
        DetoxCLI(
            datamodule_class=DialogSumDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except ValueError as err:
        cause = config_error_in(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def config_error_in(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err`: jsonargparse re-raises errors of nested classes as ValueError."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err

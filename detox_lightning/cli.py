"""`python train.py fit|validate|test --config ...`: LightningCLI over the modules of this package."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningCLI

from detox_lightning.data.datamodule import DialogSumDataModule
from detox_lightning.errors import ConfigError, one_line
from detox_lightning.evaluation.predict import add_prediction_writer
from detox_lightning.io.checkpoint import load_checkpoint_file
from detox_lightning.moved import moved_paths_in
from detox_lightning.training.guards import NonFiniteError

CKPT_SPECIAL = ("last", "best", "hpc", "registry")


class DetoxCLI(LightningCLI):
    """LightningCLI with the links between data and model settings."""

    def add_arguments_to_parser(self, parser) -> None:
        # The PPO batch is the DataLoader batch: one setting, read by both.
        parser.link_arguments("data.batch_size", "model.init_args.batch_size")

    def instantiate_classes(self) -> None:
        """Build model, data, trainer and callbacks; any error on the way is the user's input.

        Our own checks raise ConfigErrors that name the setting. What a library raises on the way
        (jsonargparse wraps it in a page of the whole config) becomes one ConfigError with the
        library's own message.
        """
        resolve_auto_dtype(self.config.get(self.subcommand) if self.subcommand else self.config)
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = config_error_in(err)
            if cause is not None:
                raise cause from err
            raise ConfigError(f"the configuration could not be built: {one_line(root_cause(err))}") from err

    def _parse_ckpt_path(self) -> None:
        # LightningCLI (2.6.6) torch.loads an explicit ckpt_path here, before any hook, to re-read
        # saved hyper-parameters: a missing or corrupted file would end in a raw traceback. Check it
        # first (ConfigError naming the file); our checkpoints hold no hyper-parameters to re-read.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or str(ckpt_path) in CKPT_SPECIAL or "://" in str(ckpt_path):
            return super()._parse_ckpt_path()
        if load_checkpoint_file(ckpt_path).get("hyper_parameters"):
            super()._parse_ckpt_path()

    def before_fit(self) -> None:
        """Refuse an unwritable output dir before anything is written; load checkpoints weights-only."""
        config = self.config_init[self.subcommand]
        check_writable(self.trainer.default_root_dir, "trainer.default_root_dir")
        for logger in self.trainer.loggers:
            if logger.save_dir:
                check_writable(logger.save_dir, "trainer.logger save_dir")
        if config.get("weights_only") is None:
            config["weights_only"] = True  # tensors and plain data only; what torch >= 2.6 defaults to

    def before_predict(self) -> None:
        """`predict` writes `predictions.jsonl` through a PredictionWriter: one is added when the config has none."""
        self.before_fit()
        add_prediction_writer(self.trainer)


# Library messages that say nothing actionable about a run of this tool (checked on the pinned versions).
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # Lightning: the frozen reward classifier is in eval mode on purpose
    r"Model has `tie_word_embeddings=True`",  # peft: transformers 5 marks every T5 config tied (below)
    r"`is_gradient_checkpointing` is deprecated",  # a library calling another's old name
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning calling torch's old name
    r"You passed in a `val_dataloader` but have no `validation_step`",  # PPO evaluates in a callback
)
QUIET_LOGS = {
    # transformers 5 forces tie_word_embeddings=True on T5 configs; FLAN-T5's own lm_head loads untied, as it should.
    "transformers.modeling_utils": "will NOT tie them",
    "lightning.pytorch.utilities.rank_zero": "💡 Tip",  # adverts for Lightning's cloud services
}
QUIET_BARS = ("Loading weights", "Writing model shards")  # instant for local files; downloads keep their bars


def _not_quiet_log(record: logging.LogRecord) -> bool:
    text = QUIET_LOGS.get(record.name)
    return text is None or text not in record.getMessage()


def _hide_local_bars(factory, args, kwargs):
    return factory(*args, **kwargs | {"disable": kwargs.get("desc") in QUIET_BARS or kwargs.get("disable", False)})


def quiet_library_noise() -> None:
    """Hide the progress bars and warnings above; every other message still shows.

    Safe to call again (as tests call `main` repeatedly): filters are added once.
    """
    import datasets
    from transformers.utils import logging as hf_logging

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in QUIET_LOGS:
        logging.getLogger(name).addFilter(_not_quiet_log)  # the same function: added once
    datasets.disable_progress_bars()  # map/filter over local prompts: instant
    hf_logging.set_tqdm_hook(_hide_local_bars)


def main(args: list[str] | None = None) -> None:
    """Run the CLI; bad input ends with one `error: ...` line on stderr and exit code 2."""
    quiet_library_noise()
    with errors_as_one_line():
        check_moved_paths(sys.argv[1:] if args is None else args)
        build_cli(args)


def build_cli(args: list[str] | None, run: bool = True) -> DetoxCLI:
    """The LightningCLI of `train.py` (with `run=False`: model, data and trainer built, nothing run)."""
    # Parse errors are raised, not printed after a page of usage, so they get the one-line treatment.
    no_exit = {"exit_on_error": False}
    return DetoxCLI(
        datamodule_class=DialogSumDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,  # each module builds its own optimizer (the RL module steps it by hand)
        save_config_kwargs={"overwrite": True},
        parser_kwargs=no_exit | ({name: no_exit for name in DetoxCLI.subcommands()} if run else {}),
        args=args,
        run=run,
    )


@contextlib.contextmanager
def errors_as_one_line() -> Iterator[None]:
    """User errors inside end the process with one `error: ...` line: exit 2 for bad input, 1 for a
    run stopped by non-finite iterations; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, ArgumentError) as err:
        cause = config_error_in(err)
        if cause is None and not isinstance(err, ArgumentError):
            raise
        message = cause if cause is not None else parser_error_line(err)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def check_moved_paths(args: list[str]) -> None:
    """Refuse, in one line, a command line or config file that names a module of the old flat layout."""
    texts = [" ".join(args)]
    for i, arg in enumerate(args):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        if path is not None and Path(path).is_file():
            texts.append(Path(path).read_text(errors="replace"))
    moved = moved_paths_in("\n".join(texts))
    if moved:
        old, new = moved[0]
        more = f" (and {len(moved) - 1} more moved path(s))" if len(moved) > 1 else ""
        raise ConfigError(f"{old} has moved: use {new}{more}")


def resolve_auto_dtype(config) -> None:
    """`policy.dtype: auto` is float32 when the trainer is told to run on the CPU, even where a GPU
    is visible (`policy.base_dtype` alone would choose bfloat16 there); otherwise left to it."""
    key = "model.init_args.policy.dtype"
    accelerator = config.get("trainer.accelerator")
    if config.get(key) == "auto" and isinstance(accelerator, str) and accelerator.lower() == "cpu":
        config[key] = "float32"


def parser_error_line(err: ArgumentError) -> str:
    """jsonargparse's multi-line report as one line: the unknown keys, or the first problem."""
    text = str(err)
    key = re.match(r'Parser key "([^"]+)"', text)
    unknown = re.search(r"unrecognized arguments: (.+)", text)
    if unknown:
        where = f" under {key.group(1)!r}" if key else ""
        return f"unknown setting {unknown.group(1).strip()}{where}; see `python train.py fit --help`"
    wrong_type = re.findall(r'Parser key "([^"]+)":\s*Expected an? (.+?)\. Got value: (\S+)', text)
    if wrong_type:  # the innermost key, e.g. ppo.learning_rate under model.init_args
        name, expected, value = wrong_type[-1]
        expected = re.sub(r"<class '(\w+)'>", r"\1", expected).replace("typing.Literal", "one of ")
        prefix = f"{key.group(1)}.init_args." if key and key.group(1) != name else ""
        return f"{prefix}{name}={value!r} is not " + (expected if expected.startswith("one of") else f"a valid {expected}")
    in_class = re.search(
        r"Problem with given class_path '([\w.]+)':\s*Parser key \"([^\"]+)\".*?Expected a <class '(\w+)'>.*?Given value: ([^\n]+)",
        text,
        re.DOTALL,
    )
    if in_class:  # a typed argument of a component in a list, e.g. a callback's band given as text
        owner, name, expected, value = in_class.groups()
        return f"{owner.rsplit('.', 1)[-1]}: {name}={value.strip()!r} is not a valid {expected}"
    return " ".join(text.split())[:500]


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Raise a ConfigError unless `path` is, or can be created as, a writable directory."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag}={str(path)!r} cannot be created: {str(existing)!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigError(f"{flag}={str(path)!r} is not writable ({err.strerror}: {str(existing)!r})") from err


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of `err`'s chain: what the library itself raised."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def config_error_in(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind `err`: jsonargparse re-raises errors of nested classes as ValueError."""
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err

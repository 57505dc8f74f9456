"""`python -m detox_lightning.export --adapter DIR --out DIR --merge`: a standalone merged model.

The adapter's LoRA weights are folded into its base model (peft's `merge_and_unload`) and the
result is saved with the tokenizer, so it loads with the base model's own Auto class (seq2seq or
causal, as `Architecture.auto_model_class` picks it; the command prints which) and generates
without peft. The base model is the adapter's own
`base_model_name_or_path` unless `--base` names another copy of it (e.g. on another machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detox_lightning.errors import ConfigError, user_input
from detox_lightning.io.atomic import write_directory


def model_class(base: str, trust_remote_code: bool = False):
    """The transformers Auto class that loads `base` (its `Architecture`'s)."""
    from transformers import AutoConfig

    from detox_lightning.models.architectures import architecture_of
    from detox_lightning.offline.builtin import resolve

    with user_input(f"the base model {base!r} could not be read (expected a hub id, a local model directory or a builtin: name)"):
        config = AutoConfig.from_pretrained(resolve(base), trust_remote_code=trust_remote_code)
    return architecture_of(config).auto_model_class()


def adapter_base(adapter: str | Path) -> str | None:
    """The adapter's `base_model_name_or_path`; a ConfigError unless `adapter` is a PEFT adapter directory."""
    from peft import PeftConfig

    directory = Path(adapter).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"--adapter {str(adapter)!r}: no such directory")
    if not (directory / "adapter_config.json").is_file():
        raise ConfigError(
            f"--adapter {str(adapter)!r} is not a PEFT adapter: it has no adapter_config.json "
            f"(it holds {sorted(p.name for p in directory.iterdir())[:8]})"
        )
    with user_input(f"--adapter {str(adapter)!r} is not a readable PEFT adapter (adapter_config.json)"):
        return PeftConfig.from_pretrained(str(directory)).base_model_name_or_path


def export_merged(
    adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "float32", trust_remote_code: bool = False
) -> tuple[Path, type]:
    """Merge `adapter` into its base model and save model + tokenizer to `out` (a new or empty directory).

    Everything is written to a temporary directory beside `out` and renamed into place at the
    end (`io.atomic.write_directory`), so a failure leaves nothing behind.

    Returns:
        `out` and the transformers Auto class that loads it.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from detox_lightning.models.dtypes import DTYPES
    from detox_lightning.offline.builtin import resolve

    out = Path(out).expanduser()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty directory; name a new one")
    saved_base = adapter_base(adapter)
    base = base or saved_base
    if not base:
        raise ConfigError(f"--adapter {str(adapter)!r} names no base model; pass --base")
    auto = model_class(base, trust_remote_code)
    with user_input(f"the base model {base!r} could not be loaded with {auto.__name__}"):
        model = auto.from_pretrained(resolve(base), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    with user_input(f"--adapter {str(adapter)!r} could not be loaded as a PEFT adapter of {base!r}"):
        model = PeftModel.from_pretrained(model, str(Path(adapter).expanduser()))
    merged = model.merge_and_unload()
    has_tokenizer = any((Path(adapter).expanduser() / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    with user_input("the tokenizer could not be loaded from the adapter or its base model"):
        tokenizer = AutoTokenizer.from_pretrained(str(Path(adapter).expanduser()) if has_tokenizer else resolve(base))

    def fill(staged: Path) -> None:
        merged.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        (staged / "README.md").write_text(
            f"# Merged detox_lightning model\n\n- base model: `{base}`\n- adapter: `{adapter}` (merged with peft's "
            f"`merge_and_unload`)\n- dtype: {dtype}\n\nLoad with `{auto.__name__}.from_pretrained(this_dir)` and "
            f"`AutoTokenizer.from_pretrained(this_dir)`; no peft needed.\n"
        )

    if not write_directory(out, fill, replace=False):  # never over a model: `out` was checked empty above
        raise ConfigError(f"--out {str(out)!r} was filled by another process during the export; name a new one")
    return out, auto


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one `error:` line, as the training CLI
        print(f"error: {message}; see `python -m detox_lightning.export --help`", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    from detox_lightning.models.dtypes import DTYPES

    parser = _Parser(prog="python -m detox_lightning.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a PEFT adapter directory (e.g. <log_dir>/adapter_best)")
    parser.add_argument("--out", required=True, help="a new (or empty) directory for the merged model")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into its base model (required)")
    parser.add_argument("--base", default=None, help="the base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the merged weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the base model")
    args = parser.parse_args(argv)
    from detox_lightning.cli import quiet_library_noise

    quiet_library_noise()
    if not args.merge:
        parser.error("nothing to export without --merge (a merged model is the one export this tool makes)")
    try:
        out, auto = export_merged(args.adapter, args.out, args.base, args.dtype, args.trust_remote_code)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"export: merged {args.adapter} into its base model; wrote {out} (load with {auto.__name__}.from_pretrained)")


if __name__ == "__main__":
    main()

"""Entry point: `python train.py fit --config configs/flan_t5_base.yaml` (see README.md)."""

from detox_lightning.cli import main

if __name__ == "__main__":
    main()

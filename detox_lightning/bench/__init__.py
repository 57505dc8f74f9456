"""Speed and memory of one PPO iteration: this project's module vs the notebook's loop vs a floor,
and this module's phases against the machine's arithmetic limit (FLOPs and a measured matmul peak).

    python -m detox_lightning.bench                       # FLAN-T5-small shape, RoBERTa-base reward, CPU float32
    python -m detox_lightning.bench --reward-quantize int8                # the opt-in CPU lever (README)
    python -m detox_lightning.bench --estimator grpo --batch-size 8 --samples-per-prompt 2 --init-kl-coef 0 --fixed-kl
    python -m detox_lightning.bench --estimator rloo --batch-size 8 --samples-per-prompt 2 --skip-notebook
    python -m detox_lightning.bench --shape base --device cuda --dtype bfloat16
    python -m detox_lightning.bench --policy causal --model-dir /tmp/bm_causal   # a Llama shape of FLAN-T5-small's size

Offline: the models have the real FLAN-T5 / RoBERTa shapes (or a Llama shape of the same size
and vocabulary, `--policy causal`) with random weights (see `models.py`);
the three ways and the evaluation are in `ways.py`; `driver.py` sets up, runs them and reports;
`flops.py` counts each phase's arithmetic from the configs and token counts, `efficiency.py`
records those counts and measures the peak. `runs.sh` runs the README's goal measurements.

Every way generates exactly `--new-tokens` tokens a response (EOS is masked until then by
`min_length = new_tokens + 1`, and `max_new_tokens = new_tokens`), so all ways do the same work.
Timings of the three ways come from one process (wall and CPU seconds per phase; on a shared host
compare CPU seconds at `--threads 1`); peak memory from one fresh subprocess per way. The
notebook's loop always scores in float32 and samples with `torch.multinomial`, as the notebook.
The last line printed is one JSON object.
"""

from detox_lightning.bench.driver import main

__all__ = ["main"]

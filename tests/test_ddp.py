"""Data-parallel PPO: the real CLI on 2 CPU ranks (DDP over gloo) does what one device does, globally,
and resumes exactly on 2 ranks.

`RankProbe` runs inside the CLI subprocesses (`--trainer.callbacks+=test_ddp.RankProbe`) and writes
one file per rank; the test compares them.
"""

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from detox_lightning.rl import stats
from detox_lightning.trl_compat import masked_whiten

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 2


class RankProbe(Callback):
    """Test only: record this rank's prompts, whitening inputs/outputs, KL coefficient, weights, eval."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record = {"whiten": [], "queries": []}

    def on_fit_start(self, trainer, pl_module) -> None:
        whiten = stats.masked_whiten

        def recording(values, mask, *args, **kwargs):
            out = whiten(values, mask, *args, **kwargs)
            self.record["whiten"].append((values.clone(), mask.clone(), out.clone()))
            return out

        stats.masked_whiten = recording  # the gae estimator calls stats.masked_whiten by attribute
        self.record["weights_start"] = {n: p.detach().clone() for n, p in pl_module.trainable_parameters().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.record["syncs"] = 0

        def counting_allreduce(state, bucket):  # every bucket of one gradient sync; bucket 0 once a sync
            self.record["syncs"] += bucket.index() == 0
            return allreduce_hook(None, bucket)

        trainer.model.register_comm_hook(None, counting_allreduce)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["queries"] += batch["query"]
        self.record.setdefault("rng", []).append(torch.get_rng_state())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("time/")}
        self.record.setdefault("logged", []).append(logged)
        self.record.setdefault("rollout_queries", []).append(list(pl_module.last_rollout.queries))
        self.record.setdefault("rollout_scores", []).append(pl_module.last_rollout.scores.clone())

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["weights"] = {n: p.detach().clone() for n, p in pl_module.trainable_parameters().items()}
        self.record["kl_coef"] = pl_module.kl_ctl.value
        self.record["world_size"] = trainer.world_size

    def on_fit_end(self, trainer, pl_module) -> None:  # after ToxicityEvaluation's (listed before us)
        evaluation = next(c for c in trainer.callbacks if type(c).__name__ == "ToxicityEvaluation")
        self.record["eval"] = dict(evaluation.last_metrics)
        self.record["before_queries"] = list(evaluation.before.queries)
        self.record["before_toxicity"] = evaluation.before.toxicity
        self.record["before_log_ppl"] = evaluation.before.log_ppl
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out_dir / f"rank{trainer.global_rank}.pt")


def pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def gloo_unavailable() -> str | None:
    """Why a gloo process group cannot start here, or None when it can."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "this torch build has no torch.distributed / gloo backend"
    probe = textwrap.dedent(
        """
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        dist.all_reduce(__import__("torch").ones(1))
        dist.destroy_process_group()
        """
    )
    try:
        result = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "starting a gloo process group timed out"
    if result.returncode != 0:
        return "cannot start a gloo process group: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    return None


def write_config(tmp_path) -> str:
    """configs/tiny.yaml on 2 CPU ranks, made small: 4 prompts a rank, 4-6 new tokens, 8 eval prompts,
    a checkpoint kept per iteration."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"].update(
        devices=2, strategy="ddp", limit_train_batches=ITERATIONS, enable_progress_bar=False, num_sanity_val_steps=0
    )
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("RLCheckpoint"):
            callback["init_args"]["save_top_k"] = -1  # keep iteration 1's, to resume from
        if callback["class_path"].endswith("ToxicityEvaluation"):
            # 7 prompts in batches of 2 over 2 ranks (an uneven split), k = 2 samples each
            callback["init_args"].update(
                num_prompts=7, samples_per_prompt=2, max_new_tokens=6, batch_size=2, table_rows=3,
                bootstrap_resamples=50, show_examples=0,
            )
    model = config["model"]["init_args"]
    model["generation"] = {"output_min_length": 4, "output_max_length": 6}
    # a KL controller that visibly moves; two micro-batches of 1 per mini-batch of 2
    model["ppo"].update(mini_batch_size=2, gradient_accumulation_steps=2, target=0.01, horizon=8)
    config["data"]["batch_size"] = 4
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_two_rank_ddp_fit_is_one_global_ppo(tmp_path, tiny_t5, tiny_classifier, sample_data):
    # the fixtures build the tiny models once, before two ranks would race to build them
    reason = gloo_unavailable()
    if reason:
        pytest.skip(reason)
    config, probe, root = write_config(tmp_path), tmp_path / "probe", tmp_path / "runs"
    result = fit_on_two_ranks(config, root, probe / "straight")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(probe / "straight" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    a, b = ranks
    assert a["world_size"] == b["world_size"] == 2

    # each rank trained on its own shard of prompts, with its own sampling noise
    assert len(a["queries"]) == len(b["queries"]) == ITERATIONS * 4
    assert not set(a["queries"]) & set(b["queries"])
    assert not torch.equal(a["rng"][0], b["rng"][0])

    # one gradient all-reduce per optimizer step (2 a rank-iteration), not one per micro-batch (4)
    assert a["syncs"] == b["syncs"] == ITERATIONS * 2

    # gradients were averaged: the same trained weights on both ranks, and they moved
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    assert any(not torch.equal(a["weights"][n], a["weights_start"][n]) for n in a["weights"])

    # the KL controller saw the global KL: the same coefficient on both ranks, and it moved
    assert a["kl_coef"] == b["kl_coef"] != 0.2

    # logged statistics are those of the global batch: the same on both ranks
    assert len(a["logged"]) == ITERATIONS and a["logged"] == b["logged"]
    assert "objective/kl" in a["logged"][-1]

    # advantages were whitened with the mean and std of the concatenated (global) batch
    assert len(a["whiten"]) == len(b["whiten"]) == ITERATIONS
    for (va, ma, wa), (vb, mb, wb) in zip(a["whiten"], b["whiten"], strict=True):
        width = max(va.shape[1], vb.shape[1])
        values, mask, got = (torch.cat([pad(x, width), pad(y, width)]) for x, y in ((va, vb), (ma, mb), (wa, wb)))
        expected = masked_whiten(values.double(), mask.double()).float() * mask
        got = got * mask
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        local = masked_whiten(va, ma) * ma
        assert not torch.allclose(local, wa * ma, atol=1e-3)  # per-rank whitening would differ

    # evaluation: gathered, computed once, the same figures on every rank (NaN where undefined,
    # e.g. the improvement of a zero std, on both)
    assert a["eval"] and a["eval"].keys() == b["eval"].keys()
    for name, value in a["eval"].items():
        assert value == b["eval"][name] or (math.isnan(value) and math.isnan(b["eval"][name])), name

    # every held-out prompt scored exactly once, none twice by padding, the same rows on both ranks,
    # and the per-sample figures (the RealToxicityPrompts ones come from these) equal one device's
    assert a["before_queries"] == b["before_queries"] and len(set(a["before_queries"])) == len(a["before_queries"]) == 7
    assert a["before_toxicity"].shape == (7, 2)
    one = one_device_reference_outputs(tiny_t5, tiny_classifier, sample_data)
    assert a["before_queries"] == one.queries
    assert abs(a["before_toxicity"] - one.toxicity).max() < 1e-5
    assert abs(a["before_log_ppl"] - one.log_ppl).max() < 1e-4
    assert "eval/toxicity_exp_max_delta_ci_high" in a["eval"] and "eval/log_perplexity_delta" in a["eval"]

    # rank zero alone wrote the report, the table and the adapter
    assert len(list(root.rglob("evaluation_report.json"))) == 1
    assert len(list(root.rglob("toxicity_table.csv"))) == 1
    assert len([p for p in root.rglob("adapter") if p.is_dir()]) == 1
    assert len(list(root.rglob("last.ckpt"))) == 1

    # resumed on 2 ranks from iteration 1's checkpoint, iteration 2 is that of the straight run, even
    # under another seed_everything: the checkpoint fixes the prompt order (our sampler's seed and
    # that of Lightning's DistributedSamplerWrapper around it) and the RNG states
    first = next(root.rglob("epoch=0-iteration=1.ckpt"))
    result = fit_on_two_ranks(
        config, tmp_path / "resumed", probe / "resumed", "--ckpt_path", str(first), "--seed_everything", "1"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for r, straight in enumerate(ranks):
        resumed = torch.load(probe / "resumed" / f"rank{r}.pt", weights_only=False)
        assert resumed["queries"] == straight["queries"][4:]  # the same shard, where it left off
        assert resumed["kl_coef"] == straight["kl_coef"]
        for name, weight in straight["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], weight, rtol=0, atol=1e-6)


def one_device_reference_outputs(tiny_t5, tiny_classifier, sample_data):
    """The reference's evaluation outputs on one device, with the DDP run's settings."""
    from types import SimpleNamespace

    from detox_lightning import DialogSumDataModule, GenerationSettings, HFClassifierReward, PolicyConfig, RLDetoxModule
    from detox_lightning.evaluation import ToxicityEvaluation

    module = RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier), policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=8, lora_alpha=16),
        generation=GenerationSettings(output_min_length=4, output_max_length=6), batch_size=4,
    )
    evaluation = ToxicityEvaluation(num_prompts=7, samples_per_prompt=2, max_new_tokens=6, batch_size=2)
    outside = SimpleNamespace(
        datamodule=DialogSumDataModule(path=sample_data, tokenizer_name_or_path=tiny_t5), global_rank=0, world_size=1
    )
    return evaluation.generate_and_score(outside, module, reference=True)


def fit_on_two_ranks(config: str, root: Path, probe: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "train.py", "fit", "--config", config, "--trainer.default_root_dir", str(root),
         "--trainer.callbacks+=test_ddp.RankProbe", f"--trainer.callbacks.out_dir={probe}", *args],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )


@pytest.mark.slow
def test_two_rank_sft_finishes_and_writes_one_adapter(tmp_path, tiny_t5, sample_data):
    """The SFT stage on 2 ranks: every rank reaches the end (`trainer.log_dir` is a collective that
    all must call), and rank 0 alone writes the adapter to `<log_dir>/adapter`."""
    reason = gloo_unavailable()
    if reason:
        pytest.skip(reason)
    root, timeout = tmp_path / "sft", 300
    command = [
        sys.executable, "train.py", "fit", "--config", "configs/tiny_sft.yaml", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false", "--data.batch_size", "4",
        "--model.init_args.adapter_dir", "null", "--model.init_args.sample_prompts", "1",
        "--model.init_args.max_target_tokens", "8",
    ]
    # Its own process group: on a hang, rank 1 (a child of rank 0) is killed with it, not left behind.
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        stdout, stderr = run.communicate()
        pytest.fail(f"2-rank SFT did not finish in {timeout} s (a collective not every rank called?)\n{stderr[-3000:]}")
    assert run.returncode == 0, stderr[-4000:]
    adapters = [p for p in root.rglob("adapter*") if p.is_dir()]
    assert adapters == [root / "lightning_logs" / "version_0" / "adapter"], adapters
    assert (adapters[0] / "adapter_model.safetensors").is_file()
    assert "SFT adapter written to" in stdout + stderr

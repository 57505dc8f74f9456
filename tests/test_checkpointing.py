"""Restartable runs: lean checkpoints, exact resume after SIGKILL, atomic saves, non-finite guard."""

import csv
import math
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import fit, sigkill_then_resume, train_cli
from lightning.pytorch.callbacks import Callback

from detox_lightning import GenerationSettings, HFClassifierReward, PolicyConfig, RLDetoxModule
from detox_lightning.data.sampler import EpochSeededSampler, ResumableDataLoader
from detox_lightning.errors import ConfigError
from detox_lightning.io.checkpoint import RLCheckpoint, iterations_done
from detox_lightning.rewards.classifiers import RewardModel
from detox_lightning.training.guards import NonFiniteError
from detox_lightning.training.resumable import capture_rng_states, restore_rng_states
from detox_lightning.training.settings import RLSettings

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers used in-process and, through `--trainer.callbacks+=`, by the CLI subprocesses ----


class SigkillAfterIteration(Callback):
    """Test only: SIGKILL this process at the end of `iteration`, before its checkpoint is written
    (Lightning runs ModelCheckpoint callbacks last), or, with `during_save`, while it is written."""

    def __init__(self, iteration: int, during_save: bool = False) -> None:
        self.iteration, self.during_save = iteration, during_save

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.during_save and iterations_done(trainer) == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.during_save and iterations_done(trainer) == self.iteration:
            checkpoint["zz_kill_while_pickling"] = KillWhenPickled()  # after the tensors: a half-written file


class KillWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


class NaNReward(RewardModel):
    """The tiny classifier's reward, NaN for one text at the given calls (0-based)."""

    def __init__(self, classifier: str, nan_calls: set[int] | None = None) -> None:
        super().__init__()
        self.inner = HFClassifierReward(classifier)
        self.nan_calls = nan_calls
        self.calls = 0

    def score(self, texts):
        scores = self.inner.score(texts)
        if self.nan_calls is None or self.calls in self.nan_calls:
            scores[0] = float("nan")
        self.calls += 1
        return scores

    def toxicity(self, texts):
        return self.inner.toxicity(texts)


class RecordWeights(Callback):
    def __init__(self) -> None:
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({n: p.detach().clone() for n, p in pl_module.trainable_parameters().items()})


def make_module(tiny_t5, reward, batch_size=4, **ppo):
    return RLDetoxModule(
        reward=reward,
        policy=PolicyConfig(model_name_or_path=tiny_t5, lora_r=4),
        ppo=RLSettings(**({"learning_rate": 1e-2, "mini_batch_size": 2} | ppo)),
        generation=GenerationSettings(output_min_length=4, output_max_length=6),
        batch_size=batch_size,
    )


def metric_rows(trainer, name):
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def test_checkpoint_holds_no_frozen_weight_and_is_a_few_times_the_trainable_bytes(
    tiny_t5, tiny_classifier, sample_data, tmp_path
):
    pl.seed_everything(0)
    module = make_module(tiny_t5, HFClassifierReward(tiny_classifier))
    checkpoint_cb = RLCheckpoint(every_n_iterations=1, dirpath=str(tmp_path / "ckpt"))
    fit(module, sample_data, tmp_path, iterations=2, callbacks=[checkpoint_cb])
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # plain data only: safe loading works

    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert set(checkpoint["state_dict"]) == set(trainable)
    assert not frozen & set(checkpoint["state_dict"])
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    assert last.stat().st_size <= 3 * trainable_bytes + 2**20, (last.stat().st_size, trainable_bytes)
    # What a resume needs besides the weights.
    state = checkpoint["ppo_state"]
    assert state["iterations"] == 2 and set(state["rng"]) >= {"torch", "numpy", "python"}
    assert checkpoint["optimizer_states"] and "kl_controller" in state
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches_served": 2, "seed": 0}
    ]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-iteration=2.ckpt", "last.ckpt"]


def test_checkpoint_frequency_counts_ppo_iterations_not_optimizer_steps(tiny_t5, tiny_classifier, sample_data, tmp_path):
    pl.seed_everything(0)
    module = make_module(tiny_t5, HFClassifierReward(tiny_classifier))  # 2 optimizer steps an iteration
    checkpoint_cb = RLCheckpoint(every_n_iterations=2, save_top_k=-1, dirpath=str(tmp_path / "ckpt"))
    trainer = fit(module, sample_data, tmp_path, iterations=3, callbacks=[checkpoint_cb])
    assert trainer.global_step == 6
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    # every 2 iterations, and at the end of the run
    assert names == ["epoch=0-iteration=2.ckpt", "epoch=0-iteration=3.ckpt", "last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["ppo_state"]["iterations"] == 3


def test_checkpoint_of_another_base_model_is_refused(tiny_t5, tiny_classifier):
    module = make_module(tiny_t5, HFClassifierReward(tiny_classifier))
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    checkpoint["ppo_state"]["base_model"]["embedding_abs_sum"] *= 1.5
    checkpoint["ppo_state"]["base_model"]["d_model"] = 768
    with pytest.raises(ConfigError, match=r"another base model .*d_model: checkpoint 768 vs model \d+.*embedding_abs_sum"):
        module.on_load_checkpoint(checkpoint)


def test_rng_states_round_trip_through_weights_only_loading(tmp_path):
    import random

    import numpy as np

    states = capture_rng_states()
    torch.save(states, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_resumable_loader_continues_at_the_next_batch_and_reshuffles_next_epoch():
    def loader():
        return ResumableDataLoader(list(range(12)), batch_size=3, sampler=EpochSeededSampler(12, seed=7))

    straight = loader()
    epoch0 = [b.tolist() for b in straight]
    straight.sampler.set_epoch(1)
    epoch1 = [b.tolist() for b in straight]
    assert epoch0 != epoch1 and sorted(i for b in epoch0 for i in b) == list(range(12))

    first = loader()
    it = iter(first)
    seen = [next(it).tolist(), next(it).tolist()]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches_served": 2, "seed": 7}
    resumed = loader()
    resumed.sampler.seed = 99  # a fresh process may draw another seed; the checkpoint's wins
    resumed.load_state_dict(state)
    assert seen + [b.tolist() for b in resumed] == epoch0
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == epoch1  # the skip applies once, to its own epoch


@pytest.mark.parametrize("rank", [0, 1])
def test_resumable_loader_restores_the_order_inside_lightnings_ddp_sampler(rank):
    """Under DDP Lightning swaps the loader's sampler for `DistributedSamplerWrapper(ours, shuffle=True,
    seed=PL_GLOBAL_SEED)`, which shuffles our order again with its own seed: a resume must restore both."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    def loader(seed, shard_seed):
        sampler = EpochSeededSampler(16, seed)
        wrapped = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=True, seed=shard_seed)
        return ResumableDataLoader(list(range(16)), batch_size=2, sampler=wrapped, drop_last=True)

    straight = [b.tolist() for b in loader(7, 0)]
    first = loader(7, 0)
    it = iter(first)
    seen = [next(it).tolist(), next(it).tolist()]
    resumed = loader(99, 5)  # a resume under another seed_everything: other seeds for ours and the wrapper
    resumed.load_state_dict(first.state_dict())
    assert seen + [b.tolist() for b in resumed] == straight
    assert resumed.sampler.dataset._sampler.seed == 7 and resumed.sampler.seed == 0


# ---- non-finite guard ----


def test_iteration_with_a_nan_reward_is_skipped_and_counted(tiny_t5, tiny_classifier, sample_data, tmp_path):
    pl.seed_everything(0)
    module = make_module(tiny_t5, NaNReward(tiny_classifier, nan_calls={1}))
    weights = RecordWeights()
    with pytest.warns(UserWarning, match="PPO iteration skipped: non-finite env/reward_mean"):
        trainer = fit(module, sample_data, tmp_path, iterations=3, callbacks=[weights])
    before, skipped, after = weights.after
    assert all(torch.equal(skipped[n], before[n]) for n in before)  # iteration 2 left no trace
    assert any(not torch.equal(after[n], skipped[n]) for n in before)  # iteration 3 trained
    assert trainer.global_step == 4  # 2 optimizer steps for each of iterations 1 and 3
    assert metric_rows(trainer, "ppo/skipped_iterations") == [0.0, 1.0, 1.0]
    reward_means = metric_rows(trainer, "env/reward_mean")  # logged as it was: NaN in the skipped one
    assert [math.isnan(v) for v in reward_means] == [False, True, False]


class RecordOptimizerState(Callback):
    """Test only: a copy of the optimizer's per-parameter state (AdamW moments and step) after each iteration."""

    def __init__(self) -> None:
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = trainer.optimizers[0].state_dict()["state"]
        self.after.append({i: {k: v.clone() for k, v in s.items()} for i, s in state.items()})


def test_nan_loss_rolls_back_weights_and_optimizer_state(tiny_t5, tiny_classifier, sample_data, tmp_path, monkeypatch):
    from detox_lightning.rl import losses

    module = None
    poisoned = []  # (PPO iterations done, optimizer steps done) when the NaN was returned
    calls = []
    value_loss = losses.value_loss

    def nan_on_third_minibatch(*args, **kwargs):  # value_loss runs once a mini-batch
        loss, clipfrac = value_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) != 3:
            return loss, clipfrac
        poisoned.append((iterations_done(module.trainer), module.trainer.global_step))
        return loss * float("nan"), clipfrac

    monkeypatch.setattr(losses, "value_loss", nan_on_third_minibatch)
    pl.seed_everything(0)
    module = make_module(tiny_t5, HFClassifierReward(tiny_classifier))  # 2 mini-batches of 2 an iteration
    weights, optimizer = RecordWeights(), RecordOptimizerState()
    with pytest.warns(UserWarning, match="non-finite loss, updated weights"):
        trainer = fit(module, sample_data, tmp_path, iterations=2, callbacks=[weights, optimizer])
    # The NaN came in iteration 2 after 2 optimizer steps: the third mini-batch, its iteration's first. It
    # stepped, so the fourth ran on NaN weights (a NaN policy loss too); the whole iteration is undone.
    assert poisoned == [(1, 2)] and len(calls) == 4
    assert [math.isnan(v) for v in metric_rows(trainer, "ppo/loss/policy")] == [False, True]
    assert all(torch.equal(weights.after[1][n], weights.after[0][n]) for n in weights.after[0])
    assert all(torch.isfinite(p).all() for p in module.trainable_parameters().values())
    assert metric_rows(trainer, "ppo/skipped_iterations") == [0.0, 1.0]
    # The optimizer state rolls back too: stale moments (or a step count of 4) would change every later update.
    before, after = optimizer.after
    assert before and before.keys() == after.keys()
    for i, state in before.items():
        assert set(state) >= {"exp_avg", "exp_avg_sq", "step"} and state["step"] == 2
        for key, value in state.items():
            assert torch.equal(after[i][key], value), (i, key)


def test_consecutive_non_finite_iterations_stop_the_run(tiny_t5, tiny_classifier, sample_data, tmp_path):
    pl.seed_everything(0)
    module = make_module(tiny_t5, NaNReward(tiny_classifier), max_consecutive_skips=2)
    start = {n: p.detach().clone() for n, p in module.trainable_parameters().items()}
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match=r"2 PPO iterations in a row .*max_consecutive_skips=2"):
        fit(module, sample_data, tmp_path, iterations=4)
    assert all(torch.equal(p, start[n]) for n, p in module.trainable_parameters().items())


def test_max_consecutive_skips_must_be_positive():
    with pytest.raises(ConfigError, match="max_consecutive_skips=0 must be at least 1"):
        RLSettings(max_consecutive_skips=0)


# ---- the real CLI: SIGKILL between checkpoints and while saving, then --ckpt_path last ----


def write_config(tmp_path, iterations=6, every_n_iterations=1, save_top_k=1):
    """configs/tiny.yaml made small: 6 iterations of 4 prompts, 4-6 new tokens, only our checkpoint."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["trainer"].update(limit_train_batches=iterations, enable_progress_bar=False)
    config["trainer"]["callbacks"] = [
        {
            "class_path": "detox_lightning.io.checkpoint.RLCheckpoint",
            "init_args": {"every_n_iterations": every_n_iterations, "save_top_k": save_top_k},
        }
    ]
    model = config["model"]["init_args"]
    model["generation"] = {"output_min_length": 4, "output_max_length": 6}
    model["ppo"]["mini_batch_size"] = 2
    config["data"]["batch_size"] = 4
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def rewards(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars("env/reward_mean")]


@pytest.mark.slow
def test_sigkill_then_resume_from_last_equals_an_uninterrupted_run(tmp_path):
    config = write_config(tmp_path)
    straight = train_cli(config, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    first = tmp_path / "killed" / "lightning_logs" / "version_0" / "checkpoints"

    def iteration_4_was_lost():
        assert torch.load(first / "last.ckpt", weights_only=True)["ppo_state"]["iterations"] == 3

    resumed, expected, got = sigkill_then_resume(config, tmp_path / "killed", tmp_path / "straight", 4,
                                                 tolerance=1e-6, after_kill=iteration_4_was_lost)
    assert f"Restored all states from the checkpoint at {first / 'last.ckpt'}" in resumed.stderr + resumed.stdout
    assert got["ppo_state"]["iterations"] == 6 and got["global_step"] == expected["global_step"] == 12
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    straight_rewards = rewards(tmp_path / "straight/lightning_logs/version_0")
    assert len(straight_rewards) == 6
    assert rewards(tmp_path / "killed/lightning_logs/version_1") == pytest.approx(straight_rewards[3:], abs=1e-6)


def test_sigkill_while_saving_leaves_the_previous_last_checkpoint_loadable(tmp_path):
    config = write_config(tmp_path, iterations=3, save_top_k=0)  # only last.ckpt is written
    killed = train_cli(config, tmp_path, "--trainer.callbacks+=test_checkpointing.SigkillAfterIteration",
                       "--trainer.callbacks.iteration=2", "--trainer.callbacks.during_save=true")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["ppo_state"]["iterations"] == 1 and "zz_kill_while_pickling" not in last
    assert [p.name for p in checkpoints.iterdir() if p.name != "last.ckpt" and not p.name.endswith(".tmp")] == []


def killed_and_resumed_vs_straight(tmp_path, *args):
    """Run 6 iterations straight and killed after 4 then resumed, both with `args`; assert the resumed
    run ends with the straight run's trainable tensors (< 1e-6). Returns the resumed checkpoint."""
    config = write_config(tmp_path)
    straight = train_cli(config, tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr[-3000:]
    _, expected, got = sigkill_then_resume(config, tmp_path / "killed", tmp_path / "straight", 4, *args, tolerance=1e-6)
    assert got["ppo_state"]["iterations"] == 6 and got["state_dict"].keys() == expected["state_dict"].keys()
    return got

"""The three ways one PPO iteration is timed: this project's module, the notebook's loop, a floor.

Plus the evaluation's throughput both ways. Each function takes the same module (the same
weights, tokenizer and reward) so that only the way differs; the notebook's ways take their own
reward when `--reward-quantize` is set (the notebook scores in float32), and the floor uses the
module's. With `--samples-per-prompt k` the notebook and the floor take each prompt k times, so
every way generates, scores and trains on as many responses.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict

import torch

from detox_lightning.bench.memory import reset_peak, rss_mb
from detox_lightning.bench.models import collate, repeat_rows

WAYS = ("ours", "notebook", "floor")


def plain_generation_kwargs(module, max_new_tokens: int) -> dict:
    """The notebook's sampling: `torch.multinomial`, whatever `generation.fast_sampling` says."""
    return module.generation_kwargs(max_new_tokens, fast=False)


class ValueHead(torch.nn.Module):
    """trl's value head (dropout, one Linear to a scalar), for the PPO ways when this module has none."""

    def __init__(self, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout, self.summary = torch.nn.Dropout(dropout), torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(hidden.to(self.summary.weight.dtype)))


class Clock:
    """Seconds per named phase, and optionally each phase's peak resident memory.

    Also this process's CPU seconds per phase (`cpu_totals`): on a host shared with other jobs they
    move far less than wall time, so they compare ways when wall time cannot.
    CUDA is synchronized at every boundary so GPU work is counted. With `memory=True` the kernel's
    high-water mark is read and reset at every boundary (Linux), so each stretch of time is
    charged to the innermost phase open during it ("other" outside every phase); a phase's peak is
    the highest RSS seen while it was innermost.
    """

    def __init__(self, device: torch.device, memory: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu_totals: dict[str, float] = defaultdict(float)
        self.peak_mb: dict[str, float] | None = defaultdict(float) if memory and reset_peak() else None
        self._open: list[tuple[str, float, float]] = []

    def clear(self) -> None:
        self.totals.clear()
        self.cpu_totals.clear()

    def split(self) -> dict[str, float]:
        """Wall seconds per phase, and CPU seconds as `cpu_<phase>`."""
        return dict(self.totals) | {f"cpu_{k}": v for k, v in self.cpu_totals.items()}

    def innermost(self) -> str:
        """The innermost open phase ("other" outside every phase)."""
        return self._open[-1][0] if self._open else "other"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def boundary(self) -> None:
        """Charge the peak RSS since the last boundary to the innermost open phase."""
        if self.peak_mb is not None:
            name = self._open[-1][0] if self._open else "other"
            self.peak_mb[name] = max(self.peak_mb[name], rss_mb("VmHWM"))
            reset_peak()

    def start(self, name: str) -> None:
        self.boundary()
        self._open.append((name, self.now(), time.process_time()))

    def stop(self) -> None:
        self.boundary()
        name, t0, c0 = self._open.pop()
        self.totals[name] += self.now() - t0
        self.cpu_totals[name] += time.process_time() - c0

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            with self(name):
                return fn(*a, **kw)

        return timed


# ---- way 1: this project's module, driven by a Lightning Trainer ----


def run_ours(module, batches: list[dict], args, clock: Clock | None = None, work: list | None = None) -> list[dict[str, float]]:
    """Fit `module` for len(batches) iterations; returns per-iteration phase timings.

    `work`: a list to which each iteration's token and FLOP counts are appended (`efficiency.WorkRecorder`).
    """
    import lightning.pytorch as pl

    per_iter: list[dict[str, float]] = []
    if not hasattr(module, "bench_clock"):  # wrapped once: a later call (the second round, --profile) reuses them
        clock = clock or Clock(torch.device(args.device))
        # Instance-level wrappers time the module's own methods without changing them.
        module.sample = clock.wrap("generate", module.sample)
        module.make_experience = clock.wrap("experience", module.make_experience)
        module.update = clock.wrap("update", module.update)
        module.reward.register_forward_pre_hook(lambda *_: clock.start("reward"))
        module.reward.register_forward_hook(lambda *_: clock.stop())
        module.bench_clock, module.bench_recorder = clock, None
    clock = module.bench_clock
    if work is not None and module.bench_recorder is None:
        from detox_lightning.bench.efficiency import WorkRecorder

        module.bench_recorder = WorkRecorder(module, clock, recompute=args.gradient_checkpointing)
    recorder = module.bench_recorder if work is not None else None

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.clear()
            if recorder is not None:
                recorder.reset()
            self.t0, self.cpu0 = clock.now(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = clock.split()
            t["total"], t["cpu"] = clock.now() - self.t0, time.process_time() - self.cpu0
            for prefix in ("", "cpu_"):
                t[prefix + "logprobs"] = t[prefix + "experience"] - t[prefix + "generate"] - t[prefix + "reward"]
            per_iter.append(t)
            if recorder is not None:
                work.append(recorder.take())

    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
        limit_train_batches=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], default_root_dir=args.workdir,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    if recorder is not None:
        recorder.enabled = True
    try:
        trainer.fit(module, loader)
    finally:
        if recorder is not None:
            recorder.enabled = False  # the other ways and the evaluation share the module: not counted
    return per_iter


# ---- way 2: the notebook's loop (trl's classic PPOTrainer), same model and prompts ----


def _trl_forward(model, arch, rows, tokenizer, device, mb, width):
    """trl's `batched_forward_pass`: mini-batches padded on their own, full log-softmax then gather.

    Responses of unequal length (`--new-tokens-range`) are right-padded within a mini-batch;
    log-probs and values come back padded to `width` columns.
    """
    out_lp, out_v = [], []
    for start in range(0, len(rows), mb):
        chunk = rows[start : start + mb]
        enc = tokenizer.pad({"input_ids": [q.tolist() for q, _ in chunk]}, padding=True, return_tensors="pt").to(device)
        longest = max(len(r) for _, r in chunk)
        responses = torch.stack([torch.nn.functional.pad(r, (0, longest - len(r)), value=tokenizer.pad_token_id)
                                 for _, r in chunk]).to(device)
        mask = torch.stack([torch.arange(longest) < len(r) for _, r in chunk]).to(device)
        logits, values = arch.forward(model, enc["input_ids"], enc["attention_mask"], responses, mask)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        out_lp.append(torch.nn.functional.pad(logp * mask, (0, width - longest)))
        out_v.append(torch.nn.functional.pad(values.float() * mask, (0, width - longest)))
    return torch.cat(out_lp), torch.cat(out_v)


@torch.no_grad()
def pipeline_scores(reward, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """The notebook's `sentiment_pipe(texts, batch_size=16)`: batches in input order, each padded to its longest."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = reward.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                               max_length=reward.max_length, return_tensors="pt")
        out.append(reward.classifier(**enc.to(reward.classifier.device)).logits.float()[:, reward.reward_index])
    return torch.cat(out)


def notebook_iteration(module, reward, ref_model, optimizer, batch: dict, args, clock: Clock) -> None:
    from detox_lightning.rl import gae, per_token_kl, policy_loss, shape_rewards, value_loss
    from detox_lightning.trl_compat import masked_whiten

    policy, tokenizer, ppo, device = module.policy, module.tokenizer, module.ppo, torch.device(args.device)
    arch = module.arch
    gen_kwargs = plain_generation_kwargs(module, args.new_tokens)
    queries = [q[m.bool()] for q, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    # 1. one prompt at a time through generate
    with clock("generate"), torch.no_grad():
        policy.eval()
        responses = [
            arch.responses(policy.generate(input_ids=q[None].to(device), attention_mask=torch.ones_like(q[None]).to(device),
                                           **gen_kwargs), len(q))[0]
            for q in queries
        ]
    width = max(len(r) for r in responses)  # all equal unless --new-tokens-range
    with clock("reward"):
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        scores = pipeline_scores(reward, [q + r for q, r in zip(batch["query"], texts, strict=True)]).to(device)
    rows = list(zip(queries, responses, strict=True))
    # 2. old log-probs and values, then reference log-probs from the deep-copied model: two passes
    with clock("logprobs"), torch.no_grad():
        logprobs, values = _trl_forward(policy, arch, rows, tokenizer, device, ppo.mini_batch_size, width)
        ref_logprobs, _ = _trl_forward(ref_model, arch, rows, tokenizer, device, ppo.mini_batch_size, width)
        mask = torch.stack([torch.arange(width) < len(r) for r in responses]).float().to(device)
        rewards = shape_rewards(scores, per_token_kl(logprobs, ref_logprobs), mask, 0.2)
        advantages, returns = gae(values, rewards, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)
    # 3. PPO: mini-batches, each forward recomputes log-probs over the full vocabulary
    with clock("update"):
        policy.train(not ppo.disable_dropout)
        for idx in torch.randperm(len(rows)).split(ppo.mini_batch_size):
            new_lp, vpred = _trl_forward(policy, arch, [rows[i] for i in idx], tokenizer, device, len(idx), width)
            idx = idx.to(device)
            pg_loss, *_ = policy_loss(new_lp, logprobs[idx], advantages[idx], mask[idx], ppo.cliprange)
            vf_loss, _ = value_loss(vpred, values[idx], returns[idx], mask[idx], ppo.cliprange_value)
            (pg_loss + ppo.vf_coef * vf_loss).backward()
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], ppo.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()


# ---- way 3: the batched floor: no old/reference pass, no PPO bookkeeping ----


def floor_iteration(module, optimizer, batch: dict, args, clock: Clock) -> None:
    from detox_lightning.models.rollout import token_logprobs

    policy, tokenizer, ppo, device = module.policy, module.tokenizer, module.ppo, torch.device(args.device)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with clock("generate"), torch.no_grad():
        policy.eval()
        with module.generation_weights():
            out = policy.generate(input_ids=input_ids, attention_mask=attention_mask,
                                  **module.generation_kwargs(args.new_tokens))
        responses = module.arch.responses(out, input_ids.shape[1])
    with clock("reward"):
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        module.reward(batch["query"], texts)
    with clock("update"):
        policy.train(not ppo.disable_dropout)
        for idx in torch.arange(len(texts), device=device).split(ppo.mini_batch_size):
            prompt = module.arch.trim_prompt(input_ids[idx], attention_mask[idx], int(attention_mask[idx].sum(dim=1).max()))
            logits, values = module.arch.forward(policy, *prompt, responses[idx], torch.ones_like(responses[idx]))
            loss = -token_logprobs(logits, responses[idx], 1.0).mean() + values.float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


# ---- evaluation throughput: toxicity of generated summaries ----


@torch.no_grad()
def eval_batched(module, prompts: list[dict], args) -> float:
    """Length-grouped batches through one generate each, then one batched toxicity call; seconds."""
    policy, tokenizer, device = module.policy, module.tokenizer, torch.device(args.device)
    policy.eval()
    clock = Clock(device)
    t0 = clock.now()
    ordered = sorted(prompts, key=lambda p: len(p["input_ids"]))
    texts = []
    for start in range(0, len(ordered), args.eval_batch_size):
        rows = ordered[start : start + args.eval_batch_size]
        batch = collate(tokenizer, rows)
        with module.generation_weights():
            out = policy.generate(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device),
                                  **module.generation_kwargs(args.new_tokens))
        responses = tokenizer.batch_decode(module.arch.responses(out, batch["input_ids"].shape[1]), skip_special_tokens=True)
        texts += [q + " " + r for q, r in zip(batch["query"], responses, strict=True)]
    module.reward.toxicity(texts).tolist()
    return clock.now() - t0


@torch.no_grad()
def eval_notebook(module, reward, prompts: list[dict], args) -> float:
    """The notebook's `evaluate_toxicity`: one prompt, one generate, one toxicity call at a time; seconds."""
    policy, tokenizer, device = module.policy, module.tokenizer, torch.device(args.device)
    policy.eval()
    clock = Clock(device)
    t0 = clock.now()
    for p in prompts:
        ids = torch.tensor([p["input_ids"]], device=device)
        out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **plain_generation_kwargs(module, args.new_tokens))
        response = tokenizer.decode(module.arch.responses(out, ids.shape[1])[0], skip_special_tokens=True)
        reward.toxicity([p["query"] + " " + response]).tolist()
    return clock.now() - t0


# ---- driving a way over batches ----


def run_way(
    way: str, module, batches: list[dict], args, clock: Clock | None = None, reward=None, work: list | None = None
) -> list[dict[str, float]]:
    """Run `way` over `batches` (the first is the warm-up); per-iteration phase timings.

    `reward`: the notebook's classifier (default: the module's). `work`: see `run_ours` (this module only).
    """
    clock = clock or Clock(torch.device(args.device))
    if way == "ours":
        return run_ours(module, batches, args, clock, work)
    batches = [repeat_rows(b, args.samples_per_prompt) for b in batches]
    if module.policy.v_head is None:  # rloo/grpo built the module without one; these ways are PPO
        module.policy.v_head = ValueHead(module.policy.pretrained_model.config.hidden_size).to(args.device)
    with clock("setup"):
        params = [p for p in module.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=module.ppo.learning_rate)
        # create_reference_model: a frozen deep copy of the whole network
        ref_model = copy.deepcopy(module.policy).eval().requires_grad_(False) if way == "notebook" else None
    per_iter = []
    for batch in batches:
        clock.clear()
        t0, cpu0 = clock.now(), time.process_time()
        if way == "notebook":
            notebook_iteration(module, reward or module.reward, ref_model, optimizer, batch, args, clock)
        else:
            floor_iteration(module, optimizer, batch, args, clock)
        per_iter.append(clock.split() | {"total": clock.now() - t0, "cpu": time.process_time() - cpu0})
    return per_iter


def mean_split(per_iter: list[dict[str, float]]) -> dict[str, float]:
    timed = per_iter[1:] or per_iter  # drop the warm-up
    phases = ("generate", "reward", "logprobs", "update")
    keys = (*phases, "total", "cpu", *(f"cpu_{k}" for k in phases))  # cpu: this process's CPU seconds
    return {k: sum(t.get(k, 0.0) for t in timed) / len(timed) for k in keys}

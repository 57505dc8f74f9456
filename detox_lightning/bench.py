"""Speed and memory of one PPO iteration: this project's module vs the notebook's loop vs a floor.

    python -m detox_lightning.bench                       # FLAN-T5-small shape, RoBERTa-base reward, CPU fp32
    python -m detox_lightning.bench --shape base --device cuda --dtype bf16

Offline: the models have the real FLAN-T5 / RoBERTa shapes with random weights, saved with
`save_pretrained` and loaded back through the project's own `from_pretrained` code. The tokenizer
is a BPE trained on the sample dialogues (~4 characters a token, as T5's on English dialogue),
padded with filler pieces up to FLAN-T5's 32,128 ids so that any sampled id decodes to text.

Every way generates exactly `--new-tokens` tokens a response (EOS is masked until then by
`min_length = new_tokens + 1`, and `max_new_tokens = new_tokens`), so all ways do the same work.
Timings of the three ways come from one process; peak memory from one fresh subprocess per way.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

SHAPES = {  # T5Config fields of google/flan-t5-{small,base}; tiny is for tests
    "tiny": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2},
    "small": {"d_model": 512, "d_ff": 1024, "d_kv": 64, "num_heads": 6, "num_layers": 8, "num_decoder_layers": 8},
    "base": {"d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12},
}
REWARD_SHAPES = {  # RobertaConfig fields of roberta-base (the hate classifier's shape); tiny for tests
    "tiny": {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 514},
    "base": {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 514},
}
T5_VOCAB = 32128
BPE_VOCAB = 700  # gives ~4 characters a token on the sample dialogues
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
WAYS = ("ours", "notebook", "floor")


# ---- models and prompts, built offline ----


def _corpus(n: int = 1000) -> list[str]:
    from detox_lightning import sample_data
    from detox_lightning.data import NOTEBOOK_PROMPT

    rows = sample_data.make_dialogues(n, seed=12345, toxic_fraction=0.5)
    return [NOTEBOOK_PROMPT.format(dialogue=r["dialogue"]) for r in rows] + [r["summary"] for r in rows]


def _pad_vocab(tokenizer, size: int):
    """Extend a BPE vocabulary with unreachable filler pieces up to `size` ids.

    The fillers are never produced by encoding (no merge leads to them) but decode to 3-6 letter
    words, so responses sampled from a 32,128-id model decode to text of realistic length.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < size:
        piece = "\u2581" + "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        vocab.setdefault(piece, len(vocab))
    fast = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(
        tokenizer_object=fast,
        model_max_length=tokenizer.model_max_length,
        clean_up_tokenization_spaces=False,
        **tokenizer.special_tokens_map,
    )


def build_models(root: Path, shape: str, reward_shape: str) -> tuple[str, str]:
    """Save a FLAN-T5-shaped policy and a RoBERTa-shaped nothate/hate classifier under `root`."""
    from transformers import (
        GenerationConfig,
        RobertaConfig,
        RobertaForSequenceClassification,
        T5Config,
        T5ForConditionalGeneration,
    )

    from detox_lightning.builtin import train_tokenizer

    corpus = _corpus(200 if shape == "tiny" else 1000)  # tests need speed, not realistic lengths
    t5_tok = train_tokenizer(
        corpus, BPE_VOCAB, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        single="$A </s>", pair="$A </s> $B </s>", model_max_length=1024,
    )
    t5_tok = _pad_vocab(t5_tok, T5_VOCAB)
    config = T5Config(
        vocab_size=T5_VOCAB, feed_forward_proj="gated-gelu", dropout_rate=0.1, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **SHAPES[shape],
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)  # untied, as FLAN-T5
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    policy_dir = root / "policy"
    model.save_pretrained(policy_dir)
    t5_tok.save_pretrained(policy_dir)
    del model

    rob_tok = train_tokenizer(
        corpus, BPE_VOCAB, {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
    )
    rconfig = RobertaConfig(
        type_vocab_size=1, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1}, **REWARD_SHAPES[reward_shape],
    )
    classifier = RobertaForSequenceClassification(rconfig)
    reward_dir = root / "reward"
    classifier.save_pretrained(reward_dir)
    rob_tok.save_pretrained(reward_dir)
    return str(policy_dir), str(reward_dir)


def make_prompts(tokenizer, n: int, seed: int) -> list[dict]:
    """`n` tokenized notebook prompts from sample dialogues of 200 < characters <= 1000 (the notebook's filter)."""
    from detox_lightning import sample_data
    from detox_lightning.data import NOTEBOOK_PROMPT

    rows = [r for r in sample_data.make_dialogues(3 * n + 50, seed=seed) if 200 < len(r["dialogue"]) <= 1000][:n]
    prompts = []
    for row in rows:
        ids = tokenizer(NOTEBOOK_PROMPT.format(dialogue=row["dialogue"]))["input_ids"]
        prompts.append({"input_ids": ids, "query": tokenizer.decode(ids, skip_special_tokens=True),
                        "chars": len(NOTEBOOK_PROMPT.format(dialogue=row["dialogue"]))})
    return prompts


def collate(tokenizer, rows: list[dict]) -> dict:
    """Right-padded to the longest prompt of these rows (as `DialogSumDataModule.collate`)."""
    batch = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "query": [r["query"] for r in rows]}


def make_module(args, policy_dir: str, reward_dir: str):
    from detox_lightning import GenerationSettings, HFClassifierReward, PolicyConfig, PPODetoxModule, PPOSettings

    return PPODetoxModule(
        reward=HFClassifierReward(reward_dir, batch_size=args.reward_batch_size),
        policy=PolicyConfig(model_name_or_path=policy_dir, dtype=DTYPES[args.dtype]),
        ppo=PPOSettings(mini_batch_size=args.mini_batch_size, ppo_epochs=1),
        # every response is exactly new_tokens long: EOS is masked until then (min_length counts the start token)
        generation=GenerationSettings(min_length=args.new_tokens + 1, output_min_length=args.new_tokens,
                                      output_max_length=args.new_tokens),
        batch_size=args.batch_size,
    )


# ---- timing helpers ----


class Clock:
    """Accumulates seconds per named phase; synchronizes CUDA so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = self.now()
        try:
            yield
        finally:
            self.totals[name] += self.now() - t0

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            with self(name):
                return fn(*a, **kw)

        return timed


# ---- way 1: this project's module, driven by a Lightning Trainer ----


def run_ours(module, batches: list[dict], args, clock: Clock | None = None) -> list[dict[str, float]]:
    """Fit `module` for len(batches) iterations; returns per-iteration phase timings."""
    import lightning.pytorch as pl

    clock = clock or Clock(torch.device(args.device))
    per_iter: list[dict[str, float]] = []

    # Instance-level wrappers time the module's own methods without changing them.
    module.sample = clock.wrap("generate", module.sample)
    module.make_experience = clock.wrap("experience", module.make_experience)
    module.ppo_update = clock.wrap("update", module.ppo_update)
    reward_t0 = {}
    module.reward.register_forward_pre_hook(lambda *_: reward_t0.__setitem__("t", clock.now()))
    module.reward.register_forward_hook(
        lambda *_: clock.totals.__setitem__("reward", clock.totals["reward"] + clock.now() - reward_t0["t"])
    )

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.totals.clear()
            self.t0, self.cpu0 = clock.now(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            t = dict(clock.totals)
            t["total"], t["cpu"] = clock.now() - self.t0, time.process_time() - self.cpu0
            t["logprobs"] = t["experience"] - t["generate"] - t["reward"]
            per_iter.append(t)

    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
        limit_train_batches=len(batches), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], default_root_dir=args.workdir,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, loader)
    return per_iter


# ---- way 2: the notebook's loop (trl's classic PPOTrainer), same model and prompts ----


def _trl_forward(model, rows, tokenizer, decoder_start, device, mb):
    """trl's `batched_forward_pass`: mini-batches padded on their own, full log-softmax then gather."""
    out_lp, out_v = [], []
    for start in range(0, len(rows), mb):
        chunk = rows[start : start + mb]
        enc = tokenizer.pad({"input_ids": [q.tolist() for q, _ in chunk]}, padding=True, return_tensors="pt").to(device)
        responses = torch.stack([r for _, r in chunk]).to(device)
        dec = torch.cat([responses.new_full((len(chunk), 1), decoder_start), responses[:, :-1]], dim=1)
        logits, _, values = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=dec)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        out_lp.append(logp)
        out_v.append(values.float())
    return torch.cat(out_lp), torch.cat(out_v)


def notebook_iteration(module, ref_model, optimizer, batch: dict, args, clock: Clock) -> None:
    from detox_lightning import ppo_math
    from detox_lightning.trl_compat import masked_whiten

    policy, tokenizer, ppo, device = module.policy, module.tokenizer, module.ppo, torch.device(args.device)
    start = policy.pretrained_model.config.decoder_start_token_id
    gen_kwargs = module.generation_kwargs(args.new_tokens)
    queries = [q[m.bool()] for q, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    # 1. one prompt at a time through generate
    with clock("generate"), torch.no_grad():
        policy.eval()
        responses = [policy.generate(input_ids=q[None].to(device), **gen_kwargs)[0, 1:] for q in queries]
    with clock("reward"):
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        scores = module.reward(batch["query"], texts).to(device)
    rows = list(zip(queries, responses, strict=True))
    # 2. old log-probs and values, then reference log-probs from the deep-copied model: two passes
    with clock("logprobs"), torch.no_grad():
        logprobs, values = _trl_forward(policy, rows, tokenizer, start, device, ppo.mini_batch_size)
        ref_logprobs, _ = _trl_forward(ref_model, rows, tokenizer, start, device, ppo.mini_batch_size)
        mask = torch.ones_like(logprobs)
        rewards = ppo_math.shape_rewards(scores, ppo_math.per_token_kl(logprobs, ref_logprobs), mask, 0.2)
        advantages, returns = ppo_math.gae(values, rewards, mask, ppo.gamma, ppo.lam)
        advantages = masked_whiten(advantages, mask)
    # 3. PPO: mini-batches, each forward recomputes log-probs over the full vocabulary
    with clock("update"):
        policy.train(not ppo.disable_dropout)
        for idx in torch.randperm(len(rows)).split(ppo.mini_batch_size):
            new_lp, vpred = _trl_forward(policy, [rows[i] for i in idx], tokenizer, start, device, len(idx))
            idx = idx.to(device)
            pg_loss, *_ = ppo_math.policy_loss(new_lp, logprobs[idx], advantages[idx], mask[idx], ppo.cliprange)
            vf_loss, _ = ppo_math.value_loss(vpred, values[idx], returns[idx], mask[idx], ppo.cliprange_value)
            (pg_loss + ppo.vf_coef * vf_loss).backward()
            torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], ppo.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()


# ---- way 3: the batched floor: no old/reference pass, no PPO bookkeeping ----


def floor_iteration(module, optimizer, batch: dict, args, clock: Clock) -> None:
    from detox_lightning.rollout import decoder_inputs, token_logprobs

    policy, tokenizer, ppo, device = module.policy, module.tokenizer, module.ppo, torch.device(args.device)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with clock("generate"), torch.no_grad():
        policy.eval()
        out = policy.generate(input_ids=input_ids, attention_mask=attention_mask,
                              **module.generation_kwargs(args.new_tokens))
        responses = out[:, 1:]
    with clock("reward"):
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        module.reward(batch["query"], texts)
    with clock("update"):
        policy.train(not ppo.disable_dropout)
        dec = decoder_inputs(responses, policy.pretrained_model.config.decoder_start_token_id)
        for idx in torch.arange(len(texts), device=device).split(ppo.mini_batch_size):
            width = int(attention_mask[idx].sum(dim=1).max())
            logits, _, values = policy(input_ids=input_ids[idx, :width], attention_mask=attention_mask[idx, :width],
                                       decoder_input_ids=dec[idx])
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
        out = policy.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                              **module.generation_kwargs(args.new_tokens))
        responses = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
        texts += [q + " " + r for q, r in zip(batch["query"], responses, strict=True)]
    module.reward.toxicity(texts).tolist()
    return clock.now() - t0


@torch.no_grad()
def eval_notebook(module, prompts: list[dict], args) -> float:
    """The notebook's `evaluate_toxicity`: one prompt, one generate, one toxicity call at a time; seconds."""
    policy, tokenizer, device = module.policy, module.tokenizer, torch.device(args.device)
    policy.eval()
    clock = Clock(device)
    t0 = clock.now()
    for p in prompts:
        out = policy.generate(input_ids=torch.tensor([p["input_ids"]], device=device),
                              **module.generation_kwargs(args.new_tokens))
        response = tokenizer.decode(out[0, 1:], skip_special_tokens=True)
        module.reward.toxicity([p["query"] + " " + response]).tolist()
    return clock.now() - t0


# ---- driver ----


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory in MiB.

    /proc's VmHWM belongs to this process image; `ru_maxrss` would also carry the peak of the
    parent that forked it (Linux keeps it across exec), so it is only the fallback.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_rss_mb() -> float:
    return rss_mb("VmHWM")


def run_way(way: str, module, batches: list[dict], args) -> list[dict[str, float]]:
    """Run `way` over `batches` (the first is the warm-up); per-iteration phase timings."""
    if way == "ours":
        return run_ours(module, batches, args)
    clock = Clock(torch.device(args.device))
    params = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=module.ppo.learning_rate)
    # create_reference_model: a frozen deep copy of the whole network
    ref_model = copy.deepcopy(module.policy).eval().requires_grad_(False) if way == "notebook" else None
    per_iter = []
    for batch in batches:
        clock.totals.clear()
        t0, cpu0 = clock.now(), time.process_time()
        if way == "notebook":
            notebook_iteration(module, ref_model, optimizer, batch, args, clock)
        else:
            floor_iteration(module, optimizer, batch, args, clock)
        per_iter.append(dict(clock.totals) | {"total": clock.now() - t0, "cpu": time.process_time() - cpu0})
    return per_iter


def mean_split(per_iter: list[dict[str, float]]) -> dict[str, float]:
    timed = per_iter[1:] or per_iter  # drop the warm-up
    keys = ("generate", "reward", "logprobs", "update", "total", "cpu")  # cpu: this process's CPU seconds
    return {k: sum(t.get(k, 0.0) for t in timed) / len(timed) for k in keys}


def memory_worker(args) -> None:
    """In a fresh process: build, run one iteration of `args.worker` (plus the evaluation for 'eval'), print peak RSS."""
    import detox_lightning  # noqa: F401 - torch, transformers, peft, trl and lightning, before the baseline

    baseline = rss_mb("VmRSS")  # the interpreter and imported libraries, before any model
    module, batches, _ = setup(args)
    if args.worker == "eval":
        eval_batched(module, make_prompts(module.tokenizer, args.eval_prompts, seed=99), args)
    else:
        run_way(args.worker, module, batches[:1], args)
    out = {"peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline}
    if args.device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def measure_memory(way: str, args) -> dict:
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--worker", way, "--model-dir", args.model_dir]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in FORWARDED]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker {way!r} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


FORWARDED = ("shape", "reward_shape", "dtype", "device", "threads", "batch_size", "mini_batch_size",
             "new_tokens", "reward_batch_size", "eval_prompts", "eval_batch_size", "seed", "workdir")


def setup(args):
    """Models (built into `--model-dir` unless given), the module, and the (1 + iters) batches."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.model_dir)
    if not (root / "reward" / "config.json").is_file():
        build_models(root, args.shape, args.reward_shape)
    module = make_module(args, str(root / "policy"), str(root / "reward")).to(args.device)
    prompts = make_prompts(module.tokenizer, args.batch_size * (args.iters + 1), seed=args.seed)
    batches = [collate(module.tokenizer, prompts[i : i + args.batch_size]) for i in range(0, len(prompts), args.batch_size)]
    return module, batches, prompts


def versions() -> dict[str, str]:
    import lightning
    import peft
    import transformers
    import trl

    return {"torch": torch.__version__, "lightning": lightning.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__, "python": platform.python_version()}


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        memory_worker(args)
        return {}
    with contextlib.ExitStack() as stack:
        if args.model_dir is None:
            args.model_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="detox_bench_"))
        if args.workdir is None:
            args.workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="detox_bench_logs_"))
        return run(args)


def run(args) -> dict:
    t_setup = time.perf_counter()
    module, batches, prompts = setup(args)
    prompt_tokens = sum(len(p["input_ids"]) for p in prompts) / len(prompts)
    chars_per_token = sum(p["chars"] for p in prompts) / sum(len(p["input_ids"]) for p in prompts)
    print(f"setup {time.perf_counter() - t_setup:.1f}s: {args.shape} policy, {args.reward_shape} reward, "
          f"{prompt_tokens:.0f} prompt tokens on average ({chars_per_token:.2f} characters a token)", flush=True)
    splits = {}
    for way in WAYS:
        if way == "notebook" and args.skip_notebook:
            continue
        splits[way] = mean_split(run_way(way, module, batches, args))
        print(f"{way}: {splits[way]['total']:.2f} s/iter", flush=True)
    if args.profile:
        profile_ours(module, batches[-1], args)

    eval_prompts = make_prompts(module.tokenizer, args.eval_prompts, seed=99)
    eval_s = None if args.skip_eval else eval_batched(module, eval_prompts, args)
    eval_nb_s = None if args.skip_notebook or args.skip_eval else eval_notebook(module, eval_prompts, args)
    del module
    memory = {} if args.skip_memory else {w: measure_memory(w, args) for w in WAYS if w in splits}

    result = {
        "s_per_iter": splits["ours"]["total"],
        "s_per_iter_notebook": splits.get("notebook", {}).get("total"),
        "s_floor": splits["floor"]["total"],
        "eval_prompts_per_s": len(eval_prompts) / eval_s if eval_s else None,
        "eval_prompts_per_s_notebook": len(eval_prompts) / eval_nb_s if eval_nb_s else None,
    }
    result["speedup"] = result["s_per_iter_notebook"] / result["s_per_iter"] if eval_nb_s else None
    result["ratio_to_floor"] = result["s_per_iter"] / result["s_floor"]
    result["eval_speedup"] = eval_nb_s / eval_s if eval_nb_s else None
    for way in memory:
        suffix = "" if way == "ours" else f"_{way}"
        result[f"peak_rss_mb{suffix}"] = memory[way]["peak_rss_mb"]
        result[f"baseline_rss_mb{suffix}"] = memory[way].get("baseline_rss_mb")
        if "peak_cuda_mb" in memory[way]:
            result[f"peak_cuda_mb{suffix}"] = memory[way]["peak_cuda_mb"]
    if "peak_rss_mb" in result and "peak_rss_mb_notebook" in result:
        result["rss_ratio"] = result["peak_rss_mb"] / result["peak_rss_mb_notebook"]
    result |= {
        "split": {w: {k: round(v, 3) for k, v in s.items()} for w, s in splits.items()},
        "shape": args.shape, "reward_shape": args.reward_shape, "dtype": args.dtype, "device": args.device,
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
        "new_tokens": args.new_tokens, "iters": args.iters, "prompt_tokens_mean": round(prompt_tokens, 1),
        "chars_per_token": round(chars_per_token, 2), "eval_prompts": len(eval_prompts),
        "cpu": cpu_name(), "versions": versions(),
    }
    print_table(result, splits)
    print(json.dumps(result))
    return result


def print_table(result: dict, splits: dict) -> None:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    print(f"\n{result['shape']} policy / {result['reward_shape']} reward, {result['dtype']} on {result['device']} "
          f"({result['threads']} threads, {result['cpu']}); batch {result['batch_size']}, mini-batch "
          f"{result['mini_batch_size']}, {result['new_tokens']} new tokens, mean of {result['iters']} iterations")
    print("| way | generate s | reward s | old+ref logprobs, values s | update s | total s/iter | CPU s/iter | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for way, s in splits.items():
        rss = result.get("peak_rss_mb" if way == "ours" else f"peak_rss_mb_{way}")
        print(f"| {way} | {s['generate']:.2f} | {s['reward']:.2f} | {s['logprobs']:.2f} | {s['update']:.2f} "
              f"| {s['total']:.2f} | {s['cpu']:.1f} | {f(rss, '{:.0f}')} |")
    print(f"speedup vs notebook {f(result['speedup'])}x; ratio to floor {f(result['ratio_to_floor'])}; "
          f"RSS ratio {f(result.get('rss_ratio'))}; evaluation {f(result['eval_prompts_per_s'])} prompts/s vs "
          f"{f(result['eval_prompts_per_s_notebook'])} one at a time ({f(result['eval_speedup'])}x)\n")


def profile_ours(module, batch: dict, args) -> None:
    """torch.profiler over one of this module's iterations (already warm); top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        run_ours(module, [batch], args)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m detox_lightning.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="small", help="FLAN-T5 shape of the policy")
    p.add_argument("--reward-shape", choices=list(REWARD_SHAPES), default="base", help="RoBERTa shape of the reward")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the base weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mini-batch-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64, help="exact length of every response")
    p.add_argument("--reward-batch-size", type=int, default=16, help="texts per classifier forward")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-notebook", action="store_true", help="time only this module and the floor")
    p.add_argument("--skip-memory", action="store_true", help="no peak-RSS subprocesses")
    p.add_argument("--skip-eval", action="store_true", help="no evaluation throughput")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one iteration")
    p.add_argument("--model-dir", default=None, help="where the random models are saved (default: a temp dir)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=[*WAYS, "eval"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = []
    if args.batch_size % args.mini_batch_size:
        problems.append(f"--batch-size={args.batch_size} is not divisible by --mini-batch-size={args.mini_batch_size}")
    for flag in ("new_tokens", "iters", "eval_prompts", "eval_batch_size", "reward_batch_size"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device={args.device} but no CUDA device is available")
    if args.dtype == "bf16" and args.device == "cpu":
        print("note: bf16 on CPU is usually slower than fp32", file=sys.stderr)
    if problems:
        p.error("; ".join(problems))
    return args


if __name__ == "__main__":
    main()

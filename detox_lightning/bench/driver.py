"""The benchmark's driver: set up, time the three ways, measure memory in subprocesses, report."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from detox_lightning.bench.efficiency import efficiency, matmul_peak, mean_work, print_efficiency
from detox_lightning.bench.memory import rss_mb
from detox_lightning.bench.models import (
    POLICIES,
    REWARD_SHAPES,
    SHAPES,
    build_models,
    collate,
    draw_lengths_per_prompt,
    make_module,
    make_prompts,
    make_reward,
)
from detox_lightning.bench.ways import (
    WAYS,
    Clock,
    eval_batched,
    eval_notebook,
    mean_split,
    run_ours,
    run_way,
)
from detox_lightning.models.dtypes import DTYPES
from detox_lightning.rewards.quantize import QUANTIZE_CHOICES
from detox_lightning.rl.estimators import ESTIMATORS
from detox_lightning.training.settings import RLSettings

DESCRIPTION = "Speed and memory of one PPO iteration: this project's module vs the notebook's loop vs a floor."


def memory_worker(args) -> None:
    """In a fresh process: build, run one iteration of `args.worker` (or the evaluation), print peak RSS.

    Also the peak RSS reached in each phase (Linux), named like the timing columns; in this
    module's iteration what `make_experience` does besides generate and reward is "logprobs".
    """
    import detox_lightning.training  # noqa: F401 - torch, transformers, peft, trl and lightning, before the baseline

    baseline = rss_mb("VmRSS")  # the interpreter and imported libraries, before any model
    clock = Clock(torch.device(args.device), memory=True)
    with clock("setup"):
        module, batches, _ = setup(args)
    if args.worker == "eval":
        with clock("evaluation"):
            eval_batched(module, make_prompts(module.tokenizer, args.eval_prompts, seed=99), args)
    else:
        run_way(args.worker, module, batches[:1], args, clock)
    clock.boundary()
    if clock.peak_mb is None:
        out = {"peak_rss_mb": rss_mb("VmHWM"), "baseline_rss_mb": baseline}
    else:  # VmHWM was reset at each boundary: the peak is the phases' highest
        phases = {{"experience": "logprobs"}.get(k, k): round(v) for k, v in clock.peak_mb.items()}
        out = {"peak_rss_mb": max(clock.peak_mb.values()), "baseline_rss_mb": baseline, "rss_phases_mb": phases}
    if args.device == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def measure_memory(way: str, args) -> dict:
    cmd = [sys.executable, "-m", "detox_lightning.bench", "--worker", way, "--model-dir", args.model_dir]
    for key, value in vars(args).items():
        if key in FORWARDED and value is not False and value is not None:  # flags: forwarded when set
            flag = f"--{key.replace('_', '-')}"
            cmd += [flag, *map(str, value)] if isinstance(value, list) else [flag + ("" if value is True else f"={value}")]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker {way!r} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


FORWARDED = ("policy", "shape", "reward_shape", "dtype", "device", "threads", "batch_size", "mini_batch_size", "grad_accum",
             "gradient_checkpointing", "new_tokens", "reward_batch_size", "reward_quantize", "estimator",
             "samples_per_prompt", "generation", "eval_prompts", "eval_batch_size", "seed", "workdir", "init_kl_coef",
             "fixed_kl", "new_tokens_range")


def setup(args):
    """Models (built into `--model-dir` unless given), the module, and the (1 + iters) batches."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.model_dir)
    marker = root / "bench_shapes.json"
    shapes = {"shape": args.shape, "reward_shape": args.reward_shape} | ({"policy": "causal"} if args.policy == "causal" else {})
    if not (root / "reward" / "config.json").is_file():
        build_models(root, args.shape, args.reward_shape, args.policy)
        marker.write_text(json.dumps(shapes))
    elif marker.is_file() and json.loads(marker.read_text()) != shapes:
        sys.exit(f"error: --model-dir={args.model_dir} holds {json.loads(marker.read_text())} models, not {shapes}; "
                 f"give each shape its own directory")
    quantize = "none" if args.worker == "notebook" else None  # the notebook scores in float32
    module = make_module(args, str(root / "policy"), str(root / "reward"), quantize).to(args.device)
    if args.new_tokens_range:
        draw_lengths_per_prompt(module.policy, *args.new_tokens_range, seed=args.seed)
    prompts = make_prompts(module.tokenizer, args.batch_size * (args.iters + 1), seed=args.seed)
    batches = [collate(module.tokenizer, prompts[i : i + args.batch_size]) for i in range(0, len(prompts), args.batch_size)]
    return module, batches, prompts


def rounds(ways: list[str], batches: list[dict]) -> list[tuple[list[str], list[dict]]]:
    """The ways' order and batches in each round: forward over the warm-up and the first half of the
    timed batches, then backward over the rest (ABBA).

    A shared host speeds up and slows down over minutes (the matmul peaks measured at a run's
    start and end differ); timing every way in one order would charge a drift to whichever way
    runs first. In ABBA order a linear drift adds the
    same to every way. Every way still sees the same batches; with one timed iteration there is no
    second round.
    """
    half = 1 + len(batches) // 2  # the warm-up and ceil(iters / 2) of the 1 + iters batches
    if len(ways) == 1 or len(batches) <= half:
        return [(ways, batches)]
    return [(ways, batches[:half]), (ways[::-1], batches[half:])]


def measure_peak(args) -> dict[str, float]:
    """Matmul GFLOP/s with this run's threads: float32, and bfloat16 where the policy runs in it."""
    dtypes = {"float32": torch.float32} | ({"bfloat16": torch.bfloat16} if args.dtype == "bfloat16" else {})
    return {name: matmul_peak(dtype, args.peak_size, device=args.device) for name, dtype in dtypes.items()}


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
    with contextlib.ExitStack() as stack:
        if args.model_dir is None:
            args.model_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="detox_bench_"))
        if args.workdir is None:
            args.workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="detox_bench_logs_"))
        if args.worker:
            memory_worker(args)
            return {}
        return run(args)


def run(args) -> dict:
    t_setup = time.perf_counter()
    module, batches, prompts = setup(args)
    prompt_tokens = sum(len(p["input_ids"]) for p in prompts) / len(prompts)
    chars_per_token = sum(p["chars"] for p in prompts) / sum(len(p["input_ids"]) for p in prompts)
    print(f"setup {time.perf_counter() - t_setup:.1f}s: {args.shape} {args.policy} policy, {args.reward_shape} reward, "
          f"{prompt_tokens:.0f} prompt tokens on average ({chars_per_token:.2f} characters a token)", flush=True)
    # the arithmetic limit of this machine with this run's threads, before anything else runs
    peak_start = measure_peak(args)
    print(f"matmul peak at {torch.get_num_threads()} threads: "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak_start.items()), flush=True)
    work: list[dict] = []
    # The notebook's loop scores in float32 as the notebook does; this module and the floor as set.
    nb_reward = module.reward
    if args.reward_quantize != "none" and not args.skip_notebook:
        nb_reward = make_reward(args, str(Path(args.model_dir) / "reward"), "none").to(args.device)
    ways = [w for w in WAYS if not (w == "notebook" and args.skip_notebook) and not (w == "floor" and args.skip_floor)]
    per_iter: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    for order, round_batches in rounds(ways, batches):
        for way in order:
            per_iter[way] += run_way(way, module, round_batches, args, reward=nb_reward, work=work)
            print(f"{way}: {per_iter[way][-1]['total']:.2f} s the last iteration", flush=True)
    splits = {way: mean_split(per_iter[way]) for way in ways}  # each way's warm-up (its first iteration) dropped
    order = " then ".join(", ".join(o) for o, _ in rounds(ways, batches))
    ran = {"estimator": module.ppo.advantage_estimator, "samples_per_prompt": module.ppo.samples_per_prompt,
           "responses_per_iter": len(module.last_rollout.responses), "init_kl_coef": module.ppo.init_kl_coef,
           "adap_kl_ctrl": module.ppo.adap_kl_ctrl, "reference_pass": module.estimator.needs_reference}
    if args.profile:
        profile_ours(module, batches[-1], args)

    eval_prompts = make_prompts(module.tokenizer, args.eval_prompts, seed=99)
    eval_s = None if args.skip_eval else eval_batched(module, eval_prompts, args)
    eval_nb_s = None if args.skip_notebook or args.skip_eval else eval_notebook(module, nb_reward, eval_prompts, args)
    precision = {"ours": module.reward.precision, "notebook": nb_reward.precision}
    del module, nb_reward
    peak_end = measure_peak(args)  # again after the timed work: the higher of the two, should load have come and gone
    peak = {k: max(v, peak_end[k]) for k, v in peak_start.items()}
    memory = {} if args.skip_memory else {w: measure_memory(w, args) for w in WAYS if w in splits}

    result = {
        "s_per_iter": splits["ours"]["total"],
        "s_per_iter_notebook": splits.get("notebook", {}).get("total"),
        "s_floor": splits["floor"]["total"] if "floor" in splits else None,
        "eval_prompts_per_s": len(eval_prompts) / eval_s if eval_s else None,
        "eval_prompts_per_s_notebook": len(eval_prompts) / eval_nb_s if eval_nb_s else None,
    }
    result["speedup"] = result["s_per_iter_notebook"] / result["s_per_iter"] if "notebook" in splits else None
    result["ratio_to_floor"] = result["s_per_iter"] / result["s_floor"] if "floor" in splits else None
    result["eval_speedup"] = eval_nb_s / eval_s if eval_nb_s else None
    for way, mem in memory.items():
        suffix = "" if way == "ours" else f"_{way}"
        result[f"peak_rss_mb{suffix}"] = mem["peak_rss_mb"]
        result[f"baseline_rss_mb{suffix}"] = mem.get("baseline_rss_mb")
        if "peak_cuda_mb" in mem:
            result[f"peak_cuda_mb{suffix}"] = mem["peak_cuda_mb"]
    if "peak_rss_mb" in result and "peak_rss_mb_notebook" in result:
        result["rss_ratio"] = result["peak_rss_mb"] / result["peak_rss_mb_notebook"]
    if "peak_rss_mb" in result and "peak_rss_mb_floor" in result:
        result["rss_ratio_to_floor"] = result["peak_rss_mb"] / result["peak_rss_mb_floor"]
    if phases := {way: mem["rss_phases_mb"] for way, mem in memory.items() if "rss_phases_mb" in mem}:
        result["rss_phases_mb"] = phases
    result |= {"peak_gflops": peak, "peak_gflops_start": peak_start, "peak_gflops_end": peak_end, "peak_size": args.peak_size}
    result |= efficiency(mean_work(work), splits["ours"], peak["bfloat16" if args.dtype == "bfloat16" else "float32"])
    result |= {
        "split": {w: {k: round(v, 3) for k, v in s.items()} for w, s in splits.items()},
        "policy": args.policy, "shape": args.shape, "reward_shape": args.reward_shape, "dtype": args.dtype, "device": args.device,
        "threads": torch.get_num_threads(), "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
        "grad_accum": args.grad_accum, "gradient_checkpointing": args.gradient_checkpointing,
        "reward_batch_size": args.reward_batch_size, "reward_precision": precision["ours"],
        "reward_precision_notebook": precision["notebook"], **ran, "order": order, "generation": args.generation,
        "new_tokens": args.new_tokens, "new_tokens_range": args.new_tokens_range, "iters": args.iters, "prompt_tokens_mean": round(prompt_tokens, 1),
        "chars_per_token": round(chars_per_token, 2), "eval_prompts": len(eval_prompts),
        "cpu": cpu_name(), "versions": versions(),
    }
    print_table(result, splits)
    print_efficiency(result)
    print(json.dumps(result))
    return result


def print_table(result: dict, splits: dict) -> None:
    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    low_high = result["new_tokens_range"]
    new_tokens = f"{low_high[0]}-{low_high[1] - 1} (one draw a prompt)" if low_high else result["new_tokens"]
    print(f"\n{result['shape']} {result['policy']} policy / {result['reward_shape']} reward ({result['reward_precision']}; the notebook's "
          f"{result['reward_precision_notebook']}), {result['dtype']} on {result['device']} ({result['threads']} threads, "
          f"{result['cpu']}); {result['estimator']}, {result['batch_size']} prompts x {result['samples_per_prompt']}, "
          f"mini-batch {result['mini_batch_size']}, {new_tokens} new tokens, {result['generation']} sampling, "
          f"mean of {result['iters']} iterations (ways in the order {result['order']})")
    kl = "0: no reference pass" if not result["reference_pass"] else (
        f"{result['init_kl_coef']:g}, " + ("adaptive" if result["adap_kl_ctrl"] else "fixed") + ": reference pass run")
    print(f"this module's KL coefficient {kl}")
    print("| way | generate s | reward s | old+ref logprobs, values s | update s | total s/iter | CPU s/iter | peak RSS MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for way, s in splits.items():
        rss = result.get("peak_rss_mb" if way == "ours" else f"peak_rss_mb_{way}")
        print(f"| {way} | {s['generate']:.2f} | {s['reward']:.2f} | {s['logprobs']:.2f} | {s['update']:.2f} "
              f"| {s['total']:.2f} | {s['cpu']:.1f} | {f(rss, '{:.0f}')} |")
    print("\nthe same in CPU seconds of this process (steadier than wall time on a shared host):")
    print("| way | generate | reward | old+ref logprobs, values | update | total |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for way, s in splits.items():
        print(f"| {way} | {s['cpu_generate']:.2f} | {s['cpu_reward']:.2f} | {s['cpu_logprobs']:.2f} "
              f"| {s['cpu_update']:.2f} | {s['cpu']:.2f} |")
    if phases := result.get("rss_phases_mb"):
        names = [n for n in ("setup", "generate", "reward", "logprobs", "update", "other")
                 if any(n in p for p in phases.values())]
        print("\npeak RSS MB reached in each phase (one fresh process per way):")
        print("| way | " + " | ".join(names) + " |")
        print("| --- |" + " ---: |" * len(names))
        for way, p in phases.items():
            print(f"| {way} | " + " | ".join(f(p.get(n), "{:.0f}") for n in names) + " |")
    print(f"speedup vs notebook {f(result['speedup'])}x; ratio to floor {f(result['ratio_to_floor'])}; "
          f"RSS ratio {f(result.get('rss_ratio'))} ({f(result.get('rss_ratio_to_floor'))} of the floor's); evaluation {f(result['eval_prompts_per_s'])} prompts/s vs "
          f"{f(result['eval_prompts_per_s_notebook'])} one at a time ({f(result['eval_speedup'])}x)\n")


def profile_ours(module, batch: dict, args) -> None:
    """torch.profiler over one of this module's iterations (already warm); top operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        run_ours(module, [batch], args)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m detox_lightning.bench", description=DESCRIPTION)
    p.add_argument("--policy", choices=POLICIES, default="seq2seq",
                   help="seq2seq: FLAN-T5-shaped; causal: Llama-shaped of about the same size (CAUSAL_SHAPES)")
    p.add_argument("--shape", choices=list(SHAPES), default="small", help="size of the policy (FLAN-T5 small/base)")
    p.add_argument("--reward-shape", choices=list(REWARD_SHAPES), default="base", help="RoBERTa shape of the reward")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the base weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mini-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1,
                   help="this module only: micro-batches per mini-batch (less memory; the same gradient when "
                        "responses are equally long)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="this module only: recompute activations in the update's backward (less memory)")
    p.add_argument("--new-tokens", type=int, default=64, help="exact length of every response")
    p.add_argument("--new-tokens-range", type=int, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="instead: each prompt's response length drawn from [LOW, HIGH), the same in every way "
                        "(the notebook: 100 400); a batch runs to its longest row"),
    p.add_argument("--reward-batch-size", type=int, default=8,
                   help="texts per classifier forward, this module and the floor (the notebook's pipeline: 16)")
    p.add_argument("--reward-quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="HFClassifierReward(quantize=...) of this module and the floor; the notebook's stays float32")
    p.add_argument("--generation", choices=("plain", "fast"), default="fast",
                   help="fast (the module's default, generation.fast_sampling): this module and the floor sample with "
                        "the LoRA merged and by inverse CDF; plain: torch.multinomial. The notebook's loop as the notebook")
    p.add_argument("--init-kl-coef", type=float, default=RLSettings.init_kl_coef,
                   help="this module's ppo.init_kl_coef; 0 with --fixed-kl skips the reference pass")
    p.add_argument("--fixed-kl", action="store_true", help="this module's ppo.adap_kl_ctrl false (a fixed KL coefficient)")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the square matmuls that measure the peak")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="gae",
                   help="this module's advantage_estimator (the notebook and the floor are PPO)")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="responses per prompt (rloo, grpo: >= 2); the notebook and the floor take each prompt as often")
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-notebook", action="store_true", help="time only this module and the floor")
    p.add_argument("--skip-floor", action="store_true", help="time only this module and the notebook's loop (no ratio to floor)")
    p.add_argument("--skip-memory", action="store_true", help="no peak-RSS subprocesses")
    p.add_argument("--skip-eval", action="store_true", help="no evaluation throughput")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one iteration")
    p.add_argument("--model-dir", default=None, help="where the random models are saved (default: a temp dir)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=[*WAYS, "eval"], default=None,
                   help="only build and run one iteration of this way in this process; print its peak RSS as JSON")
    args = p.parse_args(argv)
    problems = []
    rows = args.batch_size * args.samples_per_prompt
    least = max(ESTIMATORS[args.estimator].min_samples_per_prompt, 1)
    if args.samples_per_prompt < least:
        problems.append(f"--samples-per-prompt={args.samples_per_prompt} must be at least "
                        + ("1" if least == 1 else f"{least} with --estimator={args.estimator}"))
    elif rows % args.mini_batch_size:
        what = f"--batch-size={args.batch_size}" + (f" x --samples-per-prompt={args.samples_per_prompt}"
                                                     if args.samples_per_prompt > 1 else "")
        problems.append(f"{what} is not divisible by --mini-batch-size={args.mini_batch_size}")
    if args.grad_accum < 1 or args.mini_batch_size % args.grad_accum:
        problems.append(f"--mini-batch-size={args.mini_batch_size} is not divisible by --grad-accum={args.grad_accum}")
    if args.new_tokens_range and not 1 <= args.new_tokens_range[0] < args.new_tokens_range[1]:
        problems.append(f"--new-tokens-range={args.new_tokens_range[0]} {args.new_tokens_range[1]} must satisfy 1 <= LOW < HIGH")
    if args.init_kl_coef < 0:
        problems.append(f"--init-kl-coef={args.init_kl_coef} must be at least 0")
    for flag in ("new_tokens", "iters", "eval_prompts", "eval_batch_size", "reward_batch_size", "peak_size"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device={args.device} but no CUDA device is available")
    if args.dtype == "bfloat16" and args.device == "cpu":
        print("note: bfloat16 on CPU is usually slower than float32", file=sys.stderr)
    if problems:
        p.error("; ".join(problems))
    return args


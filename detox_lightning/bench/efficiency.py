"""This module's iteration against the machine's arithmetic limit: a matmul peak, FLOPs per phase, efficiency.

`matmul_peak` measures the best GFLOP/s of square matmuls with the run's threads; `WorkRecorder`
records the token counts of one iteration of this module (`run_ours`) and counts their FLOPs with
`flops.py`; `efficiency` turns counts and phase times into GFLOP/s and fractions of the peak.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from detox_lightning.bench import flops as F

PHASES = ("generate", "reward", "logprobs", "update")


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 3, device: str = "cpu") -> float:
    """Best GFLOP/s of `repeats` (size x size) x (size x size) products in `dtype` (one untimed warm-up).

    Through `F.linear`, the kernel every Linear layer runs (on this project's CPU bf16 `torch.mm`
    took a path several times slower than bf16 `F.linear`).
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.nn.functional.linear(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def _lengths(mask: torch.Tensor) -> list[int]:
    return [int(n) for n in mask.sum(dim=1).tolist()]


class WorkRecorder:
    """Token counts of this module's passes in one iteration, counted as `flops.Work` per phase.

    Installed on the module (instance attributes only, as the clock's wrappers): `sample` records
    the prompts and the responses `generate` produced; the architecture's teacher-forced
    `forward` records each pass's prompt and response masks (the reference / old log-prob pass
    while `make_experience` is the innermost phase, the update's forward and backward while
    `update` is); a forward pre-hook on the classifier records each reward batch.
    """

    def __init__(self, module, clock, recompute: bool = False) -> None:
        self.policy = F.policy_shape(module.policy.pretrained_model.config)
        self.classifier = F.classifier_shape(module.reward.classifier.config)
        self.recompute = recompute
        self.clock = clock
        self.enabled = False  # counts only while this module's iterations run
        self.generate_steps = 0
        self.work: dict[str, F.Work] = {p: F.Work() for p in PHASES}
        self._install(module)

    def reset(self) -> None:
        self.work = {p: F.Work() for p in PHASES}
        self.generate_steps = 0

    def _phase(self) -> str:
        name = self.clock.innermost()
        return {"experience": "logprobs"}.get(name, name)

    def _install(self, module) -> None:
        sample, arch, recorder = module.sample, module.arch, self

        def counted_sample(input_ids, attention_mask, max_new_tokens, *a, **kw):
            samples = sample(input_ids, attention_mask, max_new_tokens, *a, **kw)
            if not recorder.enabled:
                return samples
            steps = samples.response_ids.shape[1]  # generate ran this many steps for every row
            recorder.generate_steps += steps
            recorder.work["generate"] += F.generate(recorder.policy, _lengths(attention_mask), attention_mask.shape[1],
                                                    _lengths(samples.mask), steps)
            return samples

        class Counting(type(arch)):  # the same architecture; its teacher-forced passes are counted
            def forward(self, model, input_ids, attention_mask, response_ids, response_mask):
                if recorder.enabled:
                    recorder.count_pass(attention_mask, response_mask)
                return super().forward(model, input_ids, attention_mask, response_ids, response_mask)

        def counted_reward(_, args, kwargs):
            if recorder.enabled:
                mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
                recorder.work["reward"] += F.classify(recorder.classifier, _lengths(mask), mask.shape[1])

        module.sample = counted_sample
        module.arch = Counting(**{k: getattr(arch, k) for k in ("name", "padding_side", "task_type")})
        module.reward.classifier.register_forward_pre_hook(counted_reward, with_kwargs=True)

    def count_pass(self, attention_mask, response_mask) -> None:
        """One teacher-forced pass: the reference / old log-probs (forward) or the update (forward + backward)."""
        fwd = F.teacher_forced(self.policy, _lengths(attention_mask), attention_mask.shape[1],
                               _lengths(response_mask), response_mask.shape[1])
        phase = self._phase()
        if phase in self.work:
            self.work[phase] += F.update(fwd, self.recompute) if phase == "update" else fwd

    def take(self) -> dict:
        """This iteration's counts as plain numbers (and reset)."""
        out = {p: {"useful": asdict(w.useful), "padded": asdict(w.padded)} for p, w in self.work.items()}
        out["generate_steps"] = self.generate_steps
        self.reset()
        return out


def mean_work(per_iter: list[dict]) -> dict:
    """The mean over the timed iterations (the first, a warm-up, dropped) of `WorkRecorder.take()`'s dicts."""
    timed = per_iter[1:] or per_iter
    out = {p: {kind: {k: sum(it[p][kind][k] for it in timed) / len(timed) for k in ("linear", "attention", "tokens")}
               for kind in ("useful", "padded")} for p in PHASES}
    out["generate_steps"] = sum(it["generate_steps"] for it in timed) / len(timed)
    return out


def efficiency(work: dict, split: dict, peak_gflops: float) -> dict:
    """JSON fields: FLOPs and tokens per phase, GFLOP/s, fraction of the peak, the FLOP-bound time.

    GFLOP/s and the fraction of peak count the arithmetic run (padding included); `flop_bound_s`
    is the iteration's useful FLOPs at the peak, the time no implementation on this machine beats.
    """
    def flops(p, kind):
        return 2.0 * (work[p][kind]["linear"] + work[p][kind]["attention"])

    out = {
        "flops": {p: {"useful": flops(p, "useful"), "padded": flops(p, "padded")} for p in PHASES},
        "tokens": {p: {"useful": work[p]["useful"]["tokens"], "padded": work[p]["padded"]["tokens"]} for p in PHASES},
        "gflops_per_s": {}, "peak_fraction": {}, "peak_gflops_used": peak_gflops,
    }
    for p in PHASES:
        seconds = split.get(p, 0.0)
        rate = flops(p, "padded") / seconds / 1e9 if seconds > 0 and flops(p, "padded") > 0 else None
        out["gflops_per_s"][p] = rate
        out["peak_fraction"][p] = None if rate is None else rate / peak_gflops
    useful = sum(flops(p, "useful") for p in PHASES)
    padded = sum(flops(p, "padded") for p in PHASES)
    out["flop_bound_s"] = useful / peak_gflops / 1e9
    out["flop_bound_s_padded"] = padded / peak_gflops / 1e9
    out["flop_bound_multiple"] = split["total"] / out["flop_bound_s"] if out["flop_bound_s"] > 0 else None
    steps = work["generate_steps"]
    if steps and split.get("generate"):
        # what a step costs beyond its arithmetic at the peak: Python, kernel launches, sampling, cache copies
        out["generate_steps"] = steps
        out["generate_step_ms"] = 1e3 * split["generate"] / steps
        out["generate_step_overhead_ms"] = 1e3 * (split["generate"] - flops("generate", "padded") / peak_gflops / 1e9) / steps
    return out


def print_efficiency(result: dict) -> None:
    """The FLOP table of this module's phases and the summary lines."""
    peak = result["peak_gflops"]
    print(f"\nmatmul peak ({result['peak_size']}^2, {result['threads']} threads): "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items())
          + f"; fractions below are of {result['peak_gflops_used']:.1f} ({result['dtype']})")
    print("| phase (this module) | tokens useful / padded | GFLOP useful / padded | s | GFLOP/s | of peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    split = result["split"]["ours"]
    for p in PHASES:
        tok, fl = result["tokens"][p], result["flops"][p]
        rate, frac = result["gflops_per_s"][p], result["peak_fraction"][p]
        print(f"| {p} | {tok['useful']:.0f} / {tok['padded']:.0f} | {fl['useful'] / 1e9:.2f} / {fl['padded'] / 1e9:.2f} "
              f"| {split[p]:.2f} | {'-' if rate is None else f'{rate:.1f}'} | {'-' if frac is None else f'{frac:.0%}'} |")
    print(f"FLOP-bound time {result['flop_bound_s']:.2f} s (useful FLOPs at the peak; {result['flop_bound_s_padded']:.2f} s "
          f"with padding); measured {result['s_per_iter']:.2f} s = {result['flop_bound_multiple']:.2f}x")
    if "generate_step_ms" in result:
        print(f"generate: {result['generate_steps']:.0f} steps, {result['generate_step_ms']:.1f} ms a step, of which "
              f"{result['generate_step_overhead_ms']:.1f} ms beyond its FLOPs at the peak (per-step overhead)")

"""Check the headline figures of README.md, BENCHMARKS.md and the scenario headers against measurements.

Every claim in ``CLAIMS`` names the file and the sentence it checks. The stated value is parsed from
that sentence (a regex over the file with whitespace collapsed, so line wrapping does not matter); a
sentence that no longer matches is a failure, so the text and this table cannot drift apart silently.
Each claim is then measured, by running the scenario it is about (``raysim.run`` with W&B and the
progress bar off, output in a temporary folder) or by the micro-measurement it describes, and
compared within a tolerance stated per claim. One line per claim:

    name: stated X, measured Y, tolerance T, ok|FAIL|skipped

then ``claims_ok: N/M`` (skipped claims are not counted); the exit code is 1 when any claim fails.

Wall-clock figures depend on the load. Every claim's line is followed by the 1-minute load average
when it was measured, and the run starts and ends with ``/proc/loadavg``. Costs of single-threaded
code (X25519, AES-CTR, Opacus) are measured in thread CPU time (``time.thread_time``), which a busy
machine inflates much less than wall time; the per-call Ray latency and the quickstart's wall time
can only be measured on the wall clock, after a warm-up where the claim is about steady state.

    python scripts/check_claims.py              # every claim but the test-suite time (3-6 minutes on 2 cores)
    python scripts/check_claims.py --suite      # also time `pytest -q` (about 10 more minutes)
    python scripts/check_claims.py --only dp_central_epsilon x25519_agreement_us
    python scripts/check_claims.py --list       # the claims and the values parsed from the text
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # bench_dpsgd's model and data, so both scripts time the same client

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60's local clusters (also passed to the quickstart's process)

QUIET = ["tracking.wandb=disabled", "tracking.progress=false"]
NUMBER = r"(\d[\d,]*(?:\.\d+)?)"


# --- tolerances ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far a measurement may be from the stated value: ``kind`` is rel, abs, at_most, within or exact."""

    kind: str
    amount: float = 0.0
    why: str = ""

    def describe(self, stated: float | tuple[float, float], unit: str) -> str:
        if self.kind == "rel":
            lo, hi = stated * (1 - self.amount), stated * (1 + self.amount)
            return f"±{self.amount:.0%} ({fmt(lo)}–{fmt(hi)} {unit})".rstrip()
        if self.kind == "abs":
            return f"±{fmt(self.amount)} {unit}".rstrip()
        if self.kind == "at_most":
            return f"at most {fmt(stated)} {unit}".rstrip()
        if self.kind == "within":
            lo, hi = stated
            return f"inside {fmt(lo)}–{fmt(hi)} {unit}".rstrip()
        return "exact"

    def accepts(self, stated: float | tuple[float, float], measured: float) -> bool:
        if self.kind == "rel":
            return abs(measured - stated) <= self.amount * abs(stated) + 1e-12
        if self.kind == "abs":
            return abs(measured - stated) <= self.amount + 1e-12
        if self.kind == "at_most":
            return measured <= stated
        if self.kind == "within":
            return stated[0] <= measured <= stated[1]
        return measured == stated


def rel(fraction: float, why: str) -> Tolerance:
    return Tolerance("rel", fraction, why)


def absolute(amount: float, why: str) -> Tolerance:
    return Tolerance("abs", amount, why)


def fmt(value: float) -> str:
    if isinstance(value, tuple):
        return "–".join(fmt(v) for v in value)
    if value == int(value) and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


# --- the claims ---------------------------------------------------------------------------------------


@dataclass
class Claim:
    """One figure: where it is stated, how to parse it, what measures it and how close it must be."""

    name: str
    source: str                     # file, relative to the repository root
    pattern: str                    # regex over the file's text with whitespace collapsed to one space
    value: Callable[[re.Match], float | tuple[float, float]]
    measure: str                    # key into MEASUREMENTS
    read: Callable[[dict[str, Any], re.Match], float]
    unit: str
    tolerance: Tolerance
    condition: Callable[[dict[str, Any], re.Match], str | None] = lambda m, g: None  # mismatch of the claim's setup
    optional: str | None = None     # the flag that turns the claim on; skipped without it
    match: re.Match | None = field(default=None, repr=False)


def num(text: str) -> float:
    return float(text.replace(",", ""))


def group(name: str, scale: float = 1.0) -> Callable[[re.Match], float]:
    return lambda m: num(m[name]) * scale


def differs(label: str, stated: float, actual: float) -> str | None:
    return None if abs(stated - actual) <= 1e-9 * max(1.0, abs(actual)) else f"{label}: the text says {fmt(stated)}, the run used {fmt(actual)}"


def first_of(*checks: str | None) -> str | None:
    return next((c for c in checks if c), None)


CLAIMS: list[Claim] = [
    Claim(
        "quickstart_wall_s", "README.md",
        r"run the quickstart \(FedAvg, [\d,]+ non-IID clients, on the embedded local Ray; about (?P<v>\d+(?:\.\d+)?) s "
        r"on (?P<cores>\d+) idle cores, Ray start included; [^)]*\)",
        group("v"), "quickstart", lambda m, g: m["process_seconds"], "s",
        rel(1 / 3, "'about': a third either way; wall time of the whole `raysim run` process, the faster of 2 runs"),
        condition=lambda m, g: None if m["cores"] == int(g["cores"]) else f"measured on {m['cores']} cores, the text is about {g['cores']}",
    ),
    Claim(
        "quickstart_yaml_wall_s", "scenarios/quickstart.yaml",
        r"Under (?P<v>a|\d+) minutes? on (?P<cores>\d+) cores",
        lambda m: 60.0 * (1 if m["v"] == "a" else num(m["v"])), "quickstart", lambda m, g: m["process_seconds"], "s",
        Tolerance("at_most", why="'under': an upper bound"),
        condition=lambda m, g: None if m["cores"] == int(g["cores"]) else f"measured on {m['cores']} cores, the text is about {g['cores']}",
    ),
    Claim(
        "quickstart_accuracy_pct", "README.md",
        r"`quickstart\.yaml` \| FedAvg on [\d,]+ Dirichlet\(0\.5\) clients; ~(?P<v>\d+)% accuracy in (?P<rounds>\d+) rounds",
        group("v"), "quickstart", lambda m, g: 100 * m["accuracy"], "%",
        absolute(0.5, "the stated precision (a whole percent); the run is deterministic"),
        condition=lambda m, g: differs("rounds", num(g["rounds"]), m["rounds"]),
    ),
    Claim(
        "dp_central_epsilon", "README.md",
        r"`dp_central\.yaml` \(clip (?P<clip>[\d.]+), z = (?P<z>[\d.]+), Poisson q = (?P<q>[\d.]+); "
        r"ε ≈ (?P<v>[\d.]+) after (?P<rounds>\d+) rounds\)",
        group("v"), "dp_central", lambda m, g: m["epsilon"], "",
        absolute(0.05, "the stated precision (one decimal); ε is deterministic given z, q, rounds and δ"),
        condition=lambda m, g: first_of(
            differs("clip", num(g["clip"]), m["clip_norm"]), differs("z", num(g["z"]), m["noise_multiplier"]),
            differs("q", num(g["q"]), m["sample_rate"]), differs("rounds", num(g["rounds"]), m["rounds"])),
    ),
    Claim(
        "dp_central_yaml_epsilon", "scenarios/dp_central.yaml",
        r"`epsilon` at delta = (?P<delta>[\d.e-]+) \(about (?P<v>[\d.]+) after (?P<rounds>\d+) rounds\)",
        group("v"), "dp_central", lambda m, g: m["epsilon"], "",
        absolute(0.05, "the stated precision (one decimal)"),
        condition=lambda m, g: first_of(differs("delta", float(g["delta"]), m["delta"]),
                                        differs("rounds", num(g["rounds"]), m["rounds"])),
    ),
    Claim(
        "lora_perplexity_first", "README.md",
        r"`llm_lora_cpu\.yaml` \(tiny LM on \d+ Shakespeare speakers, perplexity (?P<first>\d+(?:\.\d+)?) at the first "
        r"evaluation \(round (?P<at>\d+)\) → (?P<final>\d+(?:\.\d+)?) in (?P<rounds>\d+) rounds on 2 CPUs\)",
        group("first"), "lora", lambda m, g: m["perplexity"][int(g["at"])], "",
        absolute(0.5, "the stated precision (a whole number); the run is deterministic"),
        condition=lambda m, g: None if int(g["at"]) in m["perplexity"] else f"no evaluation after round {g['at']}",
    ),
    Claim(
        "lora_perplexity_final", "README.md",
        r"`llm_lora_cpu\.yaml` \(tiny LM on \d+ Shakespeare speakers, perplexity (?P<first>\d+(?:\.\d+)?) at the first "
        r"evaluation \(round (?P<at>\d+)\) → (?P<final>\d+(?:\.\d+)?) in (?P<rounds>\d+) rounds on 2 CPUs\)",
        group("final"), "lora", lambda m, g: m["perplexity"][m["rounds"]], "",
        absolute(0.5, "the stated precision (a whole number); the run is deterministic"),
        condition=lambda m, g: differs("rounds", num(g["rounds"]), m["rounds"]),
    ),
    Claim(
        "lora_trainable_parameters", "BENCHMARKS.md",
        r"LoRA r = 4 on every linear layer plus the LM head: (?P<v>[\d,]+) trainable parameters, (?P<kb>\d+) KB per client",
        group("v"), "lora", lambda m, g: m["trainable_parameters"], "", Tolerance("exact"),
    ),
    Claim(
        "lora_adapter_kb", "BENCHMARKS.md",
        r"LoRA r = 4 on every linear layer plus the LM head: (?P<v>[\d,]+) trainable parameters, (?P<kb>\d+) KB per client",
        group("kb"), "lora", lambda m, g: m["adapter_bytes"] / 1000, "KB", absolute(0.5, "the stated precision (1 KB = 1,000 B)"),
    ),
    Claim(
        "lora_yaml_trainable_parameters", "scenarios/llm_lora_cpu.yaml",
        r"travel \((?P<v>[\d,]+) float32 = (?P<kb>\d+) KB, (?P<kib>\d+) KiB, per client\)",
        group("v"), "lora", lambda m, g: m["trainable_parameters"], "", Tolerance("exact"),
    ),
    *[
        Claim(
            f"opacus_{mode}_ratio", "BENCHMARKS.md",
            r"a bare Opacus loop with setup and batching outside the timing is still (?P<hooks>[\d.]+)× "
            r"\(Opacus's \"ew\" mode (?P<ew>[\d.]+)×, \"ghost\" (?P<ghost>[\d.]+)×, \"functorch\" (?P<functorch>[\d.]+)×\)",
            group(mode), "opacus", (lambda mode: lambda m, g: m["ratio"][mode])(mode), "×",
            rel(0.25, "a ratio of CPU-time medians on a shared machine; bench_dpsgd's own ratio spread 4.8–8.6"),
        )
        for mode in ("hooks", "ew", "ghost", "functorch")
    ],
    Claim(
        "opacus_setup_ms", "BENCHMARKS.md",
        r"Opacus setup and hook removal cost about (?P<v>[\d.]+) ms per client",
        group("v"), "opacus", lambda m, g: m["setup_ms"], "ms", rel(0.5, "'about', for a sub-millisecond CPU cost"),
    ),
    Claim(
        "x25519_agreement_us", "BENCHMARKS.md",
        r"X25519 agreements \((?P<lo>\d+)–(?P<hi>\d+) µs each",
        lambda m: (num(m["lo"]), num(m["hi"])), "crypto", lambda m, g: m["x25519_us"], "µs",
        Tolerance("within", why="the stated range; CPU time of one agreement (X25519PublicKey.from_public_bytes + exchange)"),
    ),
    Claim(
        "aes_ctr_mask_us", "BENCHMARKS.md",
        r"AES-CTR mask expansion \(about (?P<v>\d+) µs per (?P<k>\d+)k-word mask\)",
        group("v"), "crypto", lambda m, g: m["expand_us"][int(g["k"]) * 1000], "µs",
        rel(1 / 3, "'about': a third either way; CPU time of MaskExpander.expand for 32-bit words"),
    ),
    Claim(
        "ray_call_ms", "BENCHMARKS.md",
        r"one Ray call per (?P<clients>\d+) clients \(about (?P<v>[\d.]+) ms each[,)]",
        group("v"), "ray_call", lambda m, g: m["call_ms"], "ms",
        rel(0.5, "'about': half either way; wall-clock median of a no-op actor call, after 200 warm-up calls"),
        condition=lambda m, g: differs("clients per call (executor.clients_per_call default)", num(g["clients"]), m["clients_per_call"]),
    ),
    Claim(
        "suite_minutes", "README.md",
        r"run the whole test suite \(under (?P<v>\d+) minutes on (?P<cores>\d+) cores\)",
        group("v"), "suite", lambda m, g: m["minutes"], "min", Tolerance("at_most", why="'under': an upper bound"),
        condition=lambda m, g: first_of(
            None if m["returncode"] == 0 else f"pytest exited with {m['returncode']}",
            None if m["cores"] == int(g["cores"]) else f"measured on {m['cores']} cores, the text is about {g['cores']}"),
        optional="--suite",
    ),
]


# --- measurements -------------------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


QUICKSTART_RUNS = 2


def measure_quickstart(out: Path) -> dict[str, Any]:
    """The README's first command, as a user runs it: a fresh `raysim run` process (imports and Ray start included).

    It runs ``QUICKSTART_RUNS`` times, one after the other, and the fastest counts: other work on a shared
    machine only ever adds time, and one burst of it should not decide the claim. Every run is printed.
    """
    import json

    runs = []
    for attempt in range(QUICKSTART_RUNS):
        folder = out / f"run-{attempt}"
        command = [sys.executable, "-m", "raysim.cli", "run", str(ROOT / "scenarios/quickstart.yaml"),
                   *(f"--set={o}" for o in [*QUIET, f"output.dir={folder}"])]
        load = loadavg().split()[0]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"raysim run exited with {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        summary = json.loads((folder / "quickstart" / "summary.json").read_text())
        runs.append((seconds, summary, load))
    seconds, summary, _ = min(runs, key=lambda run: run[0])
    if len({run[1]["final"]["accuracy"] for run in runs}) != 1:
        raise RuntimeError(f"the quickstart's accuracy differs between runs: {[run[1]['final']['accuracy'] for run in runs]}")
    return {"process_seconds": seconds, "accuracy": summary["final"]["accuracy"], "rounds": summary["rounds"], "cores": cores(),
            "detail": "`raysim run scenarios/quickstart.yaml --set tracking.wandb=disabled --set tracking.progress=false`, "
                      f"fastest of {len(runs)}: " + "; ".join(
                          f"{s:.1f} s for the process ({run['wall_seconds']:.1f} s inside raysim.run) at 1-min load {load}"
                          for s, run, load in runs)}


def measure_dp_central(out: Path) -> dict[str, Any]:
    import raysim

    result = raysim.run(ROOT / "scenarios/dp_central.yaml", overrides=[*QUIET, f"output.dir={out}"])
    privacy = result.summary["privacy"]
    return {**{k: privacy[k] for k in ("epsilon", "clip_norm", "noise_multiplier", "sample_rate", "rounds", "delta")},
            "detail": f"scenarios/dp_central.yaml, {privacy['rounds']} rounds, accountant {privacy['accountant']}: "
                      f"ε = {privacy['epsilon']:.4f} at δ = {privacy['delta']:g}, final accuracy {result.final_accuracy:.4f}"}


def measure_lora(out: Path) -> dict[str, Any]:
    import raysim

    started = time.perf_counter()
    result = raysim.run(ROOT / "scenarios/llm_lora_cpu.yaml", overrides=[*QUIET, f"output.dir={out}"])
    seconds = time.perf_counter() - started
    perplexity = {m["round"]: m["perplexity"] for m in result.history if m.get("perplexity") is not None}
    final = result.summary["final"]
    return {"perplexity": perplexity, "rounds": result.summary["rounds"],
            "trainable_parameters": final["trainable_parameters"], "adapter_bytes": final["adapter_bytes"],
            "detail": f"scenarios/llm_lora_cpu.yaml on {result.summary['workers']} workers in {seconds:.0f} s: perplexity by round "
                      + ", ".join(f"{r}: {p:.2f}" for r, p in perplexity.items())}


def measure_opacus(out: Path, repeats: int = 30) -> dict[str, Any]:
    """bench_dpsgd's client (500 examples, 9,610-parameter MLP, batch 32, 16 steps, 1 thread), DP-SGD without setup.

    The baseline is bench_dpsgd's plain side (the engine's ``train_client``). Each Opacus mode gets a model wrapped
    once by ``PrivacyEngine.make_private`` (noise 1, clip 1, Poisson sampling so the optimizer is the same as in
    ``train_dp_sgd``); the timed loop runs the same 16 precomputed batches of 32 through zero_grad, forward,
    backward and the private optimizer's step (per-sample gradients, clipping, noise, accountant hook).
    """
    import numpy as np
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    import bench_dpsgd as bench
    from raysim.client.train import make_optimizer, train_client
    from raysim.config import TrainingConfig

    warnings.filterwarnings("ignore", message=".*(Secure RNG|Full backward hook|functorch|ExpandedWeights|expanded weights).*")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((bench.EXAMPLES, bench.FEATURES)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, bench.CLASSES, bench.EXAMPLES))
    torch.manual_seed(0)
    plain_model, plain_flat = bench.make_model()
    global_vec = plain_flat.vector.detach().clone()
    optimizer = make_optimizer(TrainingConfig(lr=bench.LR, batch_size=bench.BATCH), plain_flat.params)

    def plain(seed: int) -> None:
        plain_flat.load(global_vec)
        train_client(plain_model, plain_flat, optimizer, x, y, epochs=1, batch_size=bench.BATCH, rng=np.random.default_rng(seed))

    order = torch.from_numpy(np.random.default_rng(0).permutation(bench.EXAMPLES))
    batches = [(x[order[s:s + bench.BATCH]], y[order[s:s + bench.BATCH]]) for s in range(0, bench.EXAMPLES, bench.BATCH)]

    def private(mode: str) -> Callable[[int], None]:
        torch.manual_seed(0)
        model, _ = bench.make_model()
        loader = DataLoader(TensorDataset(x, y), batch_size=bench.BATCH)
        criterion = torch.nn.CrossEntropyLoss()
        made = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=bench.LR), data_loader=loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=mode, criterion=criterion,
            noise_generator=torch.Generator().manual_seed(0))
        wrapped, private_optimizer = made[0], made[1]
        loss_fn = made[2] if mode == "ghost" else criterion

        def run(seed: int) -> None:
            for xb, yb in batches:
                private_optimizer.zero_grad(set_to_none=True)
                loss_fn(wrapped(xb), yb).backward()
                private_optimizer.step()
        return run

    setup_model, _ = bench.make_model()
    setup_loader = DataLoader(TensorDataset(x, y), batch_size=bench.BATCH)

    def setup(seed: int) -> None:  # what train_dp_sgd pays per client around the loop
        made = PrivacyEngine().make_private(
            module=setup_model, optimizer=torch.optim.SGD(setup_model.parameters(), lr=bench.LR), data_loader=setup_loader,
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True, noise_generator=torch.Generator().manual_seed(seed))
        made[0].cleanup()

    modes = ("hooks", "ew", "ghost", "functorch")
    medians = bench.median_seconds({"plain": plain, **{mode: private(mode) for mode in modes}, "setup": setup}, repeats,
                                   clock=time.thread_time)  # CPU time: less distorted by other load
    ratio = {mode: medians[mode] / medians["plain"] for mode in modes}
    return {"ratio": ratio, "setup_ms": medians["setup"] * 1e3,
            "detail": f"CPU-time medians of {repeats} interleaved repeats: plain train_client {medians['plain'] * 1e3:.2f} ms, "
                      + ", ".join(f"{mode} {medians[mode] * 1e3:.2f} ms" for mode in modes)
                      + f"; PrivacyEngine + make_private + cleanup {medians['setup'] * 1e3:.2f} ms"}


def per_call(fn: Callable[[], object], calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` batches of thread CPU seconds per call, after one warm-up batch."""
    for _ in range(calls):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        samples.append((time.thread_time() - start) / calls)
    return statistics.median(samples)


def measure_crypto(out: Path) -> dict[str, Any]:
    """The two costs of a secure round that BENCHMARKS.md names, timed on raysim's own primitives."""
    import numpy as np

    from raysim.privacy.secagg import crypto

    private, peer = crypto.new_agreement_key(), crypto.public_bytes(crypto.new_agreement_key())
    context = crypto.session_context(b"check-claims", 0)
    x25519 = per_call(lambda: crypto._agree(private, peer), 2000)
    seed_cost = per_call(lambda: crypto.mask_seed(private, peer, context), 2000)
    expand, add = {}, {}
    for words in (100_000,):
        expander, accumulator, seed = crypto.MaskExpander(words, np.uint32), np.zeros(words, np.uint32), os.urandom(32)
        expand[words] = per_call(lambda: expander.expand(seed), 300) * 1e6
        add[words] = per_call(lambda: expander.add(accumulator, seed), 300) * 1e6
    return {"x25519_us": x25519 * 1e6, "expand_us": expand,
            "detail": f"thread CPU time: X25519 agreement {x25519 * 1e6:.1f} µs (with HKDF, as mask_seed: {seed_cost * 1e6:.1f} µs); "
                      f"100k-word uint32 mask: expand {expand[100_000]:.1f} µs, expand + add into the sum {add[100_000]:.1f} µs"}


def measure_ray_call(out: Path, calls: int = 2000) -> dict[str, Any]:
    """Round trip of a no-op actor method call (driver → actor → driver), one at a time, on the local Ray."""
    import ray

    from raysim.config import ExecutorConfig

    @ray.remote(num_cpus=0)
    class Echo:
        def call(self, payload: object = None) -> None:
            return None

    actor = Echo.remote()
    for _ in range(200):
        ray.get(actor.call.remote(b"x"))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(actor.call.remote(b"x"))
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    ray.get([actor.call.remote(b"x") for _ in range(calls)])
    pipelined = (time.perf_counter() - start) / calls
    ray.kill(actor)
    times.sort()
    median = statistics.median(times)
    return {"call_ms": median * 1e3, "clients_per_call": ExecutorConfig().clients_per_call,
            "detail": f"{calls} sequential calls after 200 warm-up: median {median * 1e3:.3f} ms, "
                      f"10th–90th percentile {times[calls // 10] * 1e3:.3f}–{times[9 * calls // 10] * 1e3:.3f} ms; "
                      f"{calls} submitted at once: {pipelined * 1e3:.3f} ms each"}


def measure_suite(out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=ROOT, capture_output=True, text=True)
    minutes = (time.perf_counter() - started) / 60
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    return {"minutes": minutes, "cores": cores(), "returncode": done.returncode, "detail": f"`pytest -q` exit {done.returncode} in {minutes:.2f} min: {tail}"}


MEASUREMENTS: dict[str, Callable[[Path], dict[str, Any]]] = {  # in this order; the wall-clock quickstart first, on a quiet Ray
    "quickstart": measure_quickstart, "crypto": measure_crypto, "opacus": measure_opacus, "ray_call": measure_ray_call,
    "dp_central": measure_dp_central, "lora": measure_lora, "suite": measure_suite,
}
NEEDS_RAY = {"ray_call", "dp_central", "lora"}  # share one local Ray; the quickstart starts its own, as a user's would


# --- driver -------------------------------------------------------------------------------------------


def parse(claim: Claim, texts: dict[str, str]) -> str | None:
    """Find the claim's sentence; None when found, else why not."""
    if claim.source not in texts:
        path = ROOT / claim.source
        texts[claim.source] = re.sub(r"\s+", " ", path.read_text(encoding="utf-8")) if path.exists() else ""
    found = list(re.finditer(claim.pattern, texts[claim.source]))
    if len(found) != 1:
        return f"{'no' if not found else len(found)} sentence{'s' if found else ''} in {claim.source} matching /{claim.pattern}/"
    claim.match = found[0]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="store_true", help="also time `pytest -q` (about 10 minutes)")
    parser.add_argument("--only", nargs="*", metavar="CLAIM", help="check only these claims")
    parser.add_argument("--list", action="store_true", help="print the claims and their parsed values, measure nothing")
    args = parser.parse_args()
    names = [c.name for c in CLAIMS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown claims {unknown}; choose from {names}")
    claims = [c for c in CLAIMS if not args.only or c.name in args.only]

    texts: dict[str, str] = {}
    missing = {c.name: parse(c, texts) for c in claims}
    if args.list:
        for c in claims:
            stated = "NOT FOUND" if missing[c.name] else fmt(c.value(c.match))
            print(f"{c.name}: {c.source}: stated {stated} {c.unit}, tolerance {c.tolerance.kind} ({c.tolerance.why})")
        return 0

    print(f"check_claims: {cores()} cores, load average {loadavg()} at start")
    wanted = {c.measure for c in claims if not missing[c.name] and (c.optional is None or (c.optional == "--suite" and args.suite))}
    results: dict[str, dict[str, Any]] = {}
    loads: dict[str, str] = {}
    ray_started = False
    with tempfile.TemporaryDirectory(prefix="check-claims-") as tmp:
        for key, measure in MEASUREMENTS.items():
            if key not in wanted:
                continue
            if key in NEEDS_RAY and not ray_started:
                import logging

                import ray
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
                ray_started = True
            if key not in NEEDS_RAY and ray_started:
                import ray
                ray.shutdown()
                ray_started = False
            out = Path(tmp) / key
            out.mkdir()
            before = loadavg().split()[0]
            try:
                results[key] = measure(out)
            except Exception as err:  # a measurement that breaks fails its claims, the others still run
                results[key] = {"error": f"{type(err).__name__}: {err}"}
            loads[key] = f"{before}→{loadavg().split()[0]}"
            print(f"  # {key}: {results[key].get('detail') or results[key].get('error')} [1-min load {loads[key]}]", flush=True)
        if ray_started:
            import ray
            ray.shutdown()

    passed = counted = 0
    for c in claims:
        if missing[c.name]:
            counted += 1
            print(f"{c.name}: stated ?, measured -, tolerance -, FAIL ({missing[c.name]})")
            continue
        stated = c.value(c.match)
        if c.measure not in wanted:
            print(f"{c.name}: stated {fmt(stated)} {c.unit}, measured -, tolerance {c.tolerance.describe(stated, c.unit)}, "
                  f"skipped (run with {c.optional})".replace(" ,", ","))
            continue
        counted += 1
        result = results[c.measure]
        if "error" in result:
            print(f"{c.name}: stated {fmt(stated)} {c.unit}, measured -, tolerance -, FAIL ({result['error']})")
            continue
        measured = c.read(result, c.match)
        mismatch = c.condition(result, c.match)
        ok = c.tolerance.accepts(stated, measured) and mismatch is None
        passed += ok
        note = f" ({mismatch})" if mismatch else ""
        print(f"{c.name}: stated {fmt(stated)} {c.unit}, measured {fmt(round(measured, 3))} {c.unit}, "
              f"tolerance {c.tolerance.describe(stated, c.unit)}, {'ok' if ok else 'FAIL'}{note} "
              f"[{c.source}; load {loads[c.measure]}]".replace(" ,", ","))
    print(f"check_claims: load average {loadavg()} at end")
    print(f"claims_ok: {passed}/{counted}")
    return 0 if passed == counted else 1


if __name__ == "__main__":
    sys.exit(main())

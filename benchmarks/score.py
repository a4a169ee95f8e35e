#!/usr/bin/env python
"""Scoring speed, exactness and peak memory of every way this project scores image x caption pairs.

    python benchmarks/score.py                      # --size both: full (d = 1024) then small (d = 256)
    python benchmarks/score.py --size full --n-img 32 --n-cap 40 --json results.json
    python benchmarks/score.py --size full --n-img 1000 --n-cap 5000 \
        --scorers loop,loop-cuda,fast-cuda,onnx-cuda --slice loop=200x5 --slice loop-cuda=100

Scorers (each gets the same precomputed region / word embeddings, and is timed on scoring them):
    loop        benchmarks/original_loop.per_caption_similarity: the original evaluation, one
                caption at a time against every image of the shard (the speed baseline)
    plain       IMRAM.similarity (imram_min/model.py), batched
    fast        imram_min.schedule.similarity
    onnx-cpu    the model exported with matcher="fast" (export.export_model) to a temporary
                folder, scored by runtime.Scorer.score_embeddings on ONNX Runtime (CPU), as
                python -m runtime.score does after encoding: captions sorted by length into shards,
                images in groups, each projected once by the projection graphs, matcher calls of
                Scorer's shard size
    loop-cuda, plain-cuda, fast-cuda   the same on CUDA (where torch sees a GPU)
    onnx-cuda   matcher.onnx on ORT's CUDAExecutionProvider (where onnxruntime offers it)

Each scorer runs in its own process (``--only NAME`` + the same flags prints one JSON line), so
its peak memory is its own: peak RSS on the CPU (VmHWM of /proc/self/status; getrusage's
ru_maxrss is not used: on Linux it keeps the RSS a process had before exec, i.e. the parent's),
torch.cuda.max_memory_allocated for torch on CUDA, and for onnx-cuda the GPU memory ONNX Runtime
holds after the run (its arena keeps what it grew to). "+run": over the memory just before the
timed run (inputs, model and libraries loaded).

The loops may score only a slice of the shard (``--slice NAME=[IMGSx]CAPS``: the first IMGS
images, by default all, x the first CAPS captions); their pairs/s is then extrapolated to the
shard and the table says so. --budget-seconds lets the ONNX scorers stop early the same way.
Exactness: every scorer's output is compared with the loop's (``loop``, else ``loop-cuda``) on
the slice they share; float32, PASS when max |diff| <= --tol (1e-5). Exit status 1 when a
scorer FAILs the check or breaks; OOM and TIMEOUT are reported, not failures.

FLOPs are analytic, per image x caption pair, multiply-adds counted as 2 and averaged over the
captions scored (their true lengths: no padding). Original form, per direction and step: raw
scores 2 n_c n_q d, attended context 2 n_q n_c d, MDU 2 layers of 2 n_q (2d) d, K updates
(the last included, as the original). Fast form: the step-1 raw scores 2 R L d shared by both
directions; per direction the later raw scores 2 n_c n_q d (K-1 times), attention-Gram norms
2 n_q n_c^2 + 2 n_q n_c per step, a @ context_proj 2 n_q n_c 2d for each of K-1 updates and
W_q q 2 n_q d 2d for each of K-2 updates (per-item projections are amortised over the shard and
not counted). "ideal" is the FLOP ratio original / fast; each scorer's GFLOP/s counts the
FLOPs of its own form (plain: the original form less the unused last update).

Inputs are synthetic: random model weights (IMRAMConfig defaults but for the chosen d, mode
and K; torch.manual_seed(--seed)), l2-normalised Gaussian embeddings with a shared component
(mean pairwise cosine ~0.2 rather than 0, so the clipped attention has positive scores to work on), caption lengths uniform in
--min-len..--max-len, word embeddings zero past each length (as the text encoder gives).
Timings are the best of --repeat runs after a warm-up call. On a machine whose speed drifts
(shared, turbo, thermal), --rounds N runs the scorers N times in turn, so that every scorer meets
the same phases of the machine: each is reported at its best over all rounds, and the ratios to
the loop within each round are printed too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Sizes. full: the paper's setting; small: d = 256. n_img x n_cap is the shard scored; on 2 CPU
# cores each scorer takes ~10-30 s at full size. loop_pairs bounds the pairs the CPU loop scores
# by default (a larger shard gets a slice of it, extrapolated).
SIZES = {
    "full": {"embed_size": 1024, "n_img": 32, "n_cap": 40, "loop_pairs": 32 * 40},
    "small": {"embed_size": 256, "n_img": 48, "n_cap": 64, "loop_pairs": 48 * 64},
}
LOOP_CUDA_PAIRS = 100_000  # default slice of loop-cuda (e.g. 1000 images x 100 captions)
CPU_SCORERS = ("loop", "plain", "fast", "onnx-cpu")
CUDA_SCORERS = ("loop-cuda", "plain-cuda", "fast-cuda", "onnx-cuda")
ALL_SCORERS = CPU_SCORERS + CUDA_SCORERS
LOOPS = ("loop", "loop-cuda")
FORMS = {"loop": "original", "plain": "plain", "fast": "fast", "onnx": "fast"}
SHARED = 0.5  # weight of the component shared by all embeddings (mean pairwise cosine ~ SHARED^2 / (1 + SHARED^2))
TOL = 1e-5
CUDA = "CUDAExecutionProvider"


# --------------------------------------------------------------------------- small helpers (no torch)
def stub_nltk() -> None:
    """runtime.text imports nltk's word_tokenize at import; the benchmarks never tokenise. Unless
    nltk is already loaded, put a stub in its place that fails only if called: importing the real
    nltk costs ~2 s per process, and a bare GPU machine may not have it at all."""
    if "nltk" in sys.modules:
        return

    def word_tokenize(*_args, **_kwargs):
        raise RuntimeError("benchmarks/score.py stubbed nltk out: tokenisation is unavailable in this process")
    nltk, tokenize = types.ModuleType("nltk"), types.ModuleType("nltk.tokenize")
    tokenize.word_tokenize, nltk.tokenize = word_tokenize, tokenize
    sys.modules["nltk"], sys.modules["nltk.tokenize"] = nltk, tokenize


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MB: VmHWM of /proc/self/status. Not getrusage's
    ru_maxrss, which on Linux also holds the RSS the process had before exec, i.e. that of the parent
    that spawned it (the benchmark parent, with torch loaded); ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def limit_address_space(gb: float | None) -> None:
    """Cap this process's address space (CPU runs only: CUDA maps far more than it uses), so that a
    scorer that would need more memory than the machine has fails with an allocation error (reported
    as OOM) instead of pushing a shared machine into swap or its OOM killer."""
    if gb and gb > 0:
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or any(s in text for s in (
        "out of memory", "outofmemory", "can't allocate memory", "cannot allocate memory", "not enough memory",
        "failed to allocate memory", "bad_alloc"))


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "mem_available_gb": round(mem_available_gb(), 1), "python": sys.version.split()[0]}
    return info


def busy_warning(info: dict) -> str | None:
    """A line to print when other work loads the machine (multi-threaded timings suffer most)."""
    if info["cpus"] and info["load_avg"][0] > 0.5 * info["cpus"]:
        return (f"warning: load average {info['load_avg'][0]} on {info['cpus']} CPUs: other work is running, timings "
                f"will be noisy (multi-threaded ones most: --threads 1 is steadier)")
    return None


def parse_slices(items: list[str]) -> dict:
    """["loop=200x5", "loop-cuda=100"] -> {"loop": (5, 200), "loop-cuda": (100, None)}: (captions, images);
    NAME=IMGSxCAPS (images x captions, as the table shows them) or NAME=CAPS (every image)."""
    out = {}
    for item in items or []:
        name, _, spec = item.partition("=")
        if name not in ALL_SCORERS or not spec:
            raise SystemExit(f"--slice {item!r}: expected NAME=CAPS or NAME=IMGSxCAPS, NAME one of {ALL_SCORERS}")
        imgs, _, caps = spec.rpartition("x")
        try:
            out[name] = (int(caps), int(imgs) if imgs else None)
        except ValueError:
            raise SystemExit(f"--slice {item!r}: IMGS and CAPS must be integers") from None
        if out[name][0] < 1 or (out[name][1] or 1) < 1:
            raise SystemExit(f"--slice {item!r}: IMGS and CAPS must be >= 1")
    return out


def flops_per_pair(form: str, n_region: int, n_word: float, d: int, k: int, mode: str) -> float:
    """Analytic FLOPs of one image x caption pair (see the module docstring). n_word: the caption's length."""
    r, w = n_region, n_word
    dirs = ([(w, r)] if mode in ("full", "text") else []) + ([(r, w)] if mode in ("full", "image") else [])
    total = 0.0
    if form in ("original", "plain"):
        updates = k if form == "original" else k - 1
        for nq, nc in dirs:
            total += k * (2 * nc * nq * d + 2 * nq * nc * d) + updates * 2 * (2 * nq * (2 * d) * d)
        return total
    total = 2 * r * w * d  # step-1 raw scores, shared by both directions
    for nq, nc in dirs:
        total += (k - 1) * 2 * nc * nq * d  # raw scores of the later steps
        total += k * (2 * nq * nc * nc + 2 * nq * nc)  # |attended|^2 = a G a^T and <q, attended> per step
        total += (k - 1) * 2 * nq * nc * (2 * d)  # a @ context_proj, each update
        total += max(k - 2, 0) * 2 * nq * d * (2 * d)  # W_q q, each update after the first
    return total


def mean_flops(form: str, lengths: np.ndarray, cfg: dict) -> float:
    return float(np.mean([flops_per_pair(form, cfg["n_region"], int(n), cfg["embed_size"], cfg["n_steps"],
                                         cfg["mode"]) for n in lengths]))


def form_of(name: str) -> str:
    return FORMS[name.split("-")[0]]


# --------------------------------------------------------------------------- configuration
def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model and input shape flags this benchmark and train_step.py share."""
    p.add_argument("--mode", choices=["full", "text", "image"], default="full", help="(full)")
    p.add_argument("--steps", type=int, default=3, help="matching steps K (3)")
    p.add_argument("--n-region", type=int, default=36, help="regions per image (36)")
    p.add_argument("--min-len", type=int, default=8, help="shortest caption, words (8)")
    p.add_argument("--max-len", type=int, default=16, help="longest caption, words (16)")
    p.add_argument("--img-dim", type=int, default=2048, help="region feature size of the model (2048)")
    p.add_argument("--word-dim", type=int, default=300, help="word embedding size of the model (300)")
    p.add_argument("--vocab-size", type=int, default=10000, help="vocabulary of the model (10000)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="IMRAM scoring benchmark: pairs/s, exactness, peak memory.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    p.add_argument("--size", choices=["full", "small", "both"], default="both", help="(both)")
    p.add_argument("--n-img", type=int, help="images in the shard (full 32, small 48)")
    p.add_argument("--n-cap", type=int, help="captions in the shard (full 40, small 64)")
    p.add_argument("--embed-size", type=int, help="d (full 1024, small 256)")
    add_shape_args(p)
    p.add_argument("--scorers", help=f"comma-separated, of {','.join(ALL_SCORERS)} (default: the CPU ones, and the "
                                     "CUDA ones where torch / onnxruntime offer CUDA)")
    p.add_argument("--slice", action="append", default=[], metavar="NAME=[IMGSx]CAPS",
                   help="score only the first IMGS images (default all) x the first CAPS captions with NAME, pairs/s "
                        "extrapolated; default for loop: at most the size's default shard in pairs, "
                        f"loop-cuda: at most {LOOP_CUDA_PAIRS} pairs")
    p.add_argument("--threads", type=int, help="torch / ONNX Runtime intra-op threads (default: theirs)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per scorer process, the best is reported (1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every scorer this many times in turn (loop, plain, fast, ..., loop, plain, ...), each "
                        "time a new process; a scorer's best time over all rounds is reported, and the ratios of "
                        "each round (1)")
    p.add_argument("--max-elems", type=int, help=f"schedule.similarity max_elems (CPU: its default, as evaluation; "
                                                 "CUDA: schedule.CUDA_MAX_ELEMS, as evaluation)")
    p.add_argument("--max-pairs", type=int, default=4096, help="IMRAM.similarity max_pairs (4096)")
    p.add_argument("--shard", type=int, help="ONNX shard: images = captions per matcher call (default: runtime.Scorer's)")
    p.add_argument("--budget-seconds", type=float,
                   help="ONNX scorers: stop the timed run after the image shard that ends past this many seconds "
                        "and extrapolate (default: score everything)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (torch and ORT); default off: exact float32")
    p.add_argument("--tol", type=float, default=TOL, help=f"exactness tolerance, max |diff| vs the loop ({TOL:g})")
    p.add_argument("--max-seconds", type=float, default=900, help="per scorer process; then reported as TIMEOUT (900)")
    p.add_argument("--max-memory-gb", type=float,
                   help="address-space cap of each CPU scorer process (default 90%% of the memory available)")
    p.add_argument("--seed", type=int, default=0, help="(0)")
    p.add_argument("--json", metavar="OUT", help="also write all results as JSON to OUT")
    # child-process protocol
    p.add_argument("--only", choices=ALL_SCORERS, help="run this scorer alone, in this process; print one JSON line")
    p.add_argument("--model-dir", help="(with --only onnx-*) an exported model dir to use instead of exporting")
    p.add_argument("--save", help="(with --only) write the scored block's top-left --save-rows x --save-cols to this .npy")
    p.add_argument("--save-rows", type=int)
    p.add_argument("--save-cols", type=int)
    return p


def resolve(args, size: str) -> dict:
    """Everything a scorer process needs, from the flags and the size's defaults."""
    preset = SIZES[size]
    cfg = {"size": size, "embed_size": args.embed_size or preset["embed_size"], "n_img": args.n_img or preset["n_img"],
           "n_cap": args.n_cap or preset["n_cap"], "mode": args.mode, "n_steps": args.steps,
           "n_region": args.n_region, "min_len": args.min_len, "max_len": args.max_len, "img_dim": args.img_dim,
           "word_dim": args.word_dim, "vocab_size": args.vocab_size, "seed": args.seed, "threads": args.threads,
           "repeat": max(1, args.repeat), "max_elems": args.max_elems, "max_pairs": args.max_pairs,
           "shard": args.shard, "tf32": args.tf32, "budget": args.budget_seconds, "loop_pairs": preset["loop_pairs"]}
    if not 1 <= cfg["min_len"] <= cfg["max_len"]:
        raise SystemExit("need 1 <= --min-len <= --max-len")
    if min(cfg["n_img"], cfg["n_cap"], cfg["n_region"], cfg["embed_size"], cfg["n_steps"]) < 1:
        raise SystemExit("sizes and --steps must be >= 1")
    cfg["slices"] = {}
    given = parse_slices(args.slice)
    for name in ALL_SCORERS:
        caps, imgs = given.get(name, (None, None))
        if caps is None and name in LOOPS:  # default slice: a bounded number of pairs
            budget = cfg["loop_pairs"] if name == "loop" else LOOP_CUDA_PAIRS
            imgs = min(cfg["n_img"], budget)
            caps = max(1, budget // imgs)
        caps = min(cfg["n_cap"], caps or cfg["n_cap"])
        imgs = min(cfg["n_img"], imgs or cfg["n_img"])
        cfg["slices"][name] = (caps, imgs)
    return cfg


# --------------------------------------------------------------------------- inputs (numpy, the same in every process)
def make_inputs(cfg: dict):
    """region_embs (n_img, n_region, d) f32, word_embs (n_cap, max length, d) f32 with zeros past each
    length, lengths (n_cap,) i64: unit vectors with a shared component, from numpy's RNG (seed)."""
    rng = np.random.default_rng(cfg["seed"])
    d = cfg["embed_size"]
    lengths = rng.integers(cfg["min_len"], cfg["max_len"] + 1, size=cfg["n_cap"]).astype(np.int64)
    shared = SHARED * rng.standard_normal(d, dtype=np.float32)

    def unit(shape):
        x = rng.standard_normal(shape, dtype=np.float32)
        x += shared
        x /= np.sqrt(np.square(x).sum(-1, keepdims=True)) + np.float32(1e-8)
        return x

    regions = unit((cfg["n_img"], cfg["n_region"], d))
    words = unit((cfg["n_cap"], int(lengths.max()), d))
    words[np.arange(words.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return regions, words, lengths


def build_model(cfg: dict):
    import torch

    from imram_min.model import IMRAM, IMRAMConfig
    torch.manual_seed(cfg["seed"])
    return IMRAM(IMRAMConfig(vocab_size=cfg["vocab_size"], img_dim=cfg["img_dim"], word_dim=cfg["word_dim"],
                             embed_size=cfg["embed_size"], mode=cfg["mode"], n_steps=cfg["n_steps"])).eval()


def export_onnx(cfg: dict, out_dir: str) -> float:
    """Export the benchmark's model with matcher="fast" (export.export_model) to out_dir; returns seconds."""
    stub_nltk()
    from export.onnx_export import export_model
    from runtime.text import Vocabulary
    t0 = time.perf_counter()
    model = build_model(cfg)
    vocab = Vocabulary(f"w{i}" for i in range(cfg["vocab_size"] - 4))  # + the 4 special tokens
    export_model(model, vocab, out_dir, matcher="fast")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- one scorer, in this process
def plain_similarity(model, region_embs, word_embs, lengths, max_pairs: int):
    """IMRAM.similarity (the reference form) in blocks of at most ``max_pairs`` image x caption pairs,
    each block's captions trimmed to their longest: (n_img, n_cap)."""
    import torch

    n_img, n_cap = region_embs.shape[0], word_embs.shape[0]
    cap_block = max(1, min(n_cap, max_pairs))
    img_block = max(1, min(n_img, max_pairs // cap_block))
    rows = []
    for i in range(0, n_img, img_block):
        cols = []
        for j in range(0, n_cap, cap_block):
            n_word = int(lengths[j:j + cap_block].max())
            cols.append(model.similarity(region_embs[i:i + img_block], word_embs[j:j + cap_block, :n_word],
                                         lengths[j:j + cap_block]))
        rows.append(torch.cat(cols, 1))
    return torch.cat(rows, 0)


def run_torch(name: str, cfg: dict, regions, words, lengths) -> tuple[dict, np.ndarray]:
    import torch

    from benchmarks.original_loop import per_caption_similarity
    from imram_min import schedule
    from imram_min.schedule import CUDA_MAX_ELEMS

    cuda = name.endswith("-cuda")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.allow_tf32 = cfg["tf32"]
        torch.set_float32_matmul_precision("high" if cfg["tf32"] else "highest")
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(cfg).to(device)
    kind = name.split("-")[0]
    max_elems = cfg["max_elems"] or (CUDA_MAX_ELEMS if cuda else schedule.CPU_MAX_ELEMS)

    def score(r, w, n):
        if kind == "loop":
            return per_caption_similarity(model, r, w, n)
        if kind == "plain":
            return plain_similarity(model, r, w, n, cfg["max_pairs"])
        return schedule.similarity(model, r, w, n, max_elems=max_elems)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    caps, imgs = cfg["slices"][name]
    r = torch.from_numpy(regions[:imgs]).to(device)
    w = torch.from_numpy(words[:caps, :int(lengths[:caps].max())]).to(device)
    n = torch.from_numpy(lengths[:caps])  # lengths stay on the CPU, as evaluation keeps them
    with torch.no_grad():
        score(r[:2], w[:4], n[:4])  # warm-up
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            base = rss_mb()
        times = []
        for _ in range(cfg["repeat"]):
            t0 = time.perf_counter()
            out = score(r, w, n)
            sync()
            times.append(time.perf_counter() - t0)
            out = out.float().cpu().numpy()
    if cuda:
        peak, mem_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
        device_name = torch.cuda.get_device_name()
    else:
        peak, mem_kind, device_name = peak_rss_mb(), "peak RSS (VmHWM)", "cpu"
    info = {"device": device_name, "threads": torch.get_num_threads(), "times": times, "mem_base_mb": base,
            "mem_peak_mb": peak, "mem_kind": mem_kind, "torch": torch.__version__,
            "max_elems": max_elems if kind == "fast" else None}
    return info, out


def run_onnx(name: str, cfg: dict, regions, words, lengths, model_dir: str | None) -> tuple[dict, np.ndarray]:
    """runtime.Scorer.score_embeddings on the exported model dir: what ``python -m runtime.score``
    does after encoding (projection graphs once per item, matcher calls of Scorer's shard size)."""
    cuda = name == "onnx-cuda"
    torch = None
    if cuda:
        import torch  # loads the CUDA / cuDNN libraries that ORT's CUDA provider links against
    tmp = None
    if model_dir is None:  # standalone --only run: export here
        tmp = tempfile.TemporaryDirectory(prefix="imram-bench-")
        model_dir = os.path.join(tmp.name, "model")
        export_onnx(cfg, model_dir)
    stub_nltk()
    import onnxruntime as ort

    from runtime.scorer import Scorer
    if cuda and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - best effort: torch has loaded its libraries already
            print(f"onnxruntime.preload_dlls: {e}", file=sys.stderr)
    if cuda and CUDA not in ort.get_available_providers():
        raise RuntimeError(f"this onnxruntime ({ort.__version__}) offers no {CUDA} "
                           f"(it offers {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    if cuda:
        used_before = torch.cuda.mem_get_info()
        used_before = (used_before[1] - used_before[0]) / 2**20
    scorer = Scorer(model_dir, device="cuda" if cuda else "cpu", shard=cfg["shard"], threads=cfg["threads"],
                    tf32=cfg["tf32"])

    caps, imgs = cfg["slices"][name]
    regions, words, lengths = regions[:imgs], words[:caps], lengths[:caps]
    step = scorer.shard_size(regions.shape[1], words.shape[1])
    group = scorer.group_size(regions.shape[1], step)

    def score():
        """All pairs, image group by image group; with --budget-seconds it stops after the group
        that ends past the budget. Returns (sims of the images done, images done)."""
        t0 = time.perf_counter()
        out = np.empty((len(regions), len(lengths)), dtype=np.float32)
        for i in range(0, len(regions), group):
            scorer.score_embeddings(regions[i:i + group], words, lengths, out=out[i:i + group])
            if cfg["budget"] and time.perf_counter() - t0 > cfg["budget"]:
                return out[:i + group], min(i + group, len(regions))
        return out, len(regions)

    scorer.score_embeddings(regions[:min(step, 2)], words[:min(step, 4)], lengths[:min(step, 4)])  # warm-up
    base = rss_mb()
    times = []
    for _ in range(1 if cfg["budget"] else cfg["repeat"]):
        t0 = time.perf_counter()
        out, done = score()
        times.append(time.perf_counter() - t0)
    if cuda:
        free, total = torch.cuda.mem_get_info()
        peak = (total - free) / 2**20 - used_before
        info = {"device": torch.cuda.get_device_name(), "mem_base_mb": 0.0, "mem_peak_mb": peak,
                "mem_kind": "GPU memory held by ORT after the run (arena)"}
    else:
        info = {"device": "cpu", "mem_base_mb": base, "mem_peak_mb": peak_rss_mb(), "mem_kind": "peak RSS (VmHWM)"}
    info.update({"threads": cfg["threads"] or "ort default", "times": times, "provider": scorer.provider,
                 "onnxruntime": ort.__version__, "shard": step, "imgs": done})
    if tmp is not None:
        tmp.cleanup()
    return info, out


def run_one(name: str, cfg: dict, model_dir: str | None = None, save: str | None = None,
            save_rows: int | None = None, save_cols: int | None = None) -> dict:
    """Score with one scorer in this process; returns its result (the JSON line of --only)."""
    caps, imgs = cfg["slices"][name]
    result = {"name": name, "size": cfg["size"], "status": "ok", "caps": caps, "imgs": imgs,
              "pairs": caps * imgs, "form": form_of(name)}
    try:
        regions, words, lengths = make_inputs(cfg)
        if name.startswith("onnx"):
            info, out = run_onnx(name, cfg, regions, words, lengths, model_dir)
        else:
            info, out = run_torch(name, cfg, regions, words, lengths)
    except BaseException as e:  # noqa: BLE001 - reported, not raised: the parent prints it in the table
        if isinstance(e, KeyboardInterrupt):
            raise
        result.update(status="oom" if is_oom(e) else "error", error=f"{type(e).__name__}: {str(e).strip()[:400]}")
        return result
    result.update(info)
    result["pairs"] = caps * result["imgs"]  # an ONNX run cut short by --budget-seconds did fewer images
    best = min(info["times"])
    result.update(seconds=best, pairs_per_s=result["pairs"] / best,
                  flops_per_pair=mean_flops(result["form"], lengths[:caps], cfg))
    result["gflops_per_s"] = result["pairs_per_s"] * result["flops_per_pair"] / 1e9
    if save:
        np.save(save, out[:save_rows, :save_cols])
    return result


# --------------------------------------------------------------------------- the parent: every scorer in its own process
def available_scorers() -> list[str]:
    names = list(CPU_SCORERS)
    try:
        import torch
        if torch.cuda.is_available():
            names += ["loop-cuda", "plain-cuda", "fast-cuda"]
    except ImportError:
        pass
    try:
        import onnxruntime as ort
        if CUDA in ort.get_available_providers():
            names.append("onnx-cuda")
    except ImportError:
        pass
    return names


def child_argv(name: str, cfg: dict, args, extra: list[str]) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--only", name, "--size", cfg["size"],
            "--n-img", str(cfg["n_img"]), "--n-cap", str(cfg["n_cap"]), "--embed-size", str(cfg["embed_size"]),
            "--mode", cfg["mode"], "--steps", str(cfg["n_steps"]), "--n-region", str(cfg["n_region"]),
            "--min-len", str(cfg["min_len"]), "--max-len", str(cfg["max_len"]), "--img-dim", str(cfg["img_dim"]),
            "--word-dim", str(cfg["word_dim"]), "--vocab-size", str(cfg["vocab_size"]), "--seed", str(cfg["seed"]),
            "--repeat", str(cfg["repeat"]), "--max-pairs", str(cfg["max_pairs"])]
    for flag, key in (("--threads", "threads"), ("--max-elems", "max_elems"), ("--shard", "shard"),
                      ("--budget-seconds", "budget")):
        if cfg[key]:
            argv += [flag, str(cfg[key])]
    if cfg["tf32"]:
        argv.append("--tf32")
    if not name.endswith("cuda") and args.max_memory_gb:
        argv += ["--max-memory-gb", str(args.max_memory_gb)]
    caps, imgs = cfg["slices"][name]
    argv += ["--slice", f"{name}={imgs}x{caps}"]
    return argv + extra


def run_child(argv: list[str], max_seconds: float) -> dict:
    """Run a child process that prints one JSON line; returns it, or a status for a crash / timeout.

    Every child keeps freed memory for reuse, with the glibc settings that
    imram_min.schedule.retain_freed_memory gives the training and evaluation commands (here through
    the environment, so that a child need not import torch to get them)."""
    from imram_min.schedule import MMAP_THRESHOLD, TRIM_THRESHOLD

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=max_seconds, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {max_seconds:g} s (--max-seconds)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if proc.returncode in (-9, 137):
        return {"status": "oom", "error": "killed (SIGKILL: out of memory?) " + " | ".join(tail)}
    return {"status": "error", "error": f"exit status {proc.returncode}: " + " | ".join(tail)}


def fmt_mem(res: dict) -> str:
    if res.get("mem_peak_mb") is None:
        return "-"
    s = f"{res['mem_peak_mb']:.0f}"
    if res.get("mem_base_mb"):
        s += f" (+{res['mem_peak_mb'] - res['mem_base_mb']:.0f})"
    return s


def check_against(res: dict, reference: dict | None, tol: float) -> None:
    """Set res["check"] (and max_abs_diff): exactness vs the reference loop on the slice both scored."""
    if res["status"] != "ok":
        res["check"] = "-"
    elif reference is res:
        res["max_abs_diff"], res["check"] = 0.0, "ref"
    elif reference is None or reference["status"] != "ok":
        res["check"] = "n/a"
    else:
        rows, cols = min(reference["imgs"], res["imgs"]), min(reference["caps"], res["caps"])
        diff = float(np.abs(res["sims"][:rows, :cols] - reference["sims"][:rows, :cols]).max())
        res["max_abs_diff"], res["check_pairs"] = diff, rows * cols
        res["check"] = "PASS" if diff <= tol else "FAIL"


def merge_rounds(old: dict | None, new: dict) -> dict:
    """One scorer's result over rounds: the fastest round's, with every round's times, the highest
    peak memory and the worst exactness; a round that failed makes the result that failure."""
    if old is None or new["status"] != "ok":
        return new
    best = new if new["pairs_per_s"] > old["pairs_per_s"] else old
    merged = dict(best)
    merged["times"] = old["times"] + new["times"]
    merged["mem_peak_mb"] = max(old["mem_peak_mb"], new["mem_peak_mb"])
    if "max_abs_diff" in old:
        merged["max_abs_diff"] = max(old["max_abs_diff"], new["max_abs_diff"])
        merged["check"] = "FAIL" if "FAIL" in (old["check"], new["check"]) else best["check"]
    return merged


def run_size(size: str, args, names: list[str], progress=None) -> dict:
    cfg = resolve(args, size)
    print(f"\n=== size {size}: d = {cfg['embed_size']}, {cfg['n_region']} regions, caption lengths "
          f"{cfg['min_len']}..{cfg['max_len']}, K = {cfg['n_steps']}, mode {cfg['mode']}, "
          f"shard {cfg['n_img']} images x {cfg['n_cap']} captions, seed {cfg['seed']}", flush=True)
    ref = next((n for n in LOOPS if n in names), None)
    ref_caps, ref_imgs = cfg["slices"][ref] if ref else (0, 0)
    results, tmp = {}, tempfile.TemporaryDirectory(prefix="imram-bench-")
    model_dir = None
    if any(n.startswith("onnx") for n in names):
        model_dir = os.path.join(tmp.name, "model")
        try:
            seconds = export_onnx(cfg, model_dir)
            print(f"exported the model (matcher=fast) in {seconds:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            model_dir = None
            for n in names:
                if n.startswith("onnx"):
                    results[n] = {"status": "error", "error": f"export failed: {type(e).__name__}: {e}"}
    rounds = max(1, args.rounds)
    by_round = {}  # name -> [pairs/s of each round]
    for rnd in range(rounds):
        if rounds > 1:
            print(f" round {rnd + 1} of {rounds}", flush=True)
        for name in names:
            if name in results and results[name]["status"] != "ok":
                continue  # failed in an earlier round, or its export failed: not run again
            caps, imgs = cfg["slices"][name]
            save = os.path.join(tmp.name, f"{name}.npy")
            extra = ["--save", save, "--save-rows", str(ref_imgs or imgs), "--save-cols", str(ref_caps or caps)]
            if name.startswith("onnx"):
                extra += ["--model-dir", model_dir]
            t0 = time.perf_counter()
            res = run_child(child_argv(name, cfg, args, extra), args.max_seconds)
            res.setdefault("name", name)
            res.setdefault("caps", caps)
            res.setdefault("imgs", imgs)
            if res["status"] == "ok":
                res["sims"] = np.load(save)
                by_round.setdefault(name, []).append(res["pairs_per_s"])
            check_against(res, res if name == ref else results.get(ref), args.tol)  # the reference runs first
            if res["status"] == "ok":
                diff = f", max|diff| {res['max_abs_diff']:.2e} {res['check']}" if "max_abs_diff" in res else ""
                shown = f"{res['pairs_per_s']:.1f} pairs/s, peak {fmt_mem(res)} MB{diff}"
            else:
                shown = f"{res['status'].upper()}: {res.get('error', '')[:200]}"
            print(f"  {name:<10} {shown}  ({time.perf_counter() - t0:.1f} s in all)", flush=True)
            results[name] = merge_rounds(results.get(name), res)
            if progress:
                progress({n: {k: v for k, v in r.items() if k != "sims"} for n, r in results.items()})
    for res in results.values():
        if res.get("check") is None:
            check_against(res, results.get(ref), args.tol)
    tmp.cleanup()

    # speed relative to the loop on the same device (the CPU loop for CPU scorers)
    def loop_for(name):
        own = results.get("loop-cuda" if name.endswith("cuda") else "loop")
        if own is None or own["status"] != "ok":
            own = results.get("loop")
        return own if own is not None and own["status"] == "ok" else None

    lengths = make_inputs({**cfg, "n_img": 1, "embed_size": 1})[2]
    f_orig, f_plain, f_fast = (mean_flops(f, lengths, cfg) for f in ("original", "plain", "fast"))
    header = (f"{'scorer':<11}{'pairs/s':>11}{'x loop':>9}{'GFLOP/s':>9}{'max|diff|':>11}{'check':>7}"
              f"{'peak MB (+run)':>17}  pairs timed / notes")
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        if res["status"] != "ok":
            print(f"{name:<11}{res['status'].upper():>11}   {res.get('error', '')[:150]}")
            continue
        loop = loop_for(name)
        ratio = f"{res['pairs_per_s'] / loop['pairs_per_s']:.2f}" if loop else "-"
        if loop and loop["name"] != ("loop-cuda" if name.endswith("cuda") else "loop"):
            ratio += "*"
        res["x_loop"] = res["pairs_per_s"] / loop["pairs_per_s"] if loop else None
        diff = f"{res['max_abs_diff']:.2e}" if "max_abs_diff" in res else "-"
        note = f"{res['imgs']}x{res['caps']} in {res['seconds']:.2f} s"
        if res["pairs"] < cfg["n_img"] * cfg["n_cap"]:
            why = "slice" if name in LOOPS else "cut short by --budget-seconds"
            note += f" ({why}; pairs/s extrapolated to the {cfg['n_img']}x{cfg['n_cap']} shard)"
        if res.get("provider"):
            note += f", {res['provider'].replace('ExecutionProvider', '')} shard {res.get('shard')}"
        if res.get("max_elems"):
            note += f", max_elems 2^{math.log2(res['max_elems']):g}"
        print(f"{name:<11}{res['pairs_per_s']:>11.1f}{ratio:>9}{res['gflops_per_s']:>9.1f}{diff:>11}"
              f"{res['check']:>7}{fmt_mem(res):>17}  {note}")
    print(f"x loop: pairs/s over the loop's on the same device (* = over the CPU loop). max|diff|: vs {ref or 'no loop'} "
          f"on the first {ref_imgs} images x {ref_caps} captions, float32, PASS <= {args.tol:g}.")
    mem_kinds = sorted({r["mem_kind"] for r in results.values() if r.get("mem_kind")})
    if mem_kinds:
        print(f"peak MB: {'; '.join(mem_kinds)}; (+run): over the process's memory just before the timed run.")
    print(f"analytic FLOPs per pair (mean over the captions' true lengths): original loop {f_orig / 1e9:.4g} G, "
          f"plain {f_plain / 1e9:.4g} G (no last update), fast {f_fast / 1e9:.4g} G; "
          f"ideal speed-up original / fast = {f_orig / f_fast:.2f}x")
    for name, res in results.items():
        if res["status"] == "ok" and res["form"] == "fast" and res.get("x_loop"):
            print(f"  {name}: {res['x_loop']:.2f}x the loop = {res['x_loop'] / (f_orig / f_fast):.0%} of the ideal "
                  f"speed-up ({res['gflops_per_s']:.1f} vs the loop's {loop_for(name)['gflops_per_s']:.1f} GFLOP/s)")
    if rounds > 1:
        ratios = []
        for name, res in results.items():
            loop = loop_for(name)
            if res["status"] == "ok" and loop and loop is not res and len(by_round.get(name, [])) == rounds \
                    and len(by_round.get(loop["name"], [])) == rounds:
                res["x_loop_rounds"] = [p / q for p, q in zip(by_round[name], by_round[loop["name"]])]
                ratios.append(f"{name} {', '.join(f'{r:.2f}' for r in res['x_loop_rounds'])}")
        print(f"x loop within each round (the loop's and the scorer's processes of the same round): {'; '.join(ratios)}")
    for res in results.values():
        res.pop("sims", None)
    return {"config": {k: v for k, v in cfg.items() if k != "slices"} | {"slices": cfg["slices"]},
            "flops_per_pair": {"original": f_orig, "plain": f_plain, "fast": f_fast},
            "ideal_speedup": f_orig / f_fast, "reference": ref, "scorers": results}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.only:
        if args.size == "both":
            raise SystemExit("--only needs --size full or --size small")
        if not args.only.endswith("cuda"):
            limit_address_space(args.max_memory_gb)
        cfg = resolve(args, args.size)
        print(json.dumps(run_one(args.only, cfg, args.model_dir, args.save, args.save_rows, args.save_cols)),
              flush=True)
        return 0

    names = args.scorers.split(",") if args.scorers else available_scorers()
    bad = [n for n in names if n not in ALL_SCORERS]
    if bad:
        raise SystemExit(f"unknown scorers {bad}; choose from {','.join(ALL_SCORERS)}")
    names = [n for n in LOOPS + ALL_SCORERS if n in names]  # the loops first: they are the reference
    names = list(dict.fromkeys(names))
    if args.max_memory_gb is None:
        available = mem_available_gb()
        args.max_memory_gb = round(0.9 * available, 1) if math.isfinite(available) else None
    info = machine_info()
    import onnxruntime
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {info['cpus']} CPUs, load average {info['load_avg']}, {info['mem_available_gb']} GB available, "
          f"GPU {gpu}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__} "
          f"({', '.join(p.replace('ExecutionProvider', '') for p in onnxruntime.get_available_providers())}), "
          f"threads {args.threads or 'default'}; scorers {','.join(names)}", flush=True)
    if busy_warning(info):
        print(busy_warning(info), flush=True)
    sizes = ["full", "small"] if args.size == "both" else [args.size]
    report = {"machine": info | {"gpu": gpu, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
              "sizes": {}}
    def write_json():
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2, default=str)
                f.write("\n")

    def progress(size, results):  # the JSON so far, so that a run cut short still leaves its results
        report["sizes"][size] = {"partial": True, "scorers": results}
        write_json()

    for size in sizes:
        report["sizes"][size] = run_size(size, args, names, lambda r, s=size: progress(s, r))
        write_json()
    report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average at the end: {report['machine']['load_avg_end']} (a busy machine makes timings noisy)")
    checks = [r["check"] for s in report["sizes"].values() for r in s["scorers"].values()]
    errors = [f"{s}/{n}" for s, v in report["sizes"].items() for n, r in v["scorers"].items() if r["status"] == "error"]
    unchecked = [f"{s}/{n}" for s, v in report["sizes"].items() for n, r in v["scorers"].items()
                 if r.get("check") not in ("PASS", "FAIL", "ref")]
    verdict = "FAIL" if "FAIL" in checks or errors else ("INCOMPLETE" if unchecked or "PASS" not in checks else "PASS")
    print(f"exactness: {verdict} ({checks.count('PASS')} PASS, {checks.count('FAIL')} FAIL"
          + (f"; errors: {', '.join(errors)}" if errors else "")
          + (f"; not checked: {', '.join(unchecked)}" if unchecked else "") + ")")
    report["verdict"] = verdict
    write_json()
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())

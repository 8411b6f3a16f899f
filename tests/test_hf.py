"""Specification of Hugging Face models, tokenizers and datasets, offline (``docs/hf.md``).

Every file the runs read is made here: a 2-layer Llama-style ``config.json`` written with the
``transformers`` config class, a byte-level BPE trained by ``diloco tokenizer train`` on a few KB
of text, and a jsonl dataset of that text's paragraphs. Nothing is downloaded (HF_HUB_OFFLINE).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_torchrun

from diloco.cli import main
from diloco.config import load_config
from diloco.job import events
from diloco.job.hf_data import PackedStream, hf_tokens
from diloco.job.metrics import read_metrics
from diloco.job.tokenizer import load_tokenizer
from diloco.job.train import train
from diloco.persist.resume import list_checkpoints, read_meta

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

STEPS, K = 12, 4
TOKENIZER_VOCAB = 300


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub, and the libraries' caches in a temporary folder (for the child processes too)."""
    saved = dict(os.environ)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path_factory.mktemp("hf_home")))
    yield
    os.environ.clear()
    os.environ.update(saved)


def write_llama(path: Path, vocab_size: int = 320, **extra) -> Path:
    """A 2-layer Llama-style model directory (config.json only: random init), tied embeddings."""
    transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        **extra,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Any]:
    """corpus.txt (~16 KB), docs.jsonl (its paragraphs), a BPE trained on it, a Llama dir."""
    root = tmp_path_factory.mktemp("hf")
    text = Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()[:16000]
    (root / "corpus.txt").write_text(text)
    docs = [d for d in text.split("\n\n") if d.strip()]
    with open(root / "docs.jsonl", "w") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc, "id": i}) + "\n")
    rc = main(
        [
            "tokenizer",
            "train",
            "--data",
            f"text:{root / 'corpus.txt'}",
            "--vocab",
            str(TOKENIZER_VOCAB),
            "--out",
            str(root / "tok"),
        ]
    )
    assert rc == 0
    return {
        "root": root,
        "corpus": root / "corpus.txt",
        "docs": root / "docs.jsonl",
        "tok": root / "tok",
        "llama": write_llama(root / "llama"),
        "n_docs": len(docs),
    }


def hf_run(files: dict[str, Any], out: Path, *extra: str) -> list[str]:
    """``--set`` overrides of the tiny Llama run: 12 steps, K=4, checkpoints every round."""
    return [
        f"model.source=hf:{files['llama']}",
        f"data.source=hf:{files['docs']}",
        f"data.tokenizer={files['tok']}",
        "model.block_size=32",
        "data.batch_size=8",
        f"train.steps={STEPS}",
        f"outer.sync_every={K}",
        "inner.warmup_steps=2",
        "train.eval_every=4",
        "train.log_every=2",
        "train.eval_batches=2",
        "train.checkpoint_every=1",
        "train.keep_last=4",
        "run.device=cpu",
        "run.progress=false",
        "topology.backend=gloo",
        "topology.mixed_precision=fp32",
        f"run.out_dir={out}",
        *extra,
    ]


def same_fields(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in read_metrics(path)]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    return out, train(load_config(None, hf_run(files, out)))


# --- tokenizer and data ---------------------------------------------------------------------


def test_trained_tokenizer_loads_with_autotokenizer_and_has_eos_zero(files):
    tok = transformers.AutoTokenizer.from_pretrained(files["tok"])
    assert len(tok) == TOKENIZER_VOCAB and tok.eos_token_id == 0
    ours = load_tokenizer(str(files["tok"]))
    assert (ours.vocab_size, ours.eos_id) == (TOKENIZER_VOCAB, 0)
    text = "def parse_args(self):"
    assert ours.encode([text])[0] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ours.encode([text])[0]) == text


def test_dataset_is_tokenized_once_with_eos_after_each_document_and_cached(files):
    tok = load_tokenizer(str(files["tok"]))
    tokens = hf_tokens(f"hf:{files['docs']}", tok, "text", "data.source")
    assert int((tokens == tok.eos_id).sum()) == files["n_docs"]
    assert int(tokens[-1]) == tok.eos_id
    cached = list((files["root"] / ".diloco-cache").glob("tokens-*.bin"))
    assert len(cached) == 1
    again = hf_tokens(f"hf:{files['docs']}", tok, "text", "data.source")
    assert torch.equal(again.long(), tokens.long())


def test_a_text_file_tokenized_in_chunks_gives_the_whole_texts_tokens(files):
    from diloco.job.hf_data import text_chunks

    tok = load_tokenizer(str(files["tok"]))
    text = files["corpus"].read_text()
    chunks = text_chunks(text, size=500)
    assert len(chunks) > 1 and "".join(chunks) == text
    assert sum(tok.encode(chunks), []) == tok.encode([text])[0]


def test_packed_stream_gives_each_group_its_own_part_and_resumes_exactly():
    tokens = torch.arange(1 + 8 * 40, dtype=torch.int32)  # 40 windows of T=8
    seen = []
    for group in range(2):
        stream = PackedStream(tokens, 4, 8, seed=0, group=group, groups=2)
        starts = {int(x[0]) for _ in range(5) for x in stream.next()[0]}  # one epoch: 20
        seen.append(starts)
        assert len(starts) == 20
    assert not seen[0] & seen[1]
    a = PackedStream(tokens, 3, 8, seed=1, group=0, groups=1)
    for _ in range(20):  # past an epoch boundary
        a.next()
    b = PackedStream(tokens, 3, 8, seed=1, group=0, groups=1)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        xa, ya = a.next()
        xb, yb = b.next()
        assert xa.shape == (3, 8) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(xa[:, 1:], ya[:, :-1])


# --- training, resume, export ---------------------------------------------------------------


def test_single_process_run_trains_the_llama_from_its_config(reference):
    out, summary = reference
    records = read_metrics(out / "metrics.jsonl")
    assert summary["final_val_loss"] < records[0]["val_loss"] - 0.2
    meta = read_meta(list_checkpoints(out)[0])
    assert meta["model_shapes"]["hf.model.embed_tokens.weight"] == [320, 32]
    assert "hf.lm_head.weight" not in meta["model_shapes"]  # tied: one parameter


class Crash(Exception):
    """Stands in for a process dying in the middle of a step."""


def test_resume_after_crash_equals_the_uninterrupted_run(files, reference, tmp_path):
    cfg = load_config(None, hf_run(files, tmp_path))

    def crash(name, **info):
        if name == "after_backward" and info["step"] == 6:
            raise Crash

    with events.observing(crash), pytest.raises(Crash):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4"]
    summary = train(cfg)
    assert same_fields(tmp_path / "metrics.jsonl") == same_fields(reference[0] / "metrics.jsonl")
    assert summary["final_val_loss"] == reference[1]["final_val_loss"]


def test_export_hf_loads_with_from_pretrained_and_gives_the_runs_logits(files, reference, tmp_path):
    from diloco.models.hf import load_hf_model

    out = tmp_path / "exported"
    assert main(["export", str(reference[0]), "--format", "hf", "--out", str(out)]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    run = load_hf_model(f"hf:{files['llama']}", seed=1)
    run.load_state_dict(torch.load(reference[0] / "final_model.pt"))
    idx = torch.randint(0, TOKENIZER_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, run(idx)[0], rtol=0, atol=1e-6)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == TOKENIZER_VOCAB and tok.eos_token_id == 0


def test_text_file_with_the_tokenizer_and_activation_checkpointing_train(files, tmp_path):
    overrides = hf_run(files, tmp_path, f"data.source=text:{files['corpus']}", "train.steps=4")
    summary = train(load_config(None, [*overrides, "train.activation_checkpointing=true"]))
    assert math.isfinite(summary["final_val_loss"])


def readme_commands() -> list[list[str]]:
    """The argument lists of the README's three commands from a text file to an HF model."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Bring your own model")[1]
    block = section.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    return [shlex.split(line.split("#")[0])[1:] for line in block.splitlines() if line.strip()]


def test_readme_three_commands_go_from_a_text_file_to_an_exported_model(files, tmp_path):
    tokenize, training, export = readme_commands()
    assert (tokenize[:2], training[0], export[0]) == (["tokenizer", "train"], "train", "export")
    write_llama(tmp_path / "my-llama", vocab_size=8192)
    (tmp_path / "my.txt").write_text(files["corpus"].read_text())
    shorter = ["train.steps=4", "inner.warmup_steps=1", "model.block_size=32", "data.batch_size=4"]
    training += [a for o in [*shorter, "train.eval_batches=1", "run.progress=false"]
                 for a in ("--set", o)]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for argv in (tokenize, training, export):
            assert main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "my-llama-trained")
    assert model.config.num_hidden_layers == 2
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path / "my-llama-trained").eos_token_id == 0
    )


def test_a_separate_hf_validation_set_is_read_whole(files, tmp_path):
    from diloco.job.hf_data import load_data

    sources = [f"data.source=text:{files['corpus']}", f"data.val_source=hf:{files['docs']}"]
    corpus = load_data(load_config(None, hf_run(files, tmp_path, *sources)))
    assert not corpus.packed and corpus.vocab_size == TOKENIZER_VOCAB
    tok = load_tokenizer(str(files["tok"]))
    whole = hf_tokens(f"hf:{files['docs']}", tok, "text", "data.val_source")
    assert torch.equal(corpus.val.long(), whole.long())


# --- bad inputs: one line, nothing written --------------------------------------------------


def bad_cases(files: dict[str, Any]) -> dict[str, tuple[list[str], str]]:
    root = files["root"]
    clip = root / "clip"
    clip.mkdir(exist_ok=True)
    (clip / "config.json").write_text(json.dumps({"model_type": "clip"}))
    small = root / "llama_small_vocab"
    if not small.exists():
        write_llama(small, vocab_size=256)
    return {
        "missing path": (["model.source=hf:/no/such/model"], "does not exist; fix the path"),
        "hub name": (["model.source=hf:meta-llama/Llama-3.2-1B"], "download it first"),
        "unbuildable config": ([f"model.source=hf:{clip}"], "cannot build a causal LM"),
        "no text column": (["data.text_column=body"], "has no column 'body'"),
        "tokenizer too large": (
            [f"model.source=hf:{small}"],
            f"has {TOKENIZER_VOCAB} tokens, more than the vocabulary",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing path", "hub name", "unbuildable config", "no text column", "tokenizer too large"],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(files, tmp_path, capfd, case):
    overrides, message = bad_cases(files)[case]
    out = tmp_path / "run"
    argv = ["train"] + [a for o in hf_run(files, out, *overrides) for a in ("--set", o)]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diloco: error: "), err
    assert message in err[0]
    assert not out.exists()


# --- torchrun: FSDP2 over the decoder layers, streaming, int8 --------------------------------

LAUNCHES = {
    "g2s2": (4, ["topology.groups=2", "topology.shards=2"]),
    "g2s1": (2, ["topology.groups=2"]),
    "g1s2": (2, ["topology.shards=2"]),
    "stream_int8": (
        2,
        [
            "topology.groups=2",
            "outer.fragments=2",
            "outer.sync_delay=1",
            "outer.compress=int8",
        ],
    ),
}


@pytest.fixture(scope="module")
def launched(files, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("torchrun")

    def launch(name: str) -> Path:
        nproc, overrides = LAUNCHES[name]
        overrides = [*overrides, "train.checkpoint_every=0"]
        result = run_torchrun(nproc, hf_run(files, root / name, *overrides), timeout=300)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
        return root / name

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(LAUNCHES, pool.map(launch, LAUNCHES), strict=True))


def curves(run: Path) -> dict[tuple[int, str], float]:
    return {
        (r["step"], key): r[key]
        for r in read_metrics(run / "metrics.jsonl")
        for key in ("loss", "val_loss")
        if key in r
    }


def assert_same_curves(a: Path, b: Path, atol: float = 2e-6, rtol: float = 1e-6) -> None:
    ca, cb = curves(a), curves(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        assert math.isclose(ca[key], cb[key], rel_tol=rtol, abs_tol=atol), (key, ca[key], cb[key])


@pytest.mark.slow
def test_two_sharded_groups_equal_two_unsharded_groups(launched):
    assert_same_curves(launched["g2s2"], launched["g2s1"])


@pytest.mark.slow
def test_one_group_sharded_under_torchrun_equals_the_single_process_run(launched, reference):
    assert_same_curves(launched["g1s2"], reference[0])


@pytest.mark.slow
def test_streaming_fragments_with_int8_compression_train_the_llama(launched):
    run = launched["stream_int8"]
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.2
    assert any(r.get("fragments") == 2 for r in records)

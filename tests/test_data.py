"""Specification of corpora (embedded, text:PATH, bin:GLOB) and of the batch streams."""

import array
import re
import struct
import sysconfig
from pathlib import Path

import pytest
import torch

from diloco.errors import CheckpointError, DataError
from diloco.job.data import (
    BIN_MAGIC,
    GPT2_VOCAB,
    BatchStream,
    Corpus,
    TokenShards,
    eval_batches,
    load_corpus,
    shard_batch,
    stdlib_files,
)


def write_shard(
    path: Path,
    tokens: list[int],
    magic: int = BIN_MAGIC,
    version: int = 1,
    count: int | None = None,
) -> Path:
    """A nanoGPT shard: 256 little-endian int32 header [magic, version, count, 0...], uint16s."""
    header = struct.pack(
        "<256i", magic, version, len(tokens) if count is None else count, *[0] * 253
    )
    path.write_bytes(header + array.array("H", tokens).tobytes())
    return path


def is_memory_mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


# ---------------------------------------------------------------------------------------------
# embedded


def test_embedded_corpus_is_byte_level_and_identical_across_loads():
    a, b = load_corpus("embedded", 128), load_corpus("embedded", 128)
    assert a.vocab_size == 256
    assert a.train.dtype == torch.uint8 and a.train.dim() == 1
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.numel() > 1_000_000 and a.val.numel() > 10_000


def test_embedded_files_are_sorted_stdlib_sources_without_tests():
    train, val = stdlib_files()
    for files in (train, val):
        assert list(files) == sorted(files)
        assert all(f.endswith(".py") for f in files)
    for path in train + val:
        dirs = set(path.split("/")[:-1])
        assert not dirs & {"test", "tests", "idle_test", "site-packages"}, path
    assert "os.py" in train + val and "json/decoder.py" in train + val


def test_embedded_split_is_by_file_disjoint_and_about_five_percent_val():
    train, val = stdlib_files()
    assert not set(train) & set(val)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.09


def test_embedded_corpus_is_the_files_joined_in_order():
    corpus = load_corpus("embedded", 128)
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = stdlib_files()
    for tokens, files in ((corpus.train, train), (corpus.val, val)):
        expected = (root / files[0]).read_bytes() + b"\n\n" + (root / files[1]).read_bytes()
        assert bytes(tokens[: len(expected)].tolist()) == expected


# ---------------------------------------------------------------------------------------------
# text:PATH


def test_text_file_is_split_90_10_and_memory_mapped(tmp_path):
    path = tmp_path / "corpus.txt"
    text = ("héllo wörld " * 100).encode()
    path.write_bytes(text)
    corpus = load_corpus(f"text:{path}", 16)
    assert isinstance(corpus, Corpus) and corpus.vocab_size == 256
    n_val = len(text) // 10
    assert bytes(corpus.train.tolist()) == text[:-n_val]
    assert bytes(corpus.val.tolist()) == text[-n_val:]
    assert is_memory_mapped(path)


def test_text_val_split_holds_at_least_one_window(tmp_path):
    path = tmp_path / "small.txt"
    path.write_bytes(b"a" * 100)
    corpus = load_corpus(f"text:{path}", 20)
    assert (corpus.train.numel(), corpus.val.numel()) == (79, 21)


def test_missing_text_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/nope.txt does not exist")):
        load_corpus(f"text:{tmp_path}/nope.txt", 16)


def test_empty_text_file_names_the_path(tmp_path):
    (tmp_path / "empty.txt").touch()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/empty.txt is empty")):
        load_corpus(f"text:{tmp_path}/empty.txt", 16)


def test_text_file_too_small_for_seq_len_says_what_is_needed(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_bytes(b"abcdefghij")
    with pytest.raises(
        DataError,
        match=re.escape(f"{path} has 10 tokens")
        + ".* needs at least 18 for model.block_size=8; lower model.block_size",
    ):
        load_corpus(f"text:{path}", 8)


def test_text_file_that_is_not_utf8_names_the_path_and_byte(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"x" * 50 + "é".encode("latin-1") + b"y" * 50)
    with pytest.raises(DataError, match=re.escape(f"{path} is not valid UTF-8 (byte 50)")):
        load_corpus(f"text:{path}", 8)


# ---------------------------------------------------------------------------------------------
# bin:GLOB


def all_tokens(tokens) -> list[int]:
    """Every token of a 1-D token array (a tensor or :class:`TokenShards`), as ints."""
    return tokens[torch.arange(tokens.numel())].long().tolist()


def test_bin_shards_last_is_val_and_tokens_are_memory_mapped(tmp_path):
    write_shard(tmp_path / "shard_000.bin", list(range(100)))
    write_shard(tmp_path / "shard_001.bin", list(range(100, 150)))
    corpus = load_corpus(f"bin:{tmp_path}/shard_*.bin", 16)
    assert corpus.train.dtype == torch.uint16
    assert corpus.train.long().tolist() == list(range(100))
    assert corpus.val.long().tolist() == list(range(100, 150))
    assert corpus.vocab_size == GPT2_VOCAB
    assert is_memory_mapped(tmp_path / "shard_000.bin")


def test_bin_train_reads_all_but_the_last_shard_in_sorted_order_each_memory_mapped(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"s{i}.bin", [i] * 40)
    corpus = load_corpus(f"bin:{tmp_path}/*.bin", 16)
    assert isinstance(corpus.train, TokenShards)  # not concatenated into memory
    assert all_tokens(corpus.train) == [0] * 40 + [1] * 40
    assert all_tokens(corpus.val) == [2] * 40
    assert all(is_memory_mapped(tmp_path / f"s{i}.bin") for i in range(3))


def test_windows_over_shards_equal_windows_over_their_concatenation(tmp_path):
    """Random windows (some straddling a shard boundary) and eval windows of three shards are
    those of the concatenated array, token for token."""
    sizes = (50, 7, 90)
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"t{i}.bin", [(7 * k + i) % 500 for k in range(n)])
    sharded = load_corpus(f"bin:{tmp_path}/t*.bin", 8, val_source=f"bin:{tmp_path}/t0.bin").train
    joined = torch.tensor(all_tokens(sharded), dtype=torch.int64)
    assert joined.numel() == sum(sizes)
    a, b = BatchStream(sharded, 64, 8, seed=3), BatchStream(joined, 64, 8, seed=3)
    for _ in range(5):
        assert all(torch.equal(u, v) for u, v in zip(a.next(), b.next(), strict=True))
    for u, v in zip(eval_batches(sharded, 4, 8, 3), eval_batches(joined, 4, 8, 3), strict=True):
        assert all(torch.equal(p, q) for p, q in zip(u, v, strict=True))


def test_val_shards_beside_a_train_glob_are_the_val_set(tmp_path):
    """``data.val_source=auto`` with ``bin:…/fineweb_train_*.bin``: val is
    ``fineweb_val_*.bin``, and every train shard trains (none is held out)."""
    write_shard(tmp_path / "fineweb_val_000000.bin", [9] * 30)
    write_shard(tmp_path / "fineweb_train_000001.bin", [1] * 40)
    write_shard(tmp_path / "fineweb_train_000002.bin", [2] * 40)
    corpus = load_corpus(f"bin:{tmp_path}/fineweb_train_*.bin", 16)
    assert all_tokens(corpus.train) == [1] * 40 + [2] * 40
    assert all_tokens(corpus.val) == [9] * 30
    held_out = load_corpus(f"bin:{tmp_path}/fineweb_train_*.bin", 16, val_source="heldout")
    assert all_tokens(held_out.val) == [2] * 40


def test_val_source_reads_a_text_file_whole_and_the_source_trains_on_everything(tmp_path):
    (tmp_path / "train.txt").write_text("a" * 100)
    (tmp_path / "val.txt").write_text("b" * 30)
    corpus = load_corpus(f"text:{tmp_path}/train.txt", 16, val_source=f"text:{tmp_path}/val.txt")
    assert all_tokens(corpus.train) == [ord("a")] * 100
    assert all_tokens(corpus.val) == [ord("b")] * 30


def test_single_bin_shard_gives_its_last_tenth_to_val(tmp_path):
    write_shard(tmp_path / "only.bin", list(range(200)))
    corpus = load_corpus(f"bin:{tmp_path}/only.bin", 16)
    assert corpus.train.long().tolist() == list(range(180))
    assert corpus.val.long().tolist() == list(range(180, 200))


def test_tokens_past_the_model_vocabulary_stop_at_the_batch_that_holds_them(tmp_path):
    """Loading reads only the shards' headers (the vocabulary is GPT-2's, 50304): a token past
    ``model.vocab_size`` is caught in the first batch holding it, with the setting to change."""
    write_shard(tmp_path / "big.bin", [60000] + [0] * 199)
    corpus = load_corpus(f"bin:{tmp_path}/big.bin", 16)
    assert corpus.vocab_size == GPT2_VOCAB
    with pytest.raises(DataError, match="holds token 60000, past model.vocab_size=50304; set "
                       "model.vocab_size >= 60032"):  # fmt: skip
        eval_batches(corpus.train, 4, 16, 2, vocab_size=GPT2_VOCAB)
    stream = BatchStream(corpus.train, 8, 16, seed=0, vocab_size=60032)
    assert int(stream.next()[0].max()) < 60032


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magic": 1234}, "has magic 1234, expected 20240520"),
        ({"version": 2}, "has version 2, expected 1"),
        ({"count": 500}, "is 1224 bytes but its header says 500 tokens (2024 bytes)"),
    ],
)
def test_malformed_bin_shard_names_the_file_and_what_was_expected(tmp_path, kwargs, message):
    path = write_shard(tmp_path / "bad.bin", list(range(100)), **kwargs)
    with pytest.raises(DataError, match=re.escape(f"{path} {message}")):
        load_corpus(f"bin:{path}", 16)


def test_empty_bin_shard_names_the_file(tmp_path):
    (tmp_path / "empty.bin").touch()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/empty.bin is empty")):
        load_corpus(f"bin:{tmp_path}/*.bin", 16)


def test_bin_glob_without_matches_names_the_pattern(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"bin:{tmp_path}/*.bin matches no files")):
        load_corpus(f"bin:{tmp_path}/*.bin", 16)


def test_bin_val_shard_too_small_for_seq_len_says_how_many_tokens(tmp_path):
    write_shard(tmp_path / "a.bin", list(range(100)))
    write_shard(tmp_path / "b.bin", list(range(10)))
    with pytest.raises(DataError, match="has 10 val tokens but needs at least seq_len\\+1 = 17"):
        load_corpus(f"bin:{tmp_path}/*.bin", 16)


def test_unknown_source_lists_the_valid_forms():
    with pytest.raises(DataError, match="unknown corpus source 's3:x'.*embedded, text:PATH, bin"):
        load_corpus("s3:x", 16)


def test_hf_source_without_a_tokenizer_names_the_setting():
    with pytest.raises(DataError, match="data.source='hf:x' needs a tokenizer; set data.tokenizer"):
        load_corpus("hf:x", 16)


# ---------------------------------------------------------------------------------------------
# batches

TOKENS = torch.arange(1000, dtype=torch.int32) % 251


def test_batches_are_int64_windows_with_y_equal_to_x_shifted_by_one():
    x, y = BatchStream(TOKENS, batch_size=4, seq_len=8, seed=0).next()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, (x + 1) % 251)  # consecutive tokens of TOKENS


def test_same_seed_and_stream_give_identical_batches():
    a, b = BatchStream(TOKENS, 4, 8, seed=3, stream=1), BatchStream(TOKENS, 4, 8, seed=3, stream=1)
    for _ in range(3):
        assert torch.equal(a.next()[0], b.next()[0])


def test_different_streams_or_seeds_give_different_batches():
    base = BatchStream(TOKENS, 4, 8, seed=0, stream=0).next()[0]
    assert not torch.equal(base, BatchStream(TOKENS, 4, 8, seed=0, stream=1).next()[0])
    assert not torch.equal(base, BatchStream(TOKENS, 4, 8, seed=1, stream=0).next()[0])


def test_resumed_stream_continues_identically():
    stream = BatchStream(TOKENS, 4, 8, seed=0)
    stream.next()
    state = stream.state_dict()
    expected = [stream.next() for _ in range(3)]
    resumed = BatchStream(TOKENS, 4, 8, seed=0)
    resumed.load_state_dict(state)
    assert resumed.batches == 1
    for x, y in expected:
        rx, ry = resumed.next()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resuming_a_stream_with_other_settings_is_a_checkpoint_error():
    state = BatchStream(TOKENS, 4, 8, seed=0).state_dict()
    with pytest.raises(CheckpointError, match="seed=0 \\(now 5\\)"):
        BatchStream(TOKENS, 4, 8, seed=5).load_state_dict(state)


def test_windows_stay_inside_the_token_array():
    tokens = torch.arange(10, dtype=torch.uint8)
    stream = BatchStream(tokens, batch_size=64, seq_len=9, seed=0)
    x, y = stream.next()
    assert torch.equal(x, torch.arange(9).expand(64, 9))
    assert torch.equal(y, torch.arange(1, 10).expand(64, 9))


def test_shard_batch_gives_each_rank_its_contiguous_rows():
    x, y = BatchStream(TOKENS, 6, 8, seed=0).next()
    parts = [shard_batch(x, y, shard, 3) for shard in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(parts[1][1], y[2:4])


def test_shard_batch_rejects_a_batch_not_divisible_by_the_shards():
    x, y = BatchStream(TOKENS, 6, 8, seed=0).next()
    with pytest.raises(ValueError, match="batch size 6 is not divisible by 4"):
        shard_batch(x, y, 0, 4)


def test_eval_batches_are_fixed_and_evenly_spaced_from_start_to_end():
    batches = eval_batches(TOKENS, batch_size=2, seq_len=8, n_batches=3)
    assert len(batches) == 3 and batches[0][0].shape == (2, 8)
    starts = torch.cat([x[:, 0] for x, _ in batches])
    assert starts.tolist() == [(i * 991 // 5) % 251 for i in range(6)]
    last_y = batches[-1][1][-1]
    assert torch.equal(last_y, TOKENS[-8:].long())
    again = eval_batches(TOKENS, batch_size=2, seq_len=8, n_batches=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))

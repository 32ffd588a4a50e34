"""Tasks and data: layouts, determinism, streams, exact evaluation, TFDS, bad input."""

from __future__ import annotations

import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from lstm_lab import tasks
from lstm_lab.cli import main
from lstm_lab.data import StreamBatcher, Vocab, eval_stream_batches, split_contiguous


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------
# copy
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 10, 57, 200])
def test_copy_layout_and_baseline(T):
    task = tasks.get("copy", T=T, eval_size=37)
    b = next(task.batches("train", batch_size=16, seed=3))
    assert b.inputs.shape == b.targets.shape == b.weights.shape == (16, T + 20)
    assert b.inputs.dtype == b.targets.dtype == np.int32 and b.weights.dtype == np.float32
    x, y = b.inputs, b.targets
    assert np.all((x[:, :10] >= 1) & (x[:, :10] <= 8))
    assert np.all(x[:, 10:T + 9] == 0) and np.all(x[:, T + 9] == 9) and np.all(x[:, T + 10:] == 0)
    assert np.all(y[:, :T + 10] == 0) and np.array_equal(y[:, T + 10:], x[:, :10])
    expected = 10 * math.log(8) / (T + 20)
    assert task.baseline["loss"] == pytest.approx(expected, abs=1e-12)
    # the memoryless predictor's cross-entropy on generated data, through the task's own loss
    loss = float(task.loss(task.baseline_outputs(b.arrays()), b.arrays()))
    assert loss == pytest.approx(expected, abs=1e-6)
    for bs in (8, 37, 64):  # exact whatever the batching: 37 examples, padded batches
        metrics = task.evaluate(lambda batch: task.baseline_outputs(batch.arrays()), "test", bs)
        assert metrics["loss"] == pytest.approx(expected, abs=1e-6)
        assert metrics["loss_over_baseline"] == pytest.approx(1.0, abs=1e-5)
    assert sum(b.weights.sum() for b in task.batches("valid", batch_size=8)) == 37 * (T + 20)


def test_copy_accuracy_of_a_perfect_predictor():
    task = tasks.get("copy", T=5, eval_size=10)
    metrics = task.evaluate(lambda b: jnp.eye(10)[b.targets] * 50.0, "valid", 4)
    assert metrics["accuracy_last10"] == 1.0 and metrics["loss"] < 1e-6


# ---------------------------------------------------------------------------
# adding
# ---------------------------------------------------------------------------
def test_adding_layout_and_baseline():
    task = tasks.get("adding", T=40, eval_size=3000)
    b = next(task.batches("train", batch_size=32, seed=0))
    assert b.inputs.shape == (32, 40, 2) and b.inputs.dtype == np.float32
    assert b.targets.shape == b.weights.shape == (32,) and b.targets.dtype == np.float32
    marker = b.inputs[..., 1]
    assert np.all(marker.sum(1) == 2) and np.all(marker[:, :20].sum(1) == 1) and np.all(marker[:, 20:].sum(1) == 1)
    np.testing.assert_allclose(b.targets, (b.inputs[..., 0] * marker).sum(1), rtol=1e-6)
    assert np.all((b.inputs[..., 0] >= 0) & (b.inputs[..., 0] < 1))
    mse = task.evaluate(lambda batch: task.baseline_outputs(batch.arrays()), "valid", 256)["mse"]
    assert task.baseline["mse"] == pytest.approx(1 / 6)
    assert mse == pytest.approx(1 / 6, abs=0.015)  # 3000 samples
    perfect = task.evaluate(lambda batch: np.broadcast_to(batch.targets[:, None, None], (len(batch.targets), 40, 1)),
                            "test", 128)
    assert perfect["mse"] < 1e-12


@pytest.mark.parametrize("name,opts", [("copy", {"T": 7}), ("adding", {"T": 9})])
def test_generated_tasks_are_deterministic_and_resumable(name, opts):
    task = tasks.get(name, **opts)
    a = _take(task.batches("train", batch_size=4, seed=5), 6)
    b = _take(task.batches("train", batch_size=4, seed=5), 6)
    c = _take(task.batches("train", batch_size=4, seed=6), 6)
    resumed = _take(task.batches("train", batch_size=4, seed=5, start_step=4), 2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.inputs, y.inputs)
    assert not np.array_equal(a[0].inputs, c[0].inputs)
    assert not np.array_equal(a[0].inputs, a[1].inputs)
    np.testing.assert_array_equal(resumed[0].inputs, a[4].inputs)
    assert resumed[1].step == 5
    # eval sets do not depend on the training seed and are the same every time
    v1 = task.batches("valid", batch_size=10)
    v2 = tasks.get(name, **opts).batches("valid", batch_size=10)
    np.testing.assert_array_equal(v1[0].inputs, v2[0].inputs)
    assert not np.array_equal(task.batches("test", batch_size=10)[0].inputs, v1[0].inputs)


# ---------------------------------------------------------------------------
# language-model batching
# ---------------------------------------------------------------------------
def test_stream_batcher_continues_streams_and_moves_epoch_offsets():
    tokens = np.arange(1000, dtype=np.int32)
    sb = StreamBatcher(tokens, batch_size=4, seq_len=7, seed=1)
    data = tokens[:1000].reshape(4, 250)
    assert sb.windows_per_epoch == 249 // 7 and sb.slack == 249 - 35 * 7
    batches = _take(sb(), 2 * sb.windows_per_epoch + 1)
    for k in range(sb.windows_per_epoch - 1):  # within an epoch each stream continues
        np.testing.assert_array_equal(batches[k + 1].inputs[:, 0], batches[k].targets[:, -1])
        np.testing.assert_array_equal(batches[k].targets, batches[k].inputs + 1)
        assert not batches[k + 1].reset
    assert batches[0].reset and batches[sb.windows_per_epoch].reset
    for b in batches:  # every window is a contiguous slice of its row
        start = b.inputs[0, 0] - data[0, 0]
        np.testing.assert_array_equal(b.inputs, data[:, start:start + 7])
    offsets = {sb.offset(e) for e in range(20)}
    assert len(offsets) > 1 and all(0 <= o <= sb.slack for o in offsets)
    np.testing.assert_array_equal(next(sb(start_step=40)).inputs, batches[40].inputs)


@pytest.mark.parametrize("n,B,T", [(2, 1, 1), (100, 3, 7), (101, 4, 200), (5, 8, 2), (1000, 10, 10)])
def test_eval_scores_every_target_exactly_once_in_order(n, B, T):
    tokens = np.random.default_rng(n).integers(0, 50, n).astype(np.int32)
    batches = eval_stream_batches(tokens, B, T)
    assert all(b.inputs.shape == (B, T) for b in batches) and batches[0].reset and not any(b.reset for b in batches[1:])
    w = np.concatenate([b.weights for b in batches], axis=1)
    x = np.concatenate([b.inputs for b in batches], axis=1)
    y = np.concatenate([b.targets for b in batches], axis=1)
    assert w.sum() == n - 1
    np.testing.assert_array_equal(x[w == 1], tokens[:-1])  # row-major order is the original order
    np.testing.assert_array_equal(y[w == 1], tokens[1:])
    assert np.all(x[w == 0] == 0)


def test_stream_batcher_rejects_windows_longer_than_the_split():
    with pytest.raises(ValueError, match=r"train split has 50 tokens: 5 streams of 10 tokens cannot fill one window "
                                         r"of seq_len=10 .*at most 9.*at most 4"):
        StreamBatcher(np.arange(50), batch_size=5, seq_len=10)
    # no batch size fits: the hint must not say "batch_size (at most 0)"
    with pytest.raises(ValueError, match=r"Use a smaller seq_len \(at most 4 at batch_size=4\)\.$") as e:
        StreamBatcher(np.arange(20), batch_size=4, seq_len=30)
    assert "at most 0" not in str(e.value)
    with pytest.raises(ValueError, match=r"Use seq_len at most 2 with batch_size=1\.$"):
        StreamBatcher(np.arange(3), batch_size=4, seq_len=30)


# ---------------------------------------------------------------------------
# char_lm and word_lm
# ---------------------------------------------------------------------------
@pytest.fixture
def small_text(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog"]
    text = "\n".join(" ".join(rng.choice(words, 6)) for _ in range(400)) + "\nZ"  # 'Z' only in the test split
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_char_lm_vocab_from_train_unknowns_and_saving(small_text, tmp_path):
    task = tasks.get("char_lm", path=str(small_text), seq_len=16)
    assert task.input_size == task.output_size == len(task.vocab) == 1 + len(set("the cat sat on a mat and dog\n"))
    assert "Z" not in task.vocab.index and task.tokens["test"][-1] == 0  # unseen -> reserved id 0
    sizes = task.split_sizes()
    n = small_text.read_text().__len__()
    assert sum(sizes.values()) == n and sizes["train"] == round(0.9 * n)
    assert task.vocab.decode(task.tokens["train"][:20]) == small_text.read_text()[:20]
    task.save(tmp_path)
    again = tasks.get("char_lm", path=str(small_text), seq_len=16, vocab_path=str(tmp_path / "vocab.json"))
    assert again.vocab == task.vocab
    np.testing.assert_array_equal(again.tokens["valid"], task.tokens["valid"])
    b = next(task.batches("train", batch_size=4, seed=0))
    assert b.inputs.shape == b.targets.shape == (4, 16) and b.inputs.dtype == np.int32
    custom = tasks.get("char_lm", path=str(small_text), splits=(0.5, 0.25, 0.25))
    assert custom.split_sizes()["valid"] == pytest.approx(n / 4, abs=1)


def test_lm_evaluation_is_exact_for_any_batching(small_text):
    task = tasks.get("char_lm", path=str(small_text), seq_len=9)
    counts = np.bincount(task.tokens["train"], minlength=len(task.vocab)) + 1.0
    logits = jnp.log(counts / counts.sum())
    results = [task.evaluate(lambda b: jnp.broadcast_to(logits, (*b.inputs.shape, len(logits))), "valid", bs)
               for bs in (1, 7, 64)]
    for r in results:
        assert r["tokens"] == task.split_sizes()["valid"] - 1
        assert r["loss"] == pytest.approx(task.baseline["loss"], rel=1e-5)
        assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2))


def test_char_lm_on_tiny_shakespeare(shared_data):
    task = tasks.get("char_lm", path=str(shared_data / "tinyshakespeare.txt"), seq_len=100)
    info = task.describe()
    assert info["distinct_characters"] == 65 and info["vocab_size"] == 66
    assert sum(info["splits"].values()) == 1_115_394
    import time
    start = time.perf_counter()  # one epoch of batches, made (not timed as an assertion)
    it = task.batches("train", batch_size=64, seed=0)
    n = task._batchers[(64, 0)].windows_per_epoch
    total = sum(int(next(it).weights.sum()) for _ in range(n))
    assert total == n * 64 * 100
    print(f"one epoch of Tiny Shakespeare batches: {time.perf_counter() - start:.3f}s")


def test_lm_data_cli_on_tiny_shakespeare(shared_data, capsys):
    assert main(["data", "char_lm", "--path", str(shared_data / "tinyshakespeare.txt")]) == 0
    out = capsys.readouterr().out
    assert "distinct characters in the corpus: 65" in out
    assert "train 1,003,855 | valid 55,769 | test 55,770 tokens" in out


@pytest.fixture
def ptb_dir(tmp_path):
    d = tmp_path / "ptb"
    d.mkdir()
    (d / "ptb.train.txt").write_text(" the cat sat \n the dog sat on the mat \n a <unk> sat \n" * 30)
    (d / "ptb.valid.txt").write_text(" the cat sat on a mat \n the bird sat \n")
    (d / "ptb.test.txt").write_text(" a dog \n")
    return d


def test_word_lm_ptb_format(ptb_dir):
    task = tasks.get("word_lm", path=str(ptb_dir), seq_len=5)
    v = task.vocab
    assert v.tokens[0] == "<unk>" and "<eos>" in v.index and "bird" not in v.index
    # train: 30 x (3 + 1, 6 + 1, 3 + 1) words with <eos>; valid 7 + 4; test 3
    assert task.split_sizes() == {"train": 30 * 15, "valid": 11, "test": 3}
    assert v.decode(task.tokens["valid"]) == "the cat sat on a mat <eos> the <unk> sat <eos>"
    assert task.tokens["train"][:4].tolist() == [v.index[w] for w in ("the", "cat", "sat", "<eos>")]
    small = tasks.get("word_lm", path=str(ptb_dir), max_vocab=4)
    assert len(small.vocab) == 4 and small.vocab.tokens[:2] == ["<unk>", "<eos>"]
    r = task.evaluate(lambda b: jnp.zeros((*b.inputs.shape, len(v))), "valid", 2)
    assert r["perplexity"] == pytest.approx(len(v), rel=1e-5) and r["tokens"] == 10


# ---------------------------------------------------------------------------
# TFDS (mock data; no TensorFlow, no download)
# ---------------------------------------------------------------------------
def test_tfds_char_and_word_lm_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        task = tasks.get("char_lm", path="tfds:tiny_shakespeare", seq_len=4)
        words = tasks.get("word_lm", path="tfds:lm1b", seq_len=3)
    assert all(n > 10 for n in task.split_sizes().values())
    assert next(task.batches("train", batch_size=2)).inputs.shape == (2, 4)
    assert words.vocab.tokens[:2] == ["<unk>", "<eos>"] and words.split_sizes()["train"] > 4
    assert "tensorflow" not in sys.modules


def test_tfds_text_decodes_bytes_and_str():
    from lstm_lab.data.text import _decode
    assert _decode(b"caf\xc3\xa9") == "café" == _decode("café") == _decode(np.array(b"caf\xc3\xa9", dtype=object))


def test_tfds_not_prepared_offline_says_what_to_do(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match=r"not prepared in .*never downloads.*download_and_prepare.*local text file"):
        tasks.get("char_lm", path="tfds:tiny_shakespeare", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_sources(tmp_path, ptb_dir):
    with pytest.raises(FileNotFoundError, match=r"'/no/such/file.txt' does not exist"):
        tasks.get("char_lm", path="/no/such/file.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.txt' is empty"):
        tasks.get("char_lm", path=str(empty))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abcdefghijklmnopqrst")
    with pytest.raises(ValueError, match=r"the test split of .*tiny.txt.* 0 of 20 characters"):
        tasks.get("char_lm", path=str(tiny), splits=(0.9, 0.1, 0.0))
    with pytest.raises(ValueError, match=r"three non-negative numbers .* summing to 1"):
        split_contiguous("abc", (0.5, 0.2, 0.2))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("plain ascii then caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid UTF-8: byte 0xe9 at offset 20 .*encoding='bytes'"):
        tasks.get("char_lm", path=str(bad))
    bytewise = tasks.get("char_lm", path=str(bad), encoding="bytes", splits=(0.8, 0.1, 0.1), seq_len=2)
    assert len(bytewise.vocab) == 257 and bytewise.tokens["test"][-1] == 0xE9 + 1
    (ptb_dir / "ptb.valid.txt").unlink()
    (ptb_dir / "ptb.test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \*\.valid\.txt, \*\.test\.txt"):
        tasks.get("word_lm", path=str(ptb_dir))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        tasks.get("word_lm", path=str(tmp_path / "nowhere"))


def test_window_longer_than_split(small_text):
    task = tasks.get("char_lm", path=str(small_text), seq_len=5000)
    with pytest.raises(ValueError, match=r"cannot fill one window of seq_len=5000"):
        next(task.batches("train", batch_size=2))


def test_unknown_task_and_option_names():
    with pytest.raises(ValueError, match=r"unknown task 'char-lm'.*Did you mean 'char_lm'"):
        tasks.get("char-lm")
    with pytest.raises(ValueError, match=r"task 'copy' has no option 't'; its options are T, eval_size, eval_seed"):
        tasks.get("copy", t=5)
    with pytest.raises(ValueError, match=r"has no option 'seqlen'.*Did you mean 'seq_len'"):
        tasks.get("char_lm", path="x", seqlen=5)
    with pytest.raises(ValueError, match=r"needs option\(s\) path"):
        tasks.get("word_lm")
    with pytest.raises(ValueError, match=r"T must be an int >= 1; got 0"):
        tasks.get("copy", T=0)
    with pytest.raises(ValueError, match=r"unknown split 'validation'"):
        tasks.get("copy").batches("validation", batch_size=2)


def test_registering_a_task_of_your_own():
    @tasks.register("constant_test_task")
    class Constant(tasks.CopyTask):
        name = "constant_test_task"

    assert "constant_test_task" in tasks.names()
    assert isinstance(tasks.get("constant_test_task", T=3), Constant)

    @tasks.register("copy_short_test_task")
    def copy_short(T: int = 2):
        return tasks.CopyTask(T=T)

    assert tasks.get("copy_short_test_task").T == 2
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("copy")(copy_short)


def test_data_cli_errors_name_the_problem(capsys):
    assert main(["data", "copy", "--delya", "3"]) == 2
    assert "no option 'delya'" in capsys.readouterr().err
    assert main(["data", "copy", "--T", "5"]) == 0
    out = capsys.readouterr().out
    assert "baseline (memoryless predictor): loss 0.8318" in out and "input  " in out


def test_vocab_roundtrip_and_errors(tmp_path):
    v = Vocab.from_words(["b", "a", "b", "<unk>", "c", "c", "c"], specials=("<eos>",))
    assert v.tokens == ["<unk>", "<eos>", "c", "b", "a"]
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == v
    with pytest.raises(ValueError, match="id 0 must be the unknown token"):
        Vocab(["a", "<unk>"])


def test_prefetch_keeps_order_and_raises_producer_errors():
    from lstm_lab.data import prefetch

    task = tasks.get("copy", T=3)
    direct = _take(task.batches("train", batch_size=2, seed=1), 5)
    with prefetch(task.batches("train", batch_size=2, seed=1), size=3) as it:
        ahead = _take(it, 5)
    for a, b in zip(direct, ahead):
        np.testing.assert_array_equal(a.inputs, b.inputs)

    def broken():
        yield 1
        raise RuntimeError("producer failed at item 2")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="producer failed at item 2"):
        next(it)

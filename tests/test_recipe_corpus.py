"""The recipes' offline corpus, tokenizers and token windows (no training)."""

import pytest
import torch

from recipes import corpus


@pytest.fixture(scope="module")
def docs():
    return corpus.stdlib_documents(max_chars=150_000)


def test_stdlib_corpus_is_local_deterministic_and_includes_pydoc_topics(docs):
    assert docs == corpus.stdlib_documents(max_chars=150_000)
    assert 150_000 <= sum(len(t) for _, t in docs) < 300_000
    assert len({name for name, _ in docs}) == len(docs)
    everything = corpus.stdlib_documents()
    topics = [n for n, _ in everything if n.startswith("pydoc_data/topics/")]
    assert len(topics) > 20 and len(everything) > len(docs)


def test_cached_documents_equal_a_fresh_build(tmp_path, docs):
    first = corpus.cached_stdlib_documents(tmp_path, max_chars=150_000)
    assert first == docs
    assert corpus.cached_stdlib_documents(tmp_path, max_chars=150_000) == docs  # from the file
    assert len(list(tmp_path.glob("stdlib-docs-*.json"))) == 1


def test_split_is_fixed_by_document_name():
    docs = [(f"doc{i}", f"text of document {i}") for i in range(1000)]
    train, val = corpus.split_documents(docs, 0.1)
    assert 60 < len(val) < 140 and len(train) + len(val) == 1000
    train2, val2 = corpus.split_documents(docs[::-1] + [("new", "another text")], 0.1)
    assert set(val) <= set(val2) and set(train) <= set(train2)  # no document changes side
    with pytest.raises(ValueError, match="empty split"):
        corpus.split_documents(docs[:2], 0.0001)


def test_bpe_is_trained_locally_deterministic_and_cached(tmp_path, docs, monkeypatch):
    texts = [t for _, t in docs]
    a = corpus.make_tokenizer("bpe", texts, 300, tmp_path / "a")
    b = corpus.make_tokenizer("bpe", texts, 300, tmp_path / "b")
    assert a.vocab_size == 300 and a.tok.to_str() == b.tok.to_str()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr("tokenizers.ByteLevelBPETokenizer.train_from_iterator", no_training)
    c = corpus.make_tokenizer("bpe", texts, 300, tmp_path / "a")
    assert c.tok.to_str() == a.tok.to_str()
    ids = c.encode_batch(["hello world", "x"])
    assert ids[0][-1] == c.eos_id == ids[1][-1] and all(i < 300 for i in ids[0])
    assert corpus.make_tokenizer(str(next((tmp_path / "a").glob("bpe-*.json"))), None, 0,
                                 tmp_path).tok.to_str() == a.tok.to_str()


def test_byte_tokenizer_and_cached_token_streams(tmp_path):
    tok = corpus.make_tokenizer("bytes", None, 0, tmp_path)
    assert tok.vocab_size == 256 and tok.encode_batch(["ab"]) == [[97, 98, 10, 10]]
    train, val = corpus.cached_token_streams(tok, ["abc", "de"], ["f"], tmp_path)
    assert train.tolist() == [97, 98, 99, 10, 10, 100, 101, 10, 10] and val.tolist() == [
        102, 10, 10]
    again = corpus.cached_token_streams(tok, ["abc", "de"], ["f"], tmp_path)
    assert torch.equal(again[0], train) and len(list(tmp_path.glob("tokens-*.pt"))) == 1


def test_local_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "sub" / "a.txt").write_text("first")
    docs = corpus.file_documents([str(tmp_path / "**" / "*.txt")])
    assert [t for _, t in docs] == ["second", "first"]  # sorted by path
    with pytest.raises(FileNotFoundError, match="No file matches"):
        corpus.file_documents([str(tmp_path / "*.md")])
    with pytest.raises(ValueError, match="streamed dataset"):
        corpus.make_tokenizer("bpe", None, 300, tmp_path)


def test_packed_windows_sample_index_is_the_whole_data_position():
    tokens = torch.arange(1000, dtype=torch.int32)
    w = corpus.PackedWindows(tokens, 10, seed=3)
    assert len(w) == 100
    batch = w.samples(0, 8)
    assert batch.dtype == torch.long and batch.shape == (8, 10)
    assert (batch[:, 1:] - batch[:, :-1] == 1).all() and (batch[:, 0] % 10 == 0).all()
    # ranks read disjoint slices of one order; a resumed run continues at an index
    assert torch.equal(torch.cat([w.samples(0, 4), w.samples(4, 4)]), batch)
    assert torch.equal(corpus.PackedWindows(tokens, 10, seed=3).samples(37, 5), w.samples(37, 5))
    epoch0, epoch1 = w.window_ids(0, 100), w.window_ids(100, 100)
    assert sorted(epoch0) == sorted(epoch1) == list(range(100)) and epoch0 != epoch1
    assert corpus.PackedWindows(tokens, 10, seed=4).window_ids(0, 100) != epoch0
    assert corpus.PackedWindows(tokens, 10, shuffle=False).window_ids(5, 3) == [5, 6, 7]
    with pytest.raises(ValueError, match="make no window"):
        corpus.PackedWindows(tokens[:5], 10)


def test_streaming_windows_resume_equals_continuation():
    texts = [f"document number {i} " * (i % 5 + 1) for i in range(60)]
    tok = corpus.ByteTokenizer()
    stream = corpus.StreamingWindows(lambda: iter(texts), tok, 16, batch_docs=7)
    first, second = stream.samples(0, 5), stream.samples(5, 3)
    resumed = corpus.StreamingWindows(lambda: iter(texts), tok, 16, batch_docs=3)
    assert torch.equal(resumed.samples(5, 3), second)  # skips to the saved position
    assert torch.equal(stream.samples(0, 5), first)  # going back restarts the stream
    packed = corpus.PackedWindows(corpus.encode_documents(tok, texts), 16, shuffle=False)
    assert torch.equal(packed.samples(0, 8), torch.cat([first, second]))
    with pytest.raises(EOFError, match="stream ended"):
        stream.samples(10_000, 1)

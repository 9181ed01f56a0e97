import pytest

from depthkit.data import AUSTEN_BOOKS, DataSpec, interleaved_blocks, token_blocks, token_stream
from depthkit.data.blocks import split_text
from depthkit.data.corpora import load_documents
from depthkit.errors import DepthkitError
from depthkit.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def test_splits_do_not_overlap_and_cover_the_text():
    text = "".join(f"line {i} of a document\n" for i in range(1000))
    calib, heldout = split_text(text, "calib"), split_text(text, "heldout")
    assert calib + heldout == text
    assert calib.endswith("\n") and 0.75 < len(calib) / len(text) < 0.85
    assert not set(calib.splitlines()) & set(heldout.splitlines())


def test_unknown_split_is_refused():
    with pytest.raises(DepthkitError, match="unknown split"):
        split_text("abc", "test")


def test_local_text_file_blocks(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text("It is a truth universally acknowledged.\n" * 200)
    blocks = token_blocks(tokenizer, DataSpec(str(path), "all"), num_blocks=4, block_len=32)
    assert blocks.shape == (4, 32)
    assert tokenizer.decode(blocks[0]).startswith("It is a truth")


def test_text_too_short_says_how_much(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Too short.\n")
    with pytest.raises(DepthkitError, match=r"text too short: asked for 2 x 64 = 128 tokens"):
        token_blocks(tokenizer, DataSpec(str(path), "all"), num_blocks=2, block_len=64)


def test_unknown_corpus_and_unfetched_source(tmp_path, monkeypatch):
    with pytest.raises(DepthkitError, match="unknown corpus 'no-such-book'"):
        load_documents("no-such-book")
    monkeypatch.setenv("DEPTHKIT_CACHE", str(tmp_path))
    with pytest.raises(DepthkitError, match="run: depthkit fetch austen"):
        load_documents("austen:emma")


def test_austen_books_and_member_errors(tokenizer):
    docs = load_documents("austen")
    assert len(docs) == 6 and all(len(d.text) > 300_000 for d in docs)
    with pytest.raises(DepthkitError, match="no document 'ulysses'"):
        load_documents("austen:ulysses")
    calib = token_stream(tokenizer, DataSpec("austen:persuasion", "calib"))
    heldout = token_stream(tokenizer, DataSpec("austen:persuasion", "heldout"))
    assert 3.5 < calib.numel() / heldout.numel() < 4.5


def test_shakespeare_plays_are_available():
    (hamlet,) = load_documents("shakespeare:hamlet")
    assert "Elsinore" in hamlet.text


def test_interleaved_blocks_take_turns_over_the_documents(tokenizer):
    blocks = interleaved_blocks(tokenizer, DataSpec("austen", "heldout"), num_blocks=8, block_len=32)
    assert blocks.shape == (8, 32)
    firsts = [token_stream(tokenizer, DataSpec(f"austen:{name}", "heldout"))[:64] for name in AUSTEN_BOOKS]
    for index, ids in enumerate(firsts):  # blocks 0-5: each book's first block, blocks 6-7: its second
        assert blocks[index].tolist() == ids[:32].tolist()
    assert blocks[6].tolist() == firsts[0][32:].tolist() and blocks[7].tolist() == firsts[1][32:].tolist()


def test_interleaved_blocks_too_short_names_the_document(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Too short.\n")
    with pytest.raises(DepthkitError, match=r"asked for 2 x 64 tokens from 'short"):
        interleaved_blocks(tokenizer, DataSpec(str(path), "all"), num_blocks=2, block_len=64)

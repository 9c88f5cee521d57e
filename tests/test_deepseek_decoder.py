"""The DeepSeek-MoE decoder on a tiny config: RoPE, MoE routing, KV cache, weight tying."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.deepseek_ocr.config import DecoderConfig, DeepseekOcrConfig
from models.deepseek_ocr.decoder import TextModel, TextMoe, apply_rotary_pos_emb
from models.deepseek_ocr.kv_cache import CacheCapacityError, KVCache
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM, VisionSpanMismatch


@pytest.fixture
def config() -> DecoderConfig:
    return DeepseekOcrConfig.tiny(vocab_size=97).decoder


@pytest.fixture
def text_model(config: DecoderConfig) -> TextModel:
    torch.manual_seed(0)
    model = TextModel(config).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced weight shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def test_rope_rotates_each_half_pair_by_position_times_frequency(config: DecoderConfig) -> None:
    """Rotate-half RoPE: dims i and i + D/2 form one complex number rotated by p * theta^(-2i/D)
    (not the interleaved pairing of the MLA code path)."""
    model = TextModel(config)
    head_dim = config.head_dim
    positions = torch.tensor([[0, 1, 7, 300]])
    cos, sin = model.rotary_emb(positions, torch.float64)
    x = torch.randn(
        1, 1, 4, head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    rotated = apply_rotary_pos_emb(x, cos, sin)

    half = head_dim // 2
    frequencies = config.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angles = positions[0, :, None].double() * frequencies  # (T, D/2)
    expected = torch.view_as_real(
        torch.complex(x[0, 0, :, :half], x[0, 0, :, half:])
        * torch.polar(torch.ones_like(angles), angles)
    )  # (T, D/2, 2): real, imaginary
    # The frequencies are float32 as in the official code: ~1e-5 off at position 300, while a
    # wrong pairing would be off by O(1).
    assert torch.allclose(rotated[0, 0, :, :half], expected[..., 0], atol=1e-4)
    assert torch.allclose(rotated[0, 0, :, half:], expected[..., 1], atol=1e-4)


def test_rope_attention_scores_depend_only_on_relative_position(config: DecoderConfig) -> None:
    model = TextModel(config)
    generator = torch.Generator().manual_seed(0)  # fixed draws: the second check needs a gap
    q, k = torch.randn(2, 1, 1, 1, config.head_dim, dtype=torch.float64, generator=generator)

    def score(query_position: int, key_position: int) -> float:
        cos, sin = model.rotary_emb(torch.tensor([[query_position, key_position]]), torch.float64)
        rotated_q = apply_rotary_pos_emb(q, cos[:, :1], sin[:, :1])
        rotated_k = apply_rotary_pos_emb(k, cos[:, 1:], sin[:, 1:])
        return float((rotated_q * rotated_k).sum())

    assert score(10, 3) == pytest.approx(score(107, 100), abs=1e-5)  # fp32 angles
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def naive_moe(moe: TextMoe, hidden_states: torch.Tensor) -> torch.Tensor:
    """The reference's routing written out token by token and expert by expert."""
    config_top_k = moe.gate.top_k
    output = torch.zeros_like(hidden_states)
    for index, token in enumerate(hidden_states):
        scores = F.softmax(token.float() @ moe.gate.weight.float().T, dim=-1)
        weights, experts = torch.topk(scores, config_top_k)
        for weight, expert in zip(weights, experts, strict=True):
            mlp = moe.experts[int(expert)]
            output[index] += (
                weight
                * mlp.down_proj.weight
                @ (F.silu(mlp.gate_proj.weight @ token) * (mlp.up_proj.weight @ token))
            )
        output[index] += moe.shared_experts(token[None])[0]
    return output


def test_moe_matches_token_by_token_reference_without_renormalisation(
    text_model: TextModel,
) -> None:
    moe = text_model.layers[1].mlp
    assert isinstance(moe, TextMoe)
    hidden_states = torch.randn(3, 5, moe.gate.weight.shape[1])
    with torch.no_grad():
        routed = moe(hidden_states)
        expected = naive_moe(moe, hidden_states.reshape(15, -1)).view(3, 5, -1)
        _, weights = moe.gate(hidden_states.reshape(15, -1))
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    assert bool((weights.sum(dim=-1) < 1 - 1e-3).all()), "top-k weights must not be renormalised"


def test_expert_weights_stay_views_of_the_stacks_through_dtype_moves_and_loading(
    text_model: TextModel,
) -> None:
    experts = text_model.layers[1].mlp.experts
    text_model.to(torch.float64)
    assert experts.gate_up_stack.dtype == torch.float64
    assert experts[1].up_proj.weight.data_ptr() == experts.gate_up_stack[1, 32:].data_ptr()

    state = {name: torch.full_like(t, 0.5) for name, t in text_model.state_dict().items()}
    state["layers.1.mlp.experts.2.down_proj.weight"] = torch.full_like(
        state["layers.1.mlp.experts.2.down_proj.weight"], 3.0
    )
    text_model.load_state_dict(state, assign=True)
    assert bool((experts.down_stack[2] == 3.0).all())
    assert experts[2].down_proj.weight.data_ptr() == experts.down_stack[2].data_ptr()


def test_kv_cache_decoding_of_ragged_batch_equals_full_forward(
    text_model: TextModel, config: DecoderConfig
) -> None:
    """Right-padded prefill of prompts of 4, 9 and 6 tokens, then 3 decode steps, with the
    middle sequence moved to another slot halfway, equals one causal forward per sequence."""
    torch.manual_seed(1)
    lengths = [4, 9, 6]
    sequences = [torch.randn(n + 3, config.hidden_size) for n in lengths]
    with torch.no_grad():
        expected = [text_model(s[None])[0] for s in sequences]
        cache = KVCache(
            num_layers=config.num_hidden_layers,
            num_slots=4,
            capacity=16,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=torch.float32,
            device="cpu",
        )
        padded = torch.zeros(3, max(lengths), config.hidden_size)
        for row, (sequence, length) in enumerate(zip(sequences, lengths, strict=True)):
            padded[row, :length] = sequence[:length]
        prefill = text_model(padded, cache_step=cache.prefill_step(0, lengths))
        for row, length in enumerate(lengths):
            torch.testing.assert_close(prefill[row, :length], expected[row][:length])

        order = [0, 1, 2]
        for step in range(3):
            if step == 1:  # continuous batching: slot 1 moves to slot 3 and back
                cache.move_slot(1, 3)
                cache.move_slot(3, 1)
            tokens = torch.stack([sequences[i][lengths[i] + step] for i in order])[:, None]
            out = text_model(tokens, cache_step=cache.decode_step(0, 3))
            for row, i in enumerate(order):
                torch.testing.assert_close(out[row, 0], expected[i][lengths[i] + step])
    assert cache.lengths[:3] == [7, 12, 9]


def test_kv_cache_refuses_steps_past_its_capacity(config: DecoderConfig) -> None:
    cache = KVCache(
        num_layers=1,
        num_slots=2,
        capacity=8,
        num_kv_heads=1,
        head_dim=4,
        dtype=torch.float32,
        device="cpu",
    )
    cache.prefill_step(0, [8])
    with pytest.raises(CacheCapacityError, match="capacity is 8"):
        cache.decode_step(0, 1)
    with pytest.raises(CacheCapacityError, match="cache has 2"):
        cache.prefill_step(1, [2, 2])


def test_vision_span_count_mismatch_names_both_numbers() -> None:
    model = DeepseekOcrForCausalLM(DeepseekOcrConfig.tiny(vocab_size=64))
    input_ids = torch.zeros(1, 6, dtype=torch.long)
    mask = torch.tensor([[False, True, True, True, False, False]])
    span = torch.zeros(2, model.config.decoder.hidden_size)
    with pytest.raises(VisionSpanMismatch, match="placeholders 3, vision features 2"):
        model.model.embed_with_images(input_ids, mask, [span])


def test_vision_span_lands_on_placeholders_in_order() -> None:
    model = DeepseekOcrForCausalLM(DeepseekOcrConfig.tiny(vocab_size=64))
    hidden = model.config.decoder.hidden_size
    input_ids = torch.tensor([[5, 9, 9, 7], [9, 6, 9, 9]])
    mask = input_ids == 9
    spans = [torch.full((2, hidden), 1.0), torch.arange(3.0)[:, None].expand(3, hidden) + 10]
    with torch.no_grad():
        embeds = model.model.embed_with_images(input_ids, mask, spans)
    assert embeds[0, 1:3].eq(1.0).all()
    assert embeds[1, [0, 2, 3], 0].tolist() == [10.0, 11.0, 12.0]
    assert torch.equal(embeds[1, 1], model.model.embed_tokens.weight[6])
    assert math.isclose(
        float(embeds[0, 0, 0]), float(model.model.embed_tokens.weight[5, 0].detach())
    )

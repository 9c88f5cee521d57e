"""The DeepSeek-MoE text decoder of DeepSeek-OCR (DeepSeek-3B-MoE-A570M without MLA).

Numerics follow the official remote code (DeepSeek-V2 modelling, Llama attention):
RMSNorm in float32 with the weight applied after the cast back; rotate-half RoPE; causal
attention over the whole sequence, image positions included; layer 0 a dense SwiGLU MLP,
later layers a mixture of experts with a float32 softmax router, greedy top-k without
renormalisation, and shared experts added unweighted.

Module and parameter names match the checkpoint keys (`layers.{i}.self_attn.q_proj`,
`mlp.experts.{e}.gate_proj`, ...), so the official state dict loads without renaming.

Legend: B batch rows, T tokens per row, C hidden size, H attention heads, D head dim,
E routed experts, K experts per token, N = B*T tokens, I expert width.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.deepseek_ocr.config import DecoderConfig
from models.deepseek_ocr.decode_attention import (
    DecodeAttention,
    decode_attention,
    decode_attention_path,
)
from models.deepseek_ocr.expert_kernels import (
    ExpertKernel,
    align_assignments,
    block_rows,
    choose_expert_kernel,
    expert_matmul,
)
from models.deepseek_ocr.kv_cache import CacheStep

# Causal (prefill) attention without cuDNN: PyTorch's cuDNN SDPA backend keeps a compiled graph
# per distinct input shape in an unbounded per-thread host cache, and prefill shapes (rows x
# prompt length) vary without bound in a long-running worker, so host memory would keep growing.
# The flash and memory-efficient kernels cache nothing (on CPU this is flash or math, as before).
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class TextRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        # The weight multiplies after the cast back, as in the reference (matters in bf16).
        return self.weight * hidden_states.to(input_dtype)


class TextRotaryEmbedding(nn.Module):
    """Llama's default RoPE tables, computed per call.

    No `inv_freq` buffer: the checkpoint has none, and a model built on the meta device and
    then loaded would otherwise keep an uninitialised one.
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, T)` positions -> cos, sin of shape `(B, T, D)` in `dtype`."""
        exponents = torch.arange(0, self.head_dim, 2, device=position_ids.device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))  # (D/2,)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `(B, H, T, D)` queries or keys; cos/sin are `(B, T, D)`."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    return x * cos + rotate_half(x) * sin


class TextAttention(nn.Module):
    """Multi-head attention with rotate-half RoPE (Llama's, which the reference uses when
    `use_mla` is false).

    Prefill runs PyTorch's causal SDPA (flash, memory-efficient or math kernels). A decode step
    of one token per row runs, where `decode_kernel` selects it (`decode_attention`), the
    split-K Triton kernel that reads only each row's own cached keys; else masked SDPA over the
    step's padded key range.
    """

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, kv_width = config.hidden_size, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_width, bias=False)
        self.v_proj = nn.Linear(hidden, kv_width, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        # Decode-step attention path; None: the OCRFLOW_DECODE_ATTENTION setting, read per call.
        self.decode_kernel: DecodeAttention | None = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache_step: CacheStep | None = None,
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim)
        key = self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, T, D)
        cos, sin = rotary
        query = apply_rotary_pos_emb(query, cos, sin)
        key = apply_rotary_pos_emb(key, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if cache_step is not None:
            key, value = cache_step.update(self.layer_idx, key, value)
        if cache_step is None or cache_step.is_prefill:
            with sdpa_kernel(PREFILL_BACKENDS):
                output = F.scaled_dot_product_attention(
                    query, key, value, is_causal=True, enable_gqa=gqa
                )  # (B, H, T, D)
        elif (
            T == 1
            and decode_attention_path(query.device, self.decode_kernel) is DecodeAttention.TRITON
        ):
            # key/value: (B, H, key_length, D) cache views; each row reads its own prefix only.
            output = decode_attention(query, key, value, cache_step.row_lengths)
        else:
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=cache_step.attention_mask, enable_gqa=gqa
            )
        return self.o_proj(output.transpose(1, 2).reshape(B, T, -1))


class TextMLP(nn.Module):
    """SwiGLU MLP: the dense layers, each routed expert and the fused shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class TextExperts(nn.ModuleList):
    """The routed experts: one `TextMLP` per expert under the checkpoint's names, computed together.

    Every expert's weights are views into two stacked tensors, `gate_up_stack` `(E, 2I, C)`
    and `down_stack` `(E, C, I)`, so one grouped matmul per projection runs all selected
    experts and reads each of them once per step, without a Python loop over experts. The views
    are re-tied after anything that replaces parameter storage (`.to()`, `to_empty()`, loading
    with `assign=True`). `kernel` picks the grouped matmul (`expert_kernels`): PyTorch's fused
    one where it exists, else the portable Triton one, unless set otherwise.
    """

    def __init__(self, config: DecoderConfig) -> None:
        width = config.moe_intermediate_size
        super().__init__(TextMLP(config.hidden_size, width) for _ in range(config.n_routed_experts))
        self.intermediate_size = width
        self.kernel = ExpertKernel.AUTO
        self.gate_up_stack = torch.empty(0)
        self.down_stack = torch.empty(0)
        self.tie_stacked_weights()
        self.register_load_state_dict_post_hook(lambda module, _: module.tie_stacked_weights())

    def _apply(self, fn: Any, recurse: bool = True) -> TextExperts:
        super()._apply(fn, recurse)
        self.tie_stacked_weights()
        return self

    def _expert_weights(self) -> list[torch.Tensor]:
        """Every expert's gate, up and down weights, in stack order."""
        return [w for e in self for w in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]

    def _stack_views(self) -> list[torch.Tensor]:
        """The slices of the stacks that the expert weights should be, in the same order."""
        width = self.intermediate_size
        return [
            view
            for index in range(len(self))
            for view in (
                self.gate_up_stack[index, :width],
                self.gate_up_stack[index, width:],
                self.down_stack[index],
            )
        ]

    @torch.no_grad()
    def tie_stacked_weights(self) -> None:
        """Copy the experts' weights into fresh stacks and point each expert at its slice.

        Does nothing when they are tied already, or while a sharded load has filled only some
        experts (they sit on different devices); the next load or `.to()` ties them.
        """
        weights = self._expert_weights()
        if len({(w.device, w.dtype) for w in weights}) > 1:
            return
        if len(self.gate_up_stack) == len(self) and all(
            w.device == v.device and w.data_ptr() == v.data_ptr() and not w.is_meta
            for w, v in zip(weights, self._stack_views(), strict=True)
        ):
            return
        self.gate_up_stack = torch.stack(
            [torch.cat((e.gate_proj.weight, e.up_proj.weight)) for e in self]
        )  # (E, 2I, C)
        self.down_stack = torch.stack([e.down_proj.weight for e in self])  # (E, C, I)
        views = self._stack_views()
        for index, expert in enumerate(self):
            gate, up, down = views[3 * index : 3 * index + 3]
            requires_grad = expert.gate_proj.weight.requires_grad
            expert.gate_proj.weight = nn.Parameter(gate, requires_grad)
            expert.up_proj.weight = nn.Parameter(up, requires_grad)
            expert.down_proj.weight = nn.Parameter(down, requires_grad)

    def forward(
        self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """`(N, C)` tokens, their `(N, K)` experts and float32 weights -> `(N, C)`.

        Each expert's output stays in the model dtype; the weighted sum over K runs in float32
        and is cast back, as in the reference.
        """
        N, K = expert_ids.shape
        kernel = choose_expert_kernel(self.kernel, hidden_states.device, hidden_states.dtype)
        if kernel is ExpertKernel.PORTABLE:
            expert_out = self._portable(hidden_states, expert_ids)
        else:
            expert_out = self._grouped(hidden_states, expert_ids)
        weighted = expert_out.view(N, K, -1).float() * expert_weights[..., None]  # (N, K, C)
        return weighted.sum(dim=1).to(hidden_states.dtype)

    def _grouped(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """PyTorch's grouped matmul over the assignments sorted by expert -> `(N*K, C)`."""
        K = expert_ids.shape[1]
        num_experts = self.gate_up_stack.shape[0]
        flat_ids = expert_ids.reshape(-1)  # (N*K,)
        order = flat_ids.argsort(stable=True)  # assignments grouped by expert
        group_ends = torch.searchsorted(
            flat_ids[order], torch.arange(num_experts, device=flat_ids.device), right=True
        ).to(torch.int32)  # (E,) end of each expert's group
        tokens = hidden_states[order // K]  # (N*K, C)
        gate_up = F.grouped_mm(tokens, self.gate_up_stack.transpose(1, 2), offs=group_ends)
        gate, up = gate_up.chunk(2, dim=-1)  # (N*K, I) each
        sorted_out = F.grouped_mm(
            F.silu(gate) * up, self.down_stack.transpose(1, 2), offs=group_ends
        )
        expert_out = torch.empty_like(sorted_out)
        expert_out[order] = sorted_out  # back to (token, k) order
        return expert_out

    def _portable(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The Triton grouped GEMM: no host sync, so CUDA graphs capture it -> `(N*K, C)`."""
        N, K = expert_ids.shape
        num_experts = self.gate_up_stack.shape[0]
        block_m = block_rows(N * K, num_experts)
        rows, block_experts = align_assignments(expert_ids, num_experts, block_m)
        common = dict(num_assignments=N * K, block_m=block_m)
        gate_up = expert_matmul(
            hidden_states, self.gate_up_stack, rows, block_experts, rows_per_input=K, **common
        )  # (N*K, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        return expert_matmul(
            F.silu(gate) * up, self.down_stack, rows, block_experts, rows_per_input=1, **common
        )


class TextTopkRouter(nn.Module):
    """Greedy top-k over a float32 softmax; weights scaled, not renormalised (the reference's
    `norm_topk_prob` false and `routed_scaling_factor` 1.0)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(N, C)` -> expert ids `(N, K)` and float32 weights `(N, K)`."""
        logits = F.linear(hidden_states.float(), self.weight.float())  # (N, E)
        scores = logits.softmax(dim=-1)
        weights, expert_ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return expert_ids, weights * self.routed_scaling_factor


class TextMoe(nn.Module):
    """Routed experts plus the shared experts (one MLP `n_shared` times an expert's width)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate = TextTopkRouter(config)
        self.experts = TextExperts(config)
        self.shared_experts = (
            TextMLP(config.hidden_size, config.shared_expert_intermediate_size)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, C = hidden_states.shape
        tokens = hidden_states.reshape(B * T, C)  # (N, C)
        expert_ids, expert_weights = self.gate(tokens)
        output = self.experts(tokens, expert_ids, expert_weights).view(B, T, C)
        if self.shared_experts is not None:
            output = output + self.shared_experts(hidden_states)
        return output


class TextDecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TextAttention(config, layer_idx)
        self.mlp: nn.Module = (
            TextMoe(config)
            if config.mlp_layer_types[layer_idx] == "moe"
            else TextMLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = TextRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache_step: CacheStep | None = None,
    ) -> torch.Tensor:
        # Self attention
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), rotary, cache_step)
        hidden_states = residual + hidden_states
        # Fully connected
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class TextModel(nn.Module):
    """Token embeddings, decoder layers and the final norm (the `model.*` decoder keys)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.init_decoder(config)

    def init_decoder(self, config: DecoderConfig) -> None:
        """Create the decoder's submodules (split out so a subclass that is also a vision
        encoder can place them beside its own, as the checkpoint does under `model.`)."""
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TextDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = TextRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = TextRotaryEmbedding(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache_step: CacheStep | None = None,
    ) -> torch.Tensor:
        """`(B, T, C)` embeddings -> `(B, T, C)` final-norm hidden states.

        Without a cache step the pass is a plain causal forward from position 0; with one, the
        step supplies the positions and the keys to attend to.
        """
        if cache_step is not None:
            position_ids = cache_step.position_ids
        elif position_ids is None:
            B, T, _ = inputs_embeds.shape
            position_ids = torch.arange(T, device=inputs_embeds.device).expand(B, T)
        rotary = self.rotary_emb(position_ids, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, cache_step)
        return self.norm(hidden_states)


__all__ = [
    "TextAttention",
    "TextDecoderLayer",
    "TextExperts",
    "TextMLP",
    "TextModel",
    "TextMoe",
    "TextRMSNorm",
    "TextRotaryEmbedding",
    "TextTopkRouter",
]

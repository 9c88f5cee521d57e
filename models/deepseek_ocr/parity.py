"""Parity check of the port against a golden set of the official implementation.

    python -m models.deepseek_ocr.parity GOLDEN_DIR [--cases A_tiny,B_small] [--json]
        [--device cuda] [--dtype bfloat16|float16] [--expert-kernel auto|grouped|portable]

Everything about the set comes from the set itself (`README.md` of the shared parity folder):
`index.json` (formula constants, pages, cases and modes, prompt ids, generation settings,
tolerances), `config.json` (the model) and `state_dict_manifest.tsv` (keys, shapes, SHA-256).
The command writes the formula checkpoint with the checkpoint writer, loads it through the
strict loader, runs the port's own preprocessing, vision encoder, decoder and generation on
every case, and compares every stored tensor. Exit status 0 only if every item passes, 1 if
any fails, 2 if the set cannot be run.

`--device cuda --dtype bfloat16` checks the production configuration instead: weights loaded in
bfloat16 on the GPU, views cast to bfloat16 as the official `infer()` does, decoding through the
CUDA-graph path, compared with the set's bfloat16 tolerances (README §8). `--dtype float16`
(GPUs without bfloat16) and `--dtype float32` run the same path; `--expert-kernel portable`
forces the portable MoE kernel (`expert_kernels`) on a GPU that has the fused one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from models.deepseek_ocr import formula_weights
from models.deepseek_ocr.checkpoint import (
    DTYPES,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    weight_files,
)
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation import generate
from models.deepseek_ocr.generation_types import GenerationSettings, encode_pages
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import (
    PageInputs,
    normalize_pixels,
    orient_rgb,
    prepare_page_from_ids,
)

# The port's module behind each stage name the golden taps use (`tap.<stage>[.<view>]`).
VISION_TAP_STAGES = ("sam", "clip", "projector")
# README §8: in a run of lower precision than the set's, greedy ids are decided only up to the
# first step whose golden top-2 logit margin is below this (index.json does not carry it).
NEAR_TIE_MARGIN = 0.1
# Greedy ids and the per-step logits that chose them; the latter are comparable only while the
# port's ids agree with the golden ones (the next step's context differs otherwise).
GENERATED_IDS, PER_STEP_LOGITS = "gen_ids", ("gen_logits", "gen_scores")


class ParityError(ValueError):
    """A golden set this command cannot run (a formula it does not implement, a missing file)."""


@dataclass(frozen=True)
class Tolerance:
    """`|port - golden| <= atol + rtol * |golden|` per element, or exact equality, or (for a
    lower-precision run, where single elements are noisy) bounds on the whole tensor: relative
    L2 error `||port - golden|| / ||golden||`, cosine similarity and largest absolute error."""

    exact: bool = False
    atol: float = 0.0
    rtol: float = 0.0
    rel_l2: float | None = None
    cosine: float | None = None
    max_abs: float | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, float]) -> Tolerance:
        """One entry of `index.json["tolerances"][dtype]`, e.g. `{"rel_l2": 0.04, ...}`."""
        known = {f.name for f in fields(cls)} - {"exact"}
        if not spec or set(spec) - known:
            raise ParityError(f"tolerance {spec} has none or unknown bounds (known: {known})")
        return cls(**spec)

    @property
    def whole_tensor(self) -> bool:
        return any(bound is not None for bound in (self.rel_l2, self.cosine, self.max_abs))

    def describe(self) -> str:
        if self.exact:
            return "exact"
        if not self.whole_tensor:
            return f"atol {self.atol:g} rtol {self.rtol:g}"
        bounds = (("relL2", self.rel_l2), ("cos", self.cosine), ("maxabs", self.max_abs))
        return " ".join(f"{name} {bound:g}" for name, bound in bounds if bound is not None)


@dataclass(frozen=True)
class ItemResult:
    case: str
    item: str
    max_abs: float
    max_rel: float  # max_abs over the golden tensor's largest magnitude
    tolerance: str
    passed: bool
    detail: str = ""
    rel_l2: float | None = None  # whole-tensor statistics, measured for whole-tensor bounds
    cosine: float | None = None


class GoldenSet:
    """A golden folder: its index, model config, manifest and per-case tensors.

    `dtype` picks the tolerances of a port run in that dtype (default: the set's own). A lower
    precision's table may list fewer entries (bfloat16: `vision_span` and `logits`); the others
    (exact items, pixel views) are the set's own, and `near_tie_margin` is set.
    """

    def __init__(self, directory: str | Path, dtype: str | None = None) -> None:
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise ParityError(f"no index.json in {self.directory}")
        self.index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        self.config = DeepseekOcrConfig.from_official_json(self.directory / "config.json")
        self.manifest_path = self.directory / "state_dict_manifest.tsv"
        self.dtype = dtype or self.index["dtype"]
        if self.dtype not in self.index["tolerances"]:
            raise ParityError(
                f"the set has no {self.dtype} tolerances (only {list(self.index['tolerances'])})"
            )
        self.set_tolerances: dict[str, Any] = self.index["tolerances"][self.index["dtype"]]
        self.tolerances: dict[str, Any] = self.set_tolerances | self.index["tolerances"][self.dtype]
        self.near_tie_margin = None if self.dtype == self.index["dtype"] else NEAR_TIE_MARGIN

    @property
    def case_names(self) -> list[str]:
        return list(self.index["cases"])

    def case(self, name: str) -> dict[str, Any]:
        return self.index["cases"][name]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.directory / self.case(name)["file"])

    def page_image(self, page: str) -> Image.Image:
        spec = self.index["pages"][page]
        image = orient_rgb(Image.open(self.directory / spec["file"]))
        digest = hashlib.sha256(np.asarray(image, dtype=np.uint8).tobytes()).hexdigest()
        if digest != spec["sha256_rgb_uint8"]:
            raise ParityError(f"page {page}: pixels do not match the index's SHA-256")
        return image

    def tolerance(self, item: str) -> Tolerance:
        """Exact for the listed items; else the longest tolerance key of the run's dtype that
        prefixes the item (`tap.layer0` -> `tap.layer`); else, for an activation the set's own
        table has a key for (`tap.sam` in bfloat16), the vision span's; else the logits'
        (logits, scores, final norm)."""
        if item in self.tolerances["exact"]:
            return Tolerance(exact=True)
        dtype_table = self.index["tolerances"][self.dtype]
        key = longest_prefix_key(dtype_table, item)
        if key is None:
            key = "vision_span" if longest_prefix_key(self.set_tolerances, item) else "logits"
        return Tolerance.from_spec(dtype_table[key])


def longest_prefix_key(table: dict[str, Any], item: str) -> str | None:
    """The longest key of a tolerance table (its dict entries) that prefixes `item`, or None."""
    matches = [k for k, v in table.items() if isinstance(v, dict) and item.startswith(k)]
    return max(matches, key=len) if matches else None


def check_formula_constants(formula: dict[str, Any]) -> None:
    """Refuse a set whose weight formula differs from the one `formula_weights` implements."""
    implemented = {
        "mult": formula_weights.WEYL_MULTIPLIER,
        "smult": formula_weights.SEED_MULTIPLIER,
        "mix": "fmix32",
        "norm_gain": formula_weights.NORM_GAIN,
        "small_gain": formula_weights.SMALL_GAIN,
    }
    differing = {k: (formula.get(k), v) for k, v in implemented.items() if formula.get(k) != v}
    if differing:
        raise ParityError(f"golden formula differs from the generator's (set, ours): {differing}")


def load_formula_model(
    golden: GoldenSet,
    workdir: Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DeepseekOcrForCausalLM:
    """Write the formula checkpoint of the set's manifest and load it strictly, as the engine
    does: built on the meta device, then every tensor loaded onto `device` in `dtype`."""
    check_formula_constants(golden.index["formula"])
    raw_config = json.loads((golden.directory / "config.json").read_text(encoding="utf-8"))
    save_checkpoint(workdir, raw_config, read_manifest(golden.manifest_path))
    with torch.device("meta"):
        model = DeepseekOcrForCausalLM(golden.config)
    load_checkpoint(model, workdir, device=device, dtype=dtype)
    return model.eval()


def float32_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.float().numpy().astype("<f4").tobytes()).hexdigest()


def check_weight_hashes(model: nn.Module, manifest_path: Path, checkpoint_dir: Path) -> ItemResult:
    """The written checkpoint against the manifest's SHA-256 column (float32 little-endian
    bytes), and every loaded weight against its checkpoint tensor cast to the model's dtype."""
    expected = {}
    for line in manifest_path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            columns = line.split("\t")
            expected[columns[0]] = columns[-1]
    state = model.state_dict()
    correct = set()
    for file in weight_files(checkpoint_dir):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                stored, loaded = handle.get_tensor(name), state[name]
                if float32_sha256(stored) == expected.get(name) and torch.equal(
                    loaded.cpu(), stored.to(loaded.dtype)
                ):
                    correct.add(name)
    wrong = [name for name in expected if name not in correct]
    detail = f"{len(wrong)} of {len(expected)} differ" + (f": {wrong[:3]}" if wrong else "")
    return ItemResult("weights", "sha256", float(len(wrong)), 0.0, "exact", not wrong, detail)


def compare(case: str, item: str, port: Any, golden: Any, tolerance: Tolerance) -> ItemResult:
    """Compare one item; infinities must agree in place and sign (a banned logit stays -inf)."""
    port_t = torch.as_tensor(port).detach().cpu().double()
    golden_t = torch.as_tensor(golden).detach().cpu().double()
    if port_t.shape != golden_t.shape:
        detail = f"shape {list(port_t.shape)} vs golden {list(golden_t.shape)}"
        return ItemResult(
            case, item, float("inf"), float("inf"), tolerance.describe(), False, detail
        )
    same = port_t == golden_t  # also equal infinities
    diff = torch.where(same, 0.0, (port_t - golden_t).abs())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    finite = golden_t[torch.isfinite(golden_t)].abs()
    scale = float(finite.max()) if finite.numel() else 0.0
    max_rel = max_abs / scale if scale else max_abs
    if tolerance.exact:
        passed = bool(same.all())
    elif tolerance.whole_tensor:
        return compare_whole_tensor(case, item, port_t, golden_t, max_abs, max_rel, tolerance)
    else:
        magnitude = torch.where(torch.isfinite(golden_t), golden_t.abs(), 0.0)
        bound = tolerance.atol + tolerance.rtol * magnitude
        passed = bool((diff <= bound).all())
    return ItemResult(case, item, max_abs, max_rel, tolerance.describe(), passed)


def compare_whole_tensor(
    case: str,
    item: str,
    port: torch.Tensor,
    golden: torch.Tensor,
    max_abs: float,
    max_rel: float,
    tolerance: Tolerance,
) -> ItemResult:
    """Relative L2 error and cosine over the finite golden elements, against the bounds set;
    `max_abs` (already infinite where infinities disagree) against its bound when there is one."""
    finite = torch.isfinite(golden)
    port_f, golden_f = port[finite], golden[finite]
    golden_norm, port_norm = float(golden_f.norm()), float(port_f.norm())
    error_norm = float((port_f - golden_f).norm())  # nan/inf if the port is not finite there
    rel_l2 = error_norm / golden_norm if golden_norm else error_norm
    norms = golden_norm * port_norm
    cosine = float(port_f @ golden_f) / norms if norms else float(golden_norm == port_norm)
    checks = [
        max_abs < float("inf"),
        tolerance.rel_l2 is None or rel_l2 <= tolerance.rel_l2,
        tolerance.cosine is None or cosine >= tolerance.cosine,
        tolerance.max_abs is None or max_abs <= tolerance.max_abs,
    ]
    return ItemResult(
        case, item, max_abs, max_rel, tolerance.describe(), all(checks), "", rel_l2, cosine
    )


def compare_views(case: str, page: PageInputs, views: list[dict[str, Any]], sum_rel: float):
    """Pixel views against the index's sums and samples (exact samples, sums to `sum_rel`)."""
    results = []
    for spec in views:
        role = spec["role"]
        if spec.get("all_zero"):  # the reference's zero `images_crop` stand-in: no tiles
            results.append(compare(case, f"views.{role}", len(page.tiles), 0, Tolerance(True)))
            continue
        tile = role.removeprefix("tile")
        pixels = page.global_view if role == "global" else page.tiles[int(tile)]
        view = normalize_pixels(pixels)  # the official views are normalised floats
        if list(view.shape) != spec["shape"]:
            detail = f"shape {list(view.shape)} vs golden {spec['shape']}"
            results.append(ItemResult(case, f"views.{role}", float("inf"), 0, "", False, detail))
            continue
        flat = view.flatten()
        samples = flat[torch.tensor(spec["sample_idx"])]
        sample_vals = torch.tensor(spec["sample_vals"], dtype=torch.float32)
        results.append(
            compare(case, f"views.{role}.samples", samples, sample_vals, Tolerance(True))
        )
        sums = torch.stack([flat.double().sum(), flat.double().square().sum()])
        golden_sums = torch.tensor([spec["sum"], spec["sum_sq"]], dtype=torch.float64)
        results.append(
            compare(case, f"views.{role}.sums", sums, golden_sums, Tolerance(rtol=sum_rel))
        )
    return results


@contextmanager
def capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record every output of the named modules while the context is open, in call order."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: outputs[name].append(out))
        for name, module in modules.items()
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def run_case(model: DeepseekOcrForCausalLM, golden: GoldenSet, name: str) -> list[ItemResult]:
    """Preprocess, encode, generate and teacher-force one case; compare everything stored."""
    case, stored = golden.case(name), golden.tensors(name)
    prompt, generation = golden.index["prompt"], golden.index["generation"]
    page = prepare_page_from_ids(
        golden.page_image(case["page"]),
        case["mode"],
        prompt["prefix_ids"],
        prompt["suffix_ids"],
        bos_id=prompt["bos"],
        image_token_id=prompt["placeholder_id"],
    )
    port: dict[str, Any] = {
        "input_ids": page.input_ids,
        "images_seq_mask": page.images_seq_mask,
        "images_spatial_crop": torch.tensor([page.tile_grid]),
        "n_placeholders": page.n_placeholders,
        "valid_img_tokens": page.valid_vision_tokens,
    }
    inner = model.model
    vision_modules = dict(
        zip(VISION_TAP_STAGES, (inner.sam_model, inner.vision_model, inner.projector), strict=True)
    )
    with torch.inference_mode(), capture_outputs(vision_modules) as vision:
        span = encode_pages(model, [page])[0]
    port["vision_span"] = span
    # Stages run group by group (views of one size together); the global view's group is the
    # call whose SAM output has the global grid.
    global_side = golden.config.tokens_per_side(page.global_view.shape[-1])
    call = next(i for i, out in enumerate(vision["sam"]) if out.shape[-1] == global_side)
    for stage in VISION_TAP_STAGES:
        port[f"tap.{stage}.global"] = vision[stage][call][:1]

    settings = GenerationSettings(
        max_new_tokens=generation["max_new_tokens"],
        eos_token_id=generation["eos_token_id"],
        ngram_size=generation.get("no_repeat_ngram_size", 0),
        ngram_window=None,  # whole generated text, like HF's processor (which also sees the prompt)
        keep_logits=True,
    )
    result = generate(model, [page], settings, vision_spans=[span])[0]
    port |= {
        "gen_ids": torch.tensor(result.token_ids),
        "gen_logits": result.logits,
        "gen_scores": result.scores,
        "logits_prompt_last": result.logits[0],
    }

    # Teacher forcing over prompt + golden ids; causality makes its first L positions the prefill.
    length, device = len(page.input_ids), span.device
    forced_ids = torch.cat([page.input_ids, stored["gen_ids"]])[None].to(device)
    forced_mask = torch.cat(
        [page.images_seq_mask, torch.zeros_like(stored["gen_ids"], dtype=torch.bool)]
    )[None].to(device)
    layers = {f"layer{i}": layer for i, layer in enumerate(inner.layers)}
    with torch.inference_mode(), capture_outputs(layers | {"final_norm": inner.norm}) as taps:
        logits = model(forced_ids, forced_mask, [span])[0]  # (L + n, V)
    port["tf_logits"] = logits[length - 1 : length - 1 + len(stored["gen_ids"])]
    port |= {f"tap.{k}": v[0][0, :length] for k, v in taps.items()}
    port["tap.lm_head"] = logits[:length]

    results = compare_views(name, page, case["views"], golden.tolerances["pixel_views"]["sum_rel"])
    for item in ("n_placeholders", "valid_img_tokens"):
        results.append(compare(name, item, port[item], case[item], golden.tolerance(item)))
    details: dict[str, str] = {}
    if golden.near_tie_margin is not None:
        margins = case["top2_margin_per_step"]
        details = keep_decided_steps(port, stored, margins, golden.near_tie_margin)
    for item, expected in stored.items():
        if item not in port:
            results.append(ItemResult(name, item, float("inf"), 0, "", False, "not produced"))
            continue
        result = compare(name, item, port[item], expected, golden.tolerance(item))
        results.append(replace(result, detail=details.get(item, result.detail)))
    return results


def decided_steps(
    port_ids: Sequence[int], golden_ids: Sequence[int], margins: Sequence[float], near_tie: float
) -> tuple[int, int]:
    """README §8 for a lower-precision run: `(ids, logits)` = how many leading greedy ids must
    equal the golden ones (up to the first step whose golden top-2 margin is below `near_tie`,
    where rounding may flip the pick), and how many leading per-step logits rows are comparable
    (those before the first step whose id differs, whose context is still the golden one)."""
    ids = next((step for step, margin in enumerate(margins) if margin < near_tie), len(margins))
    pairs = zip(port_ids, golden_ids, strict=False)
    agreeing = next(
        (step for step, (ours, theirs) in enumerate(pairs) if ours != theirs),
        min(len(port_ids), len(golden_ids)),
    )
    return ids, agreeing


def keep_decided_steps(
    port: dict[str, Any], stored: dict[str, torch.Tensor], margins: list[float], near_tie: float
) -> dict[str, str]:
    """Cut the generated ids and per-step logits, both sides, to the steps `decided_steps`
    keeps; return the detail line of each cut item."""
    port_ids, golden_ids = port[GENERATED_IDS].tolist(), stored[GENERATED_IDS].tolist()
    ids, agreeing = decided_steps(port_ids, golden_ids, margins, near_tie)
    total = len(golden_ids)
    near = f"margin {margins[ids]:.2g} < {near_tie:g} at step {ids}" if ids < total else "no tie"
    details = {GENERATED_IDS: f"first {ids} of {total} steps ({near})"}
    for side in (port, stored):
        side[GENERATED_IDS] = side[GENERATED_IDS][:ids]
    differ = f"ids differ from step {agreeing}" if agreeing < total else "all ids agree"
    for item in PER_STEP_LOGITS:
        if item in port and item in stored:
            for side in (port, stored):
                side[item] = side[item][:agreeing]
            details[item] = f"first {agreeing} of {total} steps ({differ})"
    return details


def run_parity(
    directory: str | Path,
    cases: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    expert_kernel: str = "auto",
) -> list[ItemResult]:
    """Every item of the chosen cases, with the model on `device` in `dtype` (experts on
    `expert_kernel`) and the set's tolerances for that dtype."""
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ParityError(f"not a torch device: {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParityError(f"device {device} asked for, but CUDA is not available")
    golden = GoldenSet(directory, str(dtype).removeprefix("torch."))
    unknown = sorted(set(cases or ()) - set(golden.case_names))
    if unknown:
        raise ParityError(f"unknown cases {unknown}; the set has {golden.case_names}")
    with tempfile.TemporaryDirectory(prefix="parity-ckpt-") as workdir:
        model = load_formula_model(golden, Path(workdir), device, dtype)
        model.set_expert_kernel(expert_kernel)
        results = [check_weight_hashes(model, golden.manifest_path, Path(workdir))]
    for name in cases or golden.case_names:
        results += run_case(model, golden, name)
    return results


def format_table(results: Sequence[ItemResult]) -> str:
    header = f"{'case':<10} {'item':<34} {'max_abs':>10} {'max_rel':>10}  {'tolerance':<22} result"
    rows = [
        f"{r.case:<10} {r.item:<34} {r.max_abs:>10.3g} {r.max_rel:>10.3g}  {r.tolerance:<22} "
        f"{'PASS' if r.passed else 'FAIL'}{'  ' + r.detail if r.detail else ''}"
        + (f"  relL2 {r.rel_l2:.3g} cos {r.cosine:.6f}" if r.rel_l2 is not None else "")
        for r in results
    ]
    failed = sum(not r.passed for r in results)
    summary = f"{len(results) - failed} of {len(results)} items pass" + (
        f", {failed} FAIL" if failed else ""
    )
    return "\n".join([header, *rows, summary])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.deepseek_ocr.parity",
        description="Compare the DeepSeek-OCR port with a golden set of the official code.",
    )
    parser.add_argument("golden_dir", type=Path, help="folder with index.json, config.json, ...")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="weights and views in this dtype, checked with the set's tolerances for it",
    )
    parser.add_argument(
        "--expert-kernel",
        choices=["auto", "grouped", "portable"],
        default="auto",
        help="MoE matmul: auto picks PyTorch's fused grouped kernel where it exists",
    )
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c] if args.cases else None
    started = time.perf_counter()
    try:
        results = run_parity(
            args.golden_dir, cases, args.device, DTYPES[args.dtype], args.expert_kernel
        )
    except ParityError as error:
        print(f"parity: {error}", file=sys.stderr)
        return 2
    passed = all(r.passed for r in results)
    if args.json:
        payload = {
            "passed": passed,
            "seconds": round(time.perf_counter() - started, 1),
            # Unmeasured statistics left out, so a float32 run's items keep their fields.
            "items": [{k: v for k, v in asdict(r).items() if v is not None} for r in results],
        }
        print(json.dumps(payload, indent=1))
    else:
        print(format_table(results))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

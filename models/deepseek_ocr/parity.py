"""Parity check of the port against a golden set of the official implementation.

    python -m models.deepseek_ocr.parity GOLDEN_DIR [--cases A_tiny,B_small] [--json]

Everything about the set comes from the set itself (`README.md` of the shared parity folder):
`index.json` (formula constants, pages, cases and modes, prompt ids, generation settings,
tolerances), `config.json` (the model) and `state_dict_manifest.tsv` (keys, shapes, SHA-256).
The command writes the formula checkpoint with the checkpoint writer, loads it through the
strict loader, runs the port's own preprocessing, vision encoder, decoder and generation on
every case, and compares every stored tensor. Exit status 0 only if every item passes, 1 if
any fails, 2 if the set cannot be run.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from models.deepseek_ocr import formula_weights
from models.deepseek_ocr.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from models.deepseek_ocr.config import DeepseekOcrConfig
from models.deepseek_ocr.generation import GenerationSettings, encode_pages, generate
from models.deepseek_ocr.modeling import DeepseekOcrForCausalLM
from models.deepseek_ocr.processor import PageInputs, orient_rgb, prepare_page_from_ids

# The port's module behind each stage name the golden taps use (`tap.<stage>[.<view>]`).
VISION_TAP_STAGES = ("sam", "clip", "projector")


class ParityError(ValueError):
    """A golden set this command cannot run (a formula it does not implement, a missing file)."""


@dataclass(frozen=True)
class Tolerance:
    """`|port - golden| <= atol + rtol * |golden|` per element, or exact equality."""

    exact: bool = False
    atol: float = 0.0
    rtol: float = 0.0

    def describe(self) -> str:
        return "exact" if self.exact else f"atol {self.atol:g} rtol {self.rtol:g}"


@dataclass(frozen=True)
class ItemResult:
    case: str
    item: str
    max_abs: float
    max_rel: float  # max_abs over the golden tensor's largest magnitude
    tolerance: str
    passed: bool
    detail: str = ""


class GoldenSet:
    """A golden folder: its index, model config, manifest and per-case tensors."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise ParityError(f"no index.json in {self.directory}")
        self.index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        self.config = DeepseekOcrConfig.from_official_json(self.directory / "config.json")
        self.manifest_path = self.directory / "state_dict_manifest.tsv"
        self.tolerances: dict[str, Any] = self.index["tolerances"][self.index["dtype"]]

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
        """Exact for the listed items; else the longest tolerance key that prefixes the item
        (`tap.layer0` -> `tap.layer`); else the logits tolerance (logits, scores, final norm)."""
        if item in self.tolerances["exact"]:
            return Tolerance(exact=True)
        keys = [k for k in self.tolerances if isinstance(self.tolerances[k], dict)]
        matches = [k for k in keys if item.startswith(k)]
        spec = self.tolerances[max(matches, key=len) if matches else "logits"]
        return Tolerance(atol=spec["atol"], rtol=spec["rtol"])


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


def load_formula_model(golden: GoldenSet, workdir: Path) -> DeepseekOcrForCausalLM:
    """Write the formula checkpoint of the set's manifest and load it strictly, in float32."""
    check_formula_constants(golden.index["formula"])
    raw_config = json.loads((golden.directory / "config.json").read_text(encoding="utf-8"))
    save_checkpoint(workdir, raw_config, read_manifest(golden.manifest_path))
    with torch.device("meta"):
        model = DeepseekOcrForCausalLM(golden.config)
    load_checkpoint(model, workdir, device="cpu", dtype=torch.float32)
    return model.eval()


def check_weight_hashes(model: nn.Module, manifest_path: Path) -> ItemResult:
    """The loaded weights against the manifest's SHA-256 column (float32 little-endian bytes)."""
    expected = {}
    for line in manifest_path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            columns = line.split("\t")
            expected[columns[0]] = columns[-1]
    state = model.state_dict()
    wrong = [
        name
        for name, digest in expected.items()
        if hashlib.sha256(state[name].float().numpy().astype("<f4").tobytes()).hexdigest() != digest
    ]
    detail = f"{len(wrong)} of {len(expected)} differ" + (f": {wrong[:3]}" if wrong else "")
    return ItemResult("weights", "sha256", float(len(wrong)), 0.0, "exact", not wrong, detail)


def compare(case: str, item: str, port: Any, golden: Any, tolerance: Tolerance) -> ItemResult:
    """Compare one item; infinities must agree in place and sign (a banned logit stays -inf)."""
    port_t = torch.as_tensor(port).double()
    golden_t = torch.as_tensor(golden).double()
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
    else:
        magnitude = torch.where(torch.isfinite(golden_t), golden_t.abs(), 0.0)
        bound = tolerance.atol + tolerance.rtol * magnitude
        passed = bool((diff <= bound).all())
    return ItemResult(case, item, max_abs, max_rel, tolerance.describe(), passed)


def compare_views(case: str, page: PageInputs, views: list[dict[str, Any]], sum_rel: float):
    """Pixel views against the index's sums and samples (exact samples, sums to `sum_rel`)."""
    results = []
    for spec in views:
        role = spec["role"]
        if spec.get("all_zero"):  # the reference's zero `images_crop` stand-in: no tiles
            results.append(compare(case, f"views.{role}", len(page.tiles), 0, Tolerance(True)))
            continue
        view = page.global_view if role == "global" else page.tiles[int(role.removeprefix("tile"))]
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
    length = len(page.input_ids)
    forced_ids = torch.cat([page.input_ids, stored["gen_ids"]])[None]
    forced_mask = torch.cat(
        [page.images_seq_mask, torch.zeros_like(stored["gen_ids"], dtype=torch.bool)]
    )[None]
    layers = {f"layer{i}": layer for i, layer in enumerate(inner.layers)}
    with torch.inference_mode(), capture_outputs(layers | {"final_norm": inner.norm}) as taps:
        logits = model(forced_ids, forced_mask, [span])[0]  # (L + n, V)
    port["tf_logits"] = logits[length - 1 : length - 1 + len(stored["gen_ids"])]
    port |= {f"tap.{k}": v[0][0, :length] for k, v in taps.items()}
    port["tap.lm_head"] = logits[:length]

    results = compare_views(name, page, case["views"], golden.tolerances["pixel_views"]["sum_rel"])
    for item in ("n_placeholders", "valid_img_tokens"):
        results.append(compare(name, item, port[item], case[item], golden.tolerance(item)))
    for item, expected in stored.items():
        if item not in port:
            results.append(ItemResult(name, item, float("inf"), 0, "", False, "not produced"))
            continue
        results.append(compare(name, item, port[item], expected, golden.tolerance(item)))
    return results


def run_parity(directory: str | Path, cases: Sequence[str] | None = None) -> list[ItemResult]:
    golden = GoldenSet(directory)
    unknown = sorted(set(cases or ()) - set(golden.case_names))
    if unknown:
        raise ParityError(f"unknown cases {unknown}; the set has {golden.case_names}")
    with tempfile.TemporaryDirectory(prefix="parity-ckpt-") as workdir:
        model = load_formula_model(golden, Path(workdir))
    results = [check_weight_hashes(model, golden.manifest_path)]
    for name in cases or golden.case_names:
        results += run_case(model, golden, name)
    return results


def format_table(results: Sequence[ItemResult]) -> str:
    header = f"{'case':<10} {'item':<34} {'max_abs':>10} {'max_rel':>10}  {'tolerance':<22} result"
    rows = [
        f"{r.case:<10} {r.item:<34} {r.max_abs:>10.3g} {r.max_rel:>10.3g}  {r.tolerance:<22} "
        f"{'PASS' if r.passed else 'FAIL'}{'  ' + r.detail if r.detail else ''}"
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
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c] if args.cases else None
    started = time.perf_counter()
    try:
        results = run_parity(args.golden_dir, cases)
    except ParityError as error:
        print(f"parity: {error}", file=sys.stderr)
        return 2
    passed = all(r.passed for r in results)
    if args.json:
        payload = {
            "passed": passed,
            "seconds": round(time.perf_counter() - started, 1),
            "items": [asdict(r) for r in results],
        }
        print(json.dumps(payload, indent=1))
    else:
        print(format_table(results))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

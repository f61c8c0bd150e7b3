"""``tokengate presets``: list, show and pick GPU presets.

    tokengate presets [--presets DIR]... list [--region R]
    tokengate presets [--presets DIR]... show R/NAME          (NAME alone: the default region)
    tokengate presets [--presets DIR]... pick --model PATH --region R [--gpu G] --context N --concurrency C
                                              [--dtype D] [--quantization Q] [--json]

``--presets DIR`` (repeatable; also accepted after the subcommand) adds user preset directories after the built-in
one. Exit status: 0 done; 1 ``pick`` found nothing that fits (suggestions printed); 2 bad input — a preset file,
the model's config.json, an unknown region, preset or GPU type (argparse exits 2 on usage errors too).

``pick --json`` prints one object. ``preset`` is the bare preset name (``region`` beside it), null when nothing fits;
the per-preset fields then describe the largest candidate (most GPUs, then most memory), or are null when the region
has no candidates. Per GPU, as the issue's memory math is: ``weights_bytes_per_gpu`` after the TP×PP split, and
``kv_cache_bytes_per_token`` one GPU's share after the TP/PP split (``..._per_gpu`` says the same, by name);
``kv_cache_bytes_per_token_model`` is the whole model's. Keys: ``preset region context concurrency model_params``
+ ``CANDIDATE_KEYS`` less ``preset fits reasons`` + ``reserve_formula suggestions candidates`` (a list of objects
with ``CANDIDATE_KEYS``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, get_args

from .modelshape import ModelConfigError, ModelShape, load_model_shape
from .picker import RESERVE_FORMULA, Candidate, GiB, PickResult, pick
from .presets import Catalog, Dtype, Preset, PresetError, Quantization, UnknownPreset, builtin_presets_dir, load_catalog

EXIT_NOTHING_FITS = 1
EXIT_BAD_INPUT = 2
CANDIDATE_KEYS = (
    "preset",
    "gpu_type",
    "gpus",
    "nodes",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "max_num_seqs",
    "dtype",
    "quantization",
    "weights_bytes_per_gpu",
    "kv_cache_bytes_per_token",
    "kv_cache_bytes_per_token_per_gpu",
    "kv_cache_bytes_per_token_model",
    "budget_bytes_per_gpu",
    "reserve_bytes_per_gpu",
    "kv_capacity_tokens",
    "max_concurrency",
    "max_concurrency_limited_by",
    "fits",
    "reasons",
)


def add_presets_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``presets`` and its subcommands; each sets ``func(args) -> int``."""
    parser = subparsers.add_parser("presets", help="list, show and pick GPU presets")
    parser.add_argument("--presets", dest="preset_dirs", metavar="DIR", type=Path, action="append", default=[])
    user_dirs = argparse.ArgumentParser(add_help=False)
    user_dirs.add_argument("--presets", dest="preset_dirs_late", metavar="DIR", type=Path, action="append", default=[])
    commands = parser.add_subparsers(dest="presets_command", metavar="COMMAND", required=True)

    p = commands.add_parser("list", parents=[user_dirs], help="table of regions and presets")
    p.add_argument("--region")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("show", parents=[user_dirs], help="one preset in full")
    p.add_argument("preset", metavar="REGION/NAME")
    p.set_defaults(func=cmd_show)

    p = commands.add_parser("pick", parents=[user_dirs], help="the smallest preset that holds a model and a load")
    p.add_argument("--model", required=True, type=Path, help="model directory or its config.json")
    p.add_argument("--region", required=True)
    p.add_argument("--gpu", help="only presets of this GPU type (h100, h200, ...)")
    p.add_argument("--context", required=True, type=_positive, help="tokens per request (prompt + output)")
    p.add_argument("--concurrency", required=True, type=_positive, help="requests at that context at once")
    p.add_argument("--dtype", choices=get_args(Dtype))
    p.add_argument("--quantization", choices=get_args(Quantization))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_pick)


def cmd_list(args: argparse.Namespace) -> int:
    try:
        catalog = _catalog(args)
        presets = catalog.presets(args.region)
    except (PresetError, UnknownPreset) as exc:
        return _fail(exc)
    rows = [["REGION", "PRESET", "GPUS", "TP", "PP", "MAX_MODEL_LEN", "MAX_SEQS", "MAX_TOKENS", "DEFAULT", "CONTEXT"]]
    rows[0].append("POLICY")
    for p in presets:
        caps = p.caps
        context = caps.context_cap if caps.context_cap is not None else p.max_model_len
        row = [p.region, p.name, _gpus(p), p.tensor_parallel_size, p.pipeline_parallel_size, p.max_model_len]
        row += [p.max_num_seqs, caps.max_tokens_cap, caps.default_max_tokens, context, caps.cap_policy]
        rows.append([str(v) for v in row])
    print(_table(rows))
    if (default := catalog.default_region) is not None:
        print(f"default region: {default} ({catalog.regions[default].display_name})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        catalog = _catalog(args)
        region, _, name = args.preset.rpartition("/")
        preset = catalog.get(region or catalog.default_region or "", name)
    except (PresetError, UnknownPreset) as exc:
        return _fail(exc)
    gpu = catalog.gpu(preset)
    fields: list[tuple[str, object]] = [
        ("preset", preset.key),
        ("region", f"{preset.region} ({catalog.regions[preset.region].display_name})"),
        ("source", catalog.sources[(preset.region, preset.name)]),
        ("gpu_type", f"{gpu.name} ({gpu.display_name}, {gpu.memory_bytes} bytes = {gpu.memory_bytes / GiB:.2f} GiB)"),
    ]
    body = preset.model_dump(exclude={"region", "name", "gpu_type", "caps"})
    fields += [(k, "auto" if v is None and k in ("dtype", "kv_cache_dtype") else v) for k, v in body.items()]
    fields += [(f"caps.{k}", v) for k, v in preset.caps.model_dump().items()]
    width = max(len(k) for k, _ in fields) + 1
    for key, value in fields:
        print(f"{key + ':':<{width}} {'none' if value is None or value == '' else value}")
    return 0


def cmd_pick(args: argparse.Namespace) -> int:
    try:
        catalog = _catalog(args)
        catalog.region(args.region)
        if args.gpu is not None and args.gpu not in catalog.gpus:
            raise UnknownPreset(f"unknown GPU type {args.gpu!r}; known: {', '.join(sorted(catalog.gpus))}")
        shape = load_model_shape(args.model)
        result = pick(
            catalog,
            shape,
            args.region,
            args.gpu,
            context=args.context,
            concurrency=args.concurrency,
            dtype=args.dtype,
            quantization=args.quantization,
        )
    except (PresetError, UnknownPreset, ModelConfigError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(pick_json(result, shape), indent=2))
    else:
        print(_pick_text(result, shape, args.model))
    return 0 if result.preset is not None else EXIT_NOTHING_FITS


def candidate_json(c: Candidate) -> dict[str, Any]:
    p = c.preset
    values = {
        "preset": p.name,
        "gpu_type": p.gpu_type,
        "gpus": p.gpus,
        "nodes": p.nodes,
        "tensor_parallel_size": p.tensor_parallel_size,
        "pipeline_parallel_size": p.pipeline_parallel_size,
        "max_model_len": c.max_model_len,
        "max_num_seqs": p.max_num_seqs,
        "dtype": c.dtype,
        "quantization": c.quantization,
        "weights_bytes_per_gpu": c.weights_bytes_per_gpu,
        # per GPU, as weights_bytes_per_gpu: kv_capacity_tokens = KV budget per GPU / this
        "kv_cache_bytes_per_token": c.kv_cache_bytes_per_token_per_gpu,
        "kv_cache_bytes_per_token_per_gpu": c.kv_cache_bytes_per_token_per_gpu,
        "kv_cache_bytes_per_token_model": c.kv_cache_bytes_per_token,
        "budget_bytes_per_gpu": c.budget_bytes_per_gpu,
        "reserve_bytes_per_gpu": c.reserve_bytes_per_gpu,
        "kv_capacity_tokens": c.kv_capacity_tokens,
        "max_concurrency": c.max_concurrency,
        "max_concurrency_limited_by": c.limited_by,
        "fits": c.fits,
        "reasons": list(c.reasons),
    }
    return {k: values[k] for k in CANDIDATE_KEYS}


def pick_json(result: PickResult, shape: ModelShape) -> dict[str, Any]:
    reported = result.reported
    per_preset = candidate_json(reported) if reported is not None else dict.fromkeys(CANDIDATE_KEYS)
    for key in ("preset", "fits", "reasons"):
        del per_preset[key]
    return {
        "preset": result.preset.name if result.preset is not None else None,
        "region": result.region,
        "context": result.context,
        "concurrency": result.concurrency,
        "model_params": shape.params,
        **per_preset,
        "reserve_formula": RESERVE_FORMULA,
        "suggestions": list(result.suggestions),
        "candidates": [candidate_json(c) for c in result.candidates],
    }


def _pick_text(result: PickResult, shape: ModelShape, model: Path) -> str:
    first = result.reported
    dtype = shape.dtype if first is None else first.dtype + (f" + {first.quantization}" if first.quantization else "")
    kv = shape.kv_cache_bytes_per_token() if first is None else first.kv_cache_bytes_per_token
    lines = [
        f"model:   {model} ({shape.model_type}, {shape.params / 1e9:.2f}B params, {dtype}, "
        f"KV {kv / 1024:.1f} KiB/token for the whole model)",
        f"request: region {result.region}, context {result.context} tokens × concurrency {result.concurrency}",
        f"memory:  {RESERVE_FORMULA}",
        "",
    ]
    rows = [["", "PRESET", "GPUS", "TP", "PP", "WEIGHTS/GPU", "RESERVE/GPU", "KV/TOKEN/GPU", "KV CAPACITY"]]
    rows[0] += ["MAX CONCURRENCY", "FITS"]
    for c in result.candidates:
        mark = "*" if c.preset == result.preset else ""
        conc = f"{c.max_concurrency} ({c.limited_by})"
        fits = "yes" if c.fits else "no: " + "; ".join(c.reasons)
        row = [mark, c.preset.name, _gpus(c.preset), str(c.preset.tensor_parallel_size)]
        row += [str(c.preset.pipeline_parallel_size), _gib(c.weights_bytes_per_gpu), _gib(c.reserve_bytes_per_gpu)]
        row += [f"{c.kv_cache_bytes_per_token_per_gpu / 1024:.1f} KiB", f"{c.kv_capacity_tokens:,}", conc, fits]
        rows.append(row)
    lines.append(_table(rows) if result.candidates else "(no candidate presets)")
    lines.append("")
    if result.preset is not None:
        lines.append(f"pick: {result.preset.key}")
    else:
        lines.append(f"nothing fits in {result.region}. What would:")
        lines += [f"  - {s}" for s in result.suggestions]
    return "\n".join(lines)


def _catalog(args: argparse.Namespace) -> Catalog:
    builtin = builtin_presets_dir()
    flags = list(args.preset_dirs) + list(args.preset_dirs_late)
    # as `tokengate serve` reads them: --presets, else TOKENGATE_PRESETS (comma or space separated)
    env = [Path(d) for d in os.environ.get("TOKENGATE_PRESETS", "").replace(",", " ").split()]
    dirs = ([builtin] if builtin.is_dir() else []) + (flags or env)
    if not dirs:
        raise PresetError("no preset directory: the built-in presets/ is missing; pass --presets DIR", path=builtin)
    return load_catalog(dirs)


def _fail(exc: Exception) -> int:
    print(f"tokengate presets: error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _gpus(p: Preset) -> str:
    return f"{p.gpus}×{p.gpu_type}" + (f" ({p.nodes} nodes)" if p.nodes > 1 else "")


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)

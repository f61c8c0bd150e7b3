"""Presets as data: the shipped YAML, every way a preset file can be wrong, and user directories."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.presets import (
    Catalog,
    PresetCaps,
    PresetError,
    UnknownPreset,
    builtin_presets_dir,
    load_catalog,
)

LADDER = [f"{gpu}-{n}x" for gpu in ("h100", "h200") for n in (1, 2, 4, 8)]

GOOD = """\
gpu_type: h100
gpus: 2
tensor_parallel_size: 2
gpu_memory_utilization: 0.9
max_model_len: 32768
max_num_seqs: 128
caps: {max_tokens_cap: 4096, default_max_tokens: 256, context_cap: 32768, cap_policy: reject}
"""


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog([builtin_presets_dir()])


def _user_preset(tmp_path: Path, body: str, name: str = "p1", file: str = "user.yaml") -> Path:
    indented = "".join(f"        {line}\n" for line in body.splitlines())
    path = tmp_path / file
    path.write_text(f"regions:\n  fr:\n    presets:\n      {name}:\n{indented}")
    return path


def test_builtin_dir_sits_next_to_app() -> None:
    here = Path(__file__).resolve().parent.parent
    assert builtin_presets_dir() == here / "presets"
    assert builtin_presets_dir(Path("/elsewhere")) == Path("/elsewhere")


def test_shipped_regions_and_ladder(catalog: Catalog) -> None:
    assert set(catalog.regions) == {"fr", "uae"}
    assert catalog.regions["fr"].display_name == "France"
    assert catalog.regions["uae"].display_name == "United Arab Emirates"
    assert catalog.default_region == "fr"
    for region in ("fr", "uae"):
        for name in LADDER:
            p = catalog.get(region, name)
            gpu, count = name.split("-")
            assert (p.gpu_type, p.gpus, p.nodes) == (gpu, int(count[:-1]), 1)
            assert p.tensor_parallel_size * p.pipeline_parallel_size == p.gpus
            assert 0 < p.gpu_memory_utilization <= 1
            assert p.caps.default_max_tokens <= p.caps.max_tokens_cap <= p.max_model_len
    assert "h100-16x" not in catalog.regions["uae"].presets


def test_multi_node_preset(catalog: Catalog) -> None:
    p = catalog.get("fr", "h100-16x")
    assert (p.gpus, p.nodes, p.gpus_per_node) == (16, 2, 8)
    assert (p.tensor_parallel_size, p.pipeline_parallel_size) == (8, 2)
    assert p.key == "fr/h100-16x"


def test_gpu_catalogue(catalog: Catalog) -> None:
    assert catalog.gpus["h100"].memory_bytes == 85_017_493_504  # torch total_memory of an H100 80GB HBM3
    assert catalog.gpus["h200"].memory_bytes == 150_109_880_320  # and of an H200
    assert catalog.gpu(catalog.get("uae", "h200-1x")).name == "h200"


def test_presets_sort_smallest_first(catalog: Catalog) -> None:
    names = [p.name for p in catalog.presets("fr")]
    assert names == ["h100-1x", "h200-1x", "h100-2x", "h200-2x", "h100-4x", "h200-4x", "h100-8x", "h200-8x", "h100-16x"]
    assert len(catalog.presets()) == 9 + 8


def test_caps_model_fields(catalog: Catalog) -> None:
    assert list(PresetCaps.model_fields) == ["max_tokens_cap", "default_max_tokens", "context_cap", "cap_policy"]
    caps = catalog.get("fr", "h100-1x").caps
    assert (caps.max_tokens_cap, caps.default_max_tokens, caps.context_cap, caps.cap_policy) == (
        4096,
        512,
        32768,
        "clamp",
    )


def test_models_are_frozen(catalog: Catalog) -> None:
    p = catalog.get("fr", "h100-1x")
    with pytest.raises(ValidationError):
        p.max_num_seqs = 1
    with pytest.raises(ValidationError, match="extra"):
        PresetCaps(max_tokens_cap=1, default_max_tokens=1, surprise=True)  # type: ignore[call-arg]


def test_unknown_names_list_the_valid_ones(catalog: Catalog) -> None:
    with pytest.raises(UnknownPreset, match=r"unknown preset 'h100-3x' in region 'fr'; presets: h100-1x, h200-1x"):
        catalog.get("fr", "h100-3x")
    with pytest.raises(UnknownPreset, match=r"unknown region 'de'; regions: fr, uae"):
        catalog.get("de", "h100-1x")
    with pytest.raises(LookupError):
        catalog.presets("de")


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        (("tensor_parallel_size: 2", "tensor_paralel_size: 2"), "tensor_paralel_size", "unknown field"),
        (("tensor_parallel_size: 2", "tensor_parallel_size: 1"), "tensor_parallel_size", "1 × 1 = 1, but gpus = 2"),
        (("context_cap: 32768", "context_cap: 65536"), "caps.context_cap", "above max_model_len"),
        (("default_max_tokens: 256", "default_max_tokens: 8192"), "caps.default_max_tokens", "above max_tokens_cap"),
        (("max_tokens_cap: 4096", "max_tokens_cap: 65536"), "caps.max_tokens_cap", "above max_model_len"),
        (("cap_policy: reject", "cap_policy: drop"), "caps.cap_policy", "'clamp' or 'reject'"),
        (("cap_policy: reject", "cap_polcy: reject"), "caps.cap_polcy", "unknown field"),
        (("gpu_type: h100", "gpu_type: a100"), "gpu_type", "unknown GPU type 'a100'; known: h100, h200"),
        (("gpu_memory_utilization: 0.9", "gpu_memory_utilization: 1.5"), "gpu_memory_utilization", "less than or"),
        (("gpu_memory_utilization: 0.9", "gpu_memory_utilization: 0"), "gpu_memory_utilization", "greater than 0"),
        (("max_num_seqs: 128\n", ""), "max_num_seqs", "Field required"),
        (("gpus: 2", 'gpus: "2"'), "gpus", "valid integer"),
        (("gpus: 2", "gpus: 2\nnodes: 3"), "nodes", "do not split evenly over 3 nodes"),
        (("gpus: 2\ntensor_parallel_size: 2", "gpus: 16\ntensor_parallel_size: 16"), "gpus", "at most 8"),
        (("gpus: 2", "gpus: 2\nname: other"), "name", "comes from the mapping key"),
        (("gpus: 2", "gpus: 2\nregion: uae"), "region", "comes from the mapping key"),
        (("max_model_len: 32768", "max_model_len: 32768\nquantization: int4"), "quantization", "'fp8'"),
        (("max_model_len: 32768", "max_model_len: 32768\ndtype: bf16"), "dtype", "'bfloat16'"),
    ],
)
def test_bad_preset_names_file_preset_and_field(
    tmp_path: Path, change: tuple[str, str], field: str, needle: str
) -> None:
    old, new = change
    assert old in GOOD
    path = _user_preset(tmp_path, GOOD.replace(old, new))
    with pytest.raises(PresetError) as err:
        load_catalog([builtin_presets_dir(), tmp_path])
    text = str(err.value)
    assert str(path) in text and "fr/p1" in text and field in text, text
    assert needle in text
    assert (err.value.path, err.value.region, err.value.preset, err.value.field) == (path, "fr", "p1", field)


def test_the_good_preset_loads(tmp_path: Path) -> None:
    _user_preset(tmp_path, GOOD)
    p = load_catalog([builtin_presets_dir(), tmp_path]).get("fr", "p1")
    assert (p.gpus, p.nodes, p.pipeline_parallel_size, p.caps.cap_policy) == (2, 1, 1, "reject")


def test_bad_preset_name(tmp_path: Path) -> None:
    path = _user_preset(tmp_path, GOOD, name="H100_Big")
    with pytest.raises(PresetError) as err:
        load_catalog([tmp_path])
    assert (err.value.path, err.value.preset, err.value.field) == (path, "H100_Big", "name")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = _user_preset(tmp_path, GOOD + "max_num_seqs: 64\n")
    with pytest.raises(PresetError, match="'max_num_seqs' given twice") as err:
        load_catalog([builtin_presets_dir(), tmp_path])
    assert str(path) in str(err.value)


def test_unreadable_yaml_and_wrong_shapes(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("regions: [\n")
    with pytest.raises(PresetError, match="cannot read") as err:
        load_catalog([tmp_path])
    assert err.value.path == bad
    bad.write_text("- a list\n")
    with pytest.raises(PresetError, match="top level must be a mapping"):
        load_catalog([tmp_path])
    bad.write_text("region:\n  fr: {}\n")
    with pytest.raises(PresetError, match="unknown field") as err:
        load_catalog([tmp_path])
    assert err.value.field == "region"
    bad.write_text("regions:\n  fr:\n    presets:\n      p1: 3\n")
    with pytest.raises(PresetError) as err:
        load_catalog([tmp_path])
    assert (err.value.preset, err.value.path) == ("p1", bad)
    with pytest.raises(PresetError, match="not a directory"):
        load_catalog([tmp_path / "missing"])


def test_user_dir_overrides_and_extends(tmp_path: Path) -> None:
    (tmp_path / "10-gpus.yaml").write_text(
        "gpus:\n  a100:\n    display_name: NVIDIA A100 80GB\n    memory_bytes: 85_097_971_712\n"
    )
    override = GOOD.replace("max_num_seqs: 128", "max_num_seqs: 64").replace("gpus: 2", "gpus: 1")
    override = override.replace("tensor_parallel_size: 2", "tensor_parallel_size: 1")
    path = _user_preset(tmp_path, override, name="h100-1x", file="20-fr.yaml")
    (tmp_path / "30-de.yml").write_text(
        "x-base: &base {gpu_type: a100, gpu_memory_utilization: 0.85}\n"
        "regions:\n  de:\n    display_name: Germany\n    presets:\n      a100-1x:\n        <<: *base\n"
        "        gpus: 1\n        tensor_parallel_size: 1\n        max_model_len: 8192\n        max_num_seqs: 32\n"
        "        caps: {max_tokens_cap: 1024, default_max_tokens: 128}\n"
    )
    cat = load_catalog([builtin_presets_dir(), tmp_path])
    assert cat.get("fr", "h100-1x").max_num_seqs == 64
    assert cat.sources[("fr", "h100-1x")] == path
    assert cat.get("fr", "h100-2x").max_num_seqs == 256  # the rest of fr is untouched
    assert cat.regions["fr"].display_name == "France" and cat.default_region == "fr"
    de = cat.get("de", "a100-1x")
    assert (de.gpu_type, de.gpu_memory_utilization, de.caps.context_cap) == ("a100", 0.85, None)
    assert cat.regions["de"].display_name == "Germany" and not cat.regions["de"].default
    assert list(cat.regions) == ["de", "fr", "uae"]


def test_two_default_regions_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "de.yaml"
    path.write_text("regions:\n  de:\n    display_name: Germany\n    default: true\n")
    with pytest.raises(PresetError, match="more than one default region") as err:
        load_catalog([builtin_presets_dir(), tmp_path])
    assert err.value.field == "default"
    path.write_text("regions:\n  de:\n    default: true\n  fr:\n    default: false\n")
    assert load_catalog([builtin_presets_dir(), tmp_path]).default_region == "de"

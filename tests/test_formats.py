"""The packed-format table against the C engine's sources, and the CLI choices from the tables."""

import re
from pathlib import Path

import numpy as np
import pytest

from spectra.errors import SpectraError
from spectra.infer import formats, packing

KERNELS = Path(formats.__file__).resolve().parent / "kernels"


def _c_source() -> str:
    files = sorted(KERNELS.glob("*.c")) + sorted(KERNELS.glob("*.inc")) + sorted(KERNELS.glob("*.h"))
    assert files, f"no C sources under {KERNELS}"
    return "\n".join(f.read_text() for f in files)


def _defines(src: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s*#define\s+(\w+)\s+(\d+)\b", src, re.M)}


def _c_format_ids(src: str, defs: dict[str, int]) -> dict[str, int]:
    """name -> id the C code uses: SPX_FMT_<NAME> defines when present, else the ids the code compares
    ``fmt`` with next to the block size it picks (``fmt == 2 ? T2_BLOCK : T1_BLOCK``) and the comment on the
    struct field (``int32_t fmt; /* 2: t2, 1: t1 */``)."""
    ids = {k.removeprefix("SPX_FMT_").lower(): v for k, v in defs.items() if k.startswith("SPX_FMT_")}
    if ids:
        return ids
    for m in re.finditer(r"fmt\s*==\s*(\d+)\s*\?\s*(\w+?)_BLOCK\s*:\s*(\w+?)_BLOCK", src):
        ids[m[2].lower()] = int(m[1])
    field = re.search(r"int32_t\s+fmt;\s*/\*([^*]*)\*/", src)
    assert field, "the C model struct lost its 'fmt' field comment; add SPX_FMT_<NAME> defines instead"
    for m in re.finditer(r"(\d+)\s*:\s*(\w+)", field[1]):
        assert ids.setdefault(m[2].lower(), int(m[1])) == int(m[1]), f"C disagrees with itself on {m[2]}"
    return ids


def test_table_matches_the_c_sources():
    src = _c_source()
    defs = _defines(src)
    assert defs["QK"] == formats.BLOCK
    for f in formats.FORMATS.values():
        assert defs[f"{f.name.upper()}_BLOCK"] == f.block_bytes, f.name
    ids = _c_format_ids(src, defs)
    assert ids == {f.name: f.c_id for f in formats.FORMATS.values()}
    # the C code compares with named ids: one SPX_FMT_<NAME> / SPX_HEAD_<NAME> define per format
    assert {k for k in defs if k.startswith("SPX_FMT_")} == {f"SPX_FMT_{n.upper()}" for n in formats.FORMATS}
    c_head_defs = {k.removeprefix("SPX_HEAD_").lower(): v for k, v in defs.items() if k.startswith("SPX_HEAD_")}
    assert c_head_defs == {h.name: h.c_id for h in formats.HEAD_FORMATS.values()}
    head = re.search(r"head_fmt[^;]*;\s*/\*([^*]*)\*/", src)
    assert head, "the C model struct lost its 'head_fmt' comment"
    c_heads = {m[2].lower(): int(m[1]) for m in re.finditer(r"(\d+)\s*:\s*(\w+)", head[1])}
    assert c_heads == {h.name: h.c_id for h in formats.HEAD_FORMATS.values()}
    # and no bare id is compared with a format field any more
    bare = re.findall(r"(?:head_)?fmt\s*[!=]=\s*\d+", src)
    assert not bare, f"compare format fields with the SPX_FMT_ / SPX_HEAD_ names, not {bare}"


def test_c_id_check_catches_a_mismatch():
    src = "int32_t fmt; /* 2: t2, 1: t1 */\n x = fmt == 3 ? T2_BLOCK : T1_BLOCK;"
    with pytest.raises(AssertionError, match="disagrees"):
        _c_format_ids(src, {})
    assert _c_format_ids("#define SPX_FMT_T2 7\n", {"SPX_FMT_T2": 7}) == {"t2": 7}


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_codec_round_trip_and_size(name):
    f = formats.FORMATS[name]
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, size=(5, 3, formats.BLOCK), dtype=np.uint8)
    packed = f.pack_blocks(codes)
    assert packed.shape == (5, 3, f.block_bytes) and packed.dtype == np.uint8
    assert np.array_equal(f.unpack_blocks(packed), codes)
    assert f.bits_per_weight == pytest.approx({"t2": 2.0, "t1": 1.625}[name])
    assert packing.FORMATS[name] == f.block_bytes and packing.FMT_ID[name] == f.c_id


def test_unknown_names_and_cli_choices():
    with pytest.raises(SpectraError, match=r"unknown packed format 't3'.*allowed: t2 \(2 bits/weight\), t1 \(1.625"):
        formats.get_format("t3")
    with pytest.raises(SpectraError, match="unknown head format 'q4'; allowed: f16, q8"):
        formats.get_head("q4")
    from spectra.cli import build_parser
    from spectra.infer.backends import CHOICES

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    pack = {a.dest: a.choices for a in sub["pack"]._actions}
    assert list(pack["fmt"]) == list(formats.FORMATS) and list(pack["head"]) == list(formats.HEAD_FORMATS)
    gen = {a.dest: a.choices for a in sub["generate"]._actions}
    assert tuple(gen["backend"]) == CHOICES

"""The fast paths agree with the reference paths they shortcut.

* JPEG: simplejpeg's decode (data_shards/decode.py) is bit-identical to PIL's for every case it
  accepts (tolerance: 0, exact equality); everything else falls back to PIL.
* Tars: the stream's header scan of plain local shards yields exactly what tarfile reads, and
  hands anything it cannot vouch for to tarfile.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_shards import decode
from data_shards.decode import BadSample, decode_image
from data_shards.tars import _group_members, _scan_local_tar, _tarfile_members, read_shard

pytestmark = pytest.mark.skipif(decode._simplejpeg is None, reason="simplejpeg not installed")


def photo(h=97, w=131, seed=0) -> np.ndarray:
    """A smooth, textured RGB image (JPEG-realistic, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 7.0 + c) * 60 + np.cos(y / 5.0 - c) * 50 + 128 for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg(array: np.ndarray, mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buf, "JPEG", **save)
    return buf.getvalue()


def pil_reference(data: bytes, *args, **kwargs) -> np.ndarray:
    """decode_image with the fast path switched off."""
    saved, decode._simplejpeg = decode._simplejpeg, None
    try:
        return decode_image(data, "jpg", *args, **kwargs)
    finally:
        decode._simplejpeg = saved


def fast_was_used(monkeypatch, data, *args) -> bool:
    calls = []
    real = decode._decode_jpeg_fast
    monkeypatch.setattr(decode, "_decode_jpeg_fast", lambda *a: calls.append(r := real(*a)) or r)
    decode_image(data, "jpg", *args)
    return calls[0] is not None


CASES = [  # (source mode, save options, channels, image_size)
    ("RGB", {"quality": 90}, None, None),
    ("RGB", {"quality": 90}, 3, (97, 131)),
    ("RGB", {"quality": 75, "subsampling": 0}, 3, None),
    ("RGB", {"quality": 95, "subsampling": 1}, None, None),
    ("RGB", {"quality": 90, "progressive": True}, 3, None),
    ("RGB", {"quality": 90}, 3, 64),  # resize, no DCT scaling (131 // 64 >= 2 but 97 // 64 < 2)
    ("RGB", {"quality": 90}, 1, 64),  # colour -> grey with a target: PIL's draft takes luma
    ("L", {"quality": 90}, None, None),
    ("L", {"quality": 90}, 3, None),  # grey -> RGB replicates
    ("L", {"quality": 90}, 1, 80),
]


@pytest.mark.parametrize("mode, save, channels, size", CASES)
def test_fast_jpeg_is_bit_identical_to_pil(monkeypatch, mode, save, channels, size):
    data = jpeg(photo(), mode, **save)
    ref = pil_reference(data, channels, size)
    got = decode_image(data, "jpg", channels, size)
    assert fast_was_used(monkeypatch, data, channels, size)
    assert got.dtype == ref.dtype == np.uint8 and got.shape == ref.shape
    assert np.array_equal(got, ref)  # tolerance 0


@pytest.mark.parametrize("channels, size", [
    (1, None),  # colour -> grey without a target: PIL's own RGB->L weights
    (3, 32),  # 131x97 -> 32: PIL's draft decodes at 1/2 or 1/4 scale
])
def test_cases_the_fast_path_declines_go_to_pil(monkeypatch, channels, size):
    data = jpeg(photo())
    assert not fast_was_used(monkeypatch, data, channels, size)
    assert np.array_equal(decode_image(data, "jpg", channels, size), pil_reference(data, channels, size))


def test_cmyk_exif_and_broken_jpegs_fall_back_to_pil(monkeypatch):
    cmyk = jpeg(photo(), "CMYK")
    assert not fast_was_used(monkeypatch, cmyk, 3, None)
    assert np.array_equal(decode_image(cmyk, "jpg", 3), pil_reference(cmyk, 3))
    data = jpeg(photo())
    assert np.array_equal(decode_image(data, "jpg", 3, None, exif_transpose=True),
                          pil_reference(data, 3, None, exif_transpose=True))
    for broken in (data[: len(data) // 2], data[:3] + b"garbage" * 20):
        with pytest.raises(BadSample) as fast_err:
            decode_image(broken, "jpg", 3)
        with pytest.raises(BadSample) as ref_err:
            pil_reference(broken, 3)
        assert fast_err.value.reason == ref_err.value.reason == "decode_error"


def test_too_large_is_reported_as_before():
    data = jpeg(photo())
    with pytest.raises(BadSample) as err:
        decode_image(data, "jpg", 3, None, max_pixels=100)
    assert err.value.reason == "too_large"


# ---------------------------------------------------------------------------- tar scan


def write_tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


MEMBERS = [("a/000.jpg", b"x" * 700), ("a/000.cls", b"1"), ("a/000.cls", b"2"), ("dir", None),
           ("__index__", b"meta"), ("a/001.JPG", b""), ("a/001.cls", b"3"), ("b" * 60 + "/" + "n" * 90 + ".png", b"p" * 513)]


def by_tarfile(path):
    with open(path, "rb") as f:
        return list(_group_members(str(path), _tarfile_members(str(path), f)))


def test_tar_scan_yields_what_tarfile_reads(tmp_path):
    path = write_tar(tmp_path / "s.tar", MEMBERS)
    assert _scan_local_tar(str(path)) is not None
    assert list(read_shard(str(path))) == by_tarfile(path)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_scan_hands_extended_formats_to_tarfile(tmp_path, fmt):
    path = write_tar(tmp_path / "s.tar", MEMBERS, fmt)  # long name -> GNU 'L' / pax 'x' header
    assert _scan_local_tar(str(path)) is None
    assert list(read_shard(str(path))) == by_tarfile(path)


def test_tar_scan_refuses_damage(tmp_path):
    path = write_tar(tmp_path / "s.tar", MEMBERS[:3])
    data = path.read_bytes()
    bad = bytearray(data)
    bad[512 + 1024 + 10] ^= 0xFF  # second header's name: checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    (tmp_path / "cut.tar").write_bytes(data[:512 + 1024 + 512 + 100])
    (tmp_path / "noeof.tar").write_bytes(data[:512 + 1024 + 512 + 512])
    for name in ("bad.tar", "cut.tar", "noeof.tar"):
        assert _scan_local_tar(str(tmp_path / name)) is None


@pytest.mark.parametrize("name", [
    "000.jpg", "a/000.jpg", "a/b/000.tar.gz.JPG", "x/.hidden", ".hidden", "a.b/c", "a.b/c.d", "noext", "dir/",
    "__index__", "__meta__/x.jpg", "a/__key__.jpg", "_a.jpg", "a\nb/c.jpg", "a/b\n.jpg", "a/b.c\n", "./x.jpg",
    "a//b.jpg", "/abs/k.png", "ü/ключ.png",
])
def test_member_name_split_matches_webdataset(name):
    from webdataset.tariterators import base_plus_ext

    from data_shards.tars import _META_RE, _split_name

    expected = (None, None) if _META_RE.match(name) else base_plus_ext(name)
    assert _split_name(name) == expected


# ---------------------------------------------------------------------------- PNG (pyspng)


def png(array: np.ndarray, mode: str, **save) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=50)
    elif mode == "I;16":
        img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
    else:
        img = img.convert(mode)
    img.save(buf, "PNG", **save)
    return buf.getvalue()


def pil_png_reference(data: bytes, *args, **kwargs) -> np.ndarray:
    saved, decode._pyspng = decode._pyspng, None
    try:
        return decode_image(data, "png", *args, **kwargs)
    finally:
        decode._pyspng = saved


PNG_CASES = [(mode, channels, size) for mode in ("RGB", "RGBA", "L", "LA", "P", "I;16")
             for channels, size in ((None, None), (3, None), (1, None), (3, (97, 131)), (3, 64), (1, 48))]


@pytest.mark.skipif(decode._pyspng is None, reason="pyspng not installed")
@pytest.mark.parametrize("mode, channels, size", PNG_CASES)
def test_fast_png_is_bit_identical_to_pil(mode, channels, size):
    data = png(photo(), mode)
    got = decode_image(data, "png", channels, size)
    want = pil_png_reference(data, channels, size)
    assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)
    fast = decode.decode_image_fast(data, channels, decode._target_hw(size))
    if fast is not None:
        assert np.array_equal(fast, want)


@pytest.mark.skipif(decode._pyspng is None, reason="pyspng not installed")
def test_png_with_transparency_palette_and_damage():
    rgba = np.dstack([photo(), np.full(photo().shape[:2], 7, np.uint8)])
    cases = [png(rgba, "RGBA"), png(photo(), "P", transparency=0), png(photo(), "L", transparency=5)]
    for data in cases:
        for channels in (None, 1, 3):
            assert np.array_equal(decode_image(data, "png", channels, 64), pil_png_reference(data, channels, 64))
    good = png(photo(), "RGB")
    for bad in (good[: len(good) // 2], good[:40] + bytes(30) + good[70:]):
        assert decode.decode_image_fast(bad, 3, (97, 131)) is None
        with pytest.raises(BadSample, match="decode_error"):
            decode_image(bad, "png", 3, None)


def test_fast_jpeg_decodes_into_a_given_buffer():
    data = jpeg(photo(64, 64))
    buffer = np.empty((64, 64, 3), np.uint8)
    got = decode.decode_image_fast(data, 3, (64, 64), buffer=buffer)
    assert got.base is buffer and np.array_equal(got, pil_reference(data, 3, 64))
    other = jpeg(photo(40, 50))  # needs a resize: a fresh array, the buffer is not touched
    before = buffer.copy()
    assert np.array_equal(decode.decode_image_fast(other, 3, (64, 64), buffer=buffer), pil_reference(other, 3, 64))
    assert np.array_equal(buffer, before)
    cmyk = jpeg(photo(64, 64), "CMYK")
    assert decode.decode_image_fast(cmyk, 3, (64, 64), buffer=buffer) is None  # PIL's business


NAMES = ["000.jpg", "a/000.jpg", "a/b/000.tar.gz.JPG", "x/.hidden", ".hidden", "a.b/c", "a.b/c.d", "noext", "dir/",
         "__index__", "__meta__/x.jpg", "a/__key__.jpg", "_a.jpg", "a\nb/c.jpg", "a/b\n.jpg", "./x.jpg",
         "a//b.jpg", "/abs/k.png", "ü/ключ.png", "K/Mixed.Case.PnG", "k/a b.jpg", "k/x~1.cls"]


@pytest.mark.parametrize("names", [NAMES, [n for n in NAMES if n.isascii() and "\n" not in n and "__" not in n],
                                   ["a/k1.jpg", "a/k1.CLS", "a/k2.jpg", "a/k2.cls", "b/k2.jpg"]])
def test_tar_index_splits_names_like_tarfile(tmp_path, names):
    path = write_tar(tmp_path / "n.tar", [(name, f"{i}".encode()) for i, name in enumerate(names)])
    assert list(read_shard(str(path))) == by_tarfile(path)


# ---------------------------------------------------------------------------- plain JPEGs, tables


def odd_jpegs() -> dict[str, tuple[bytes, bool]]:
    """name -> (JPEG bytes, whether plain_jpegs must call it plain)."""
    base = jpeg(photo(64, 64, seed=1))
    out = {"plain": (base, True), "grey": (jpeg(photo(64, 64), "L"), True),
           "progressive": (jpeg(photo(64, 64), progressive=True), True),
           "444": (jpeg(photo(64, 64), subsampling=0, quality=95), True),
           "truncated_data": (base[: len(base) // 2], True),  # header intact: the decode fails instead
           "cmyk": (jpeg(photo(64, 64), "CMYK"), False), "png": (png(photo(64, 64), "RGB"), False),
           "garbage": (base[:3] + b"\0" * 300, False), "cut_header": (base[:40], False)}
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buf, "JPEG", exif=exif)
    out["exif"] = (buf.getvalue(), True)
    buf = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buf, "JPEG", keep_rgb=True)  # Adobe marker, RGB coded
    out["adobe_rgb"] = (buf.getvalue(), False)
    out["app14"] = (base[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01" + base[2:], False)
    sof = bytearray(base)
    at = sof.find(b"\xff\xc0")
    sof[at + 10], sof[at + 13], sof[at + 16] = 82, 71, 66  # component ids "R", "G", "B"
    out["rgb_ids"] = (bytes(sof), False)
    out["fill_byte"] = (base[:2] + b"\xff" + base[2:], False)  # legal, but libjpeg's business
    return out


def test_plain_jpegs_are_exactly_the_grey_and_ycbcr_ones():
    cases = odd_jpegs()
    data, starts, ends = b"", [], []
    for payload, _ in cases.values():
        starts.append(len(data) + 7)
        data += b"pad" * 2 + b"x" + payload  # payloads at odd offsets in one buffer
        ends.append(len(data))
    data += bytes(512)
    got = decode.plain_jpegs(data, starts, ends)
    assert dict(zip(cases, got)) == {name: want for name, (_, want) in cases.items()}
    for (payload, want), flag in zip(cases.values(), got):
        if flag:  # plain implies the colour spaces decode_image_fast lets simplejpeg decode
            assert decode._simplejpeg.decode_jpeg_header(payload)[2] in ("Gray", "YCbCr")
    # Many layouts in one shard: the per-layout bulk check and the image-by-image walk agree.
    many = [jpeg(photo(64, 64, seed=i), quality=40 + 5 * i) for i in range(9)] + [cases["cmyk"][0]] * 2
    data = b"".join(many) + bytes(512)
    offsets = np.cumsum([0] + [len(m) for m in many]).tolist()
    assert decode.plain_jpegs(data, offsets[:-1], offsets[1:]) == [True] * 9 + [False] * 2


def test_decode_jpeg_into_is_decode_image_fast_for_plain_images_of_the_buffer_size():
    buffer = np.empty((64, 64, 3), np.uint8)
    for name, (payload, plain) in odd_jpegs().items():
        if not plain:
            continue
        got = decode.decode_jpeg_into(payload, buffer)
        ref = decode.decode_image_fast(payload, 3, (64, 64), buffer=np.empty((64, 64, 3), np.uint8))
        if ref is None:
            assert got is None, name
        else:
            assert got is not None and np.array_equal(got, ref) and np.array_equal(ref, pil_reference(payload, 3, 64))
    for other in (jpeg(photo(40, 50)), jpeg(photo(32, 128)), jpeg(photo(130, 130))):  # smaller, same bytes, larger
        assert decode.decode_jpeg_into(other, buffer) is None


@pytest.mark.skipif(decode._pyspng is None, reason="pyspng not installed")
def test_decode_png_rgb_is_decode_image_fast_for_pngs_of_the_shape():
    rgba = np.dstack([photo(64, 64), np.full((64, 64), 7, np.uint8)])
    cases = [png(photo(64, 64), mode) for mode in ("RGB", "L", "LA", "P", "I;16")]
    cases += [png(rgba, "RGBA"), png(photo(64, 64), "P", transparency=0), png(photo(64, 64), "RGB", interlace=1)]
    for data in cases:
        got = decode.decode_png_rgb(data, (64, 64, 3))
        ref = decode.decode_image_fast(data, 3, (64, 64))
        if ref is None:
            assert got is None
        else:
            assert got is not None and np.array_equal(got, ref) and np.array_equal(ref, pil_png_reference(data, 3, 64))
    assert decode.decode_png_rgb(png(photo(64, 64), "I;16"), (64, 64, 3)) is None  # 16-bit: PIL's business
    good = png(photo(64, 64), "RGB")
    others = (png(photo(40, 50), "RGB"), png(photo(64, 65), "RGB"), good[: len(good) // 2], jpeg(photo(64, 64)), b"")
    for other in others:  # other sizes, truncated, not a PNG
        assert decode.decode_png_rgb(other, (64, 64, 3)) is None


def test_labels_are_parsed_in_bulk_as_decode_label_parses_each():
    from data_shards.decode import decode_label
    from data_shards.tars import _parse_labels

    for labels in ([b"0", b"7", b"123456789012345678"], [b"3", b" 12\n", b"x", b"", b"1" * 19, b"-1", b"\xd9\xa3"]):
        data = b"".join(labels)
        ends = np.cumsum([len(x) for x in labels]).tolist()
        want = []
        for x in labels:
            try:
                want.append(decode_label(x))
            except BadSample:
                want.append(None)
        assert _parse_labels(data, [0] + ends[:-1], ends) == want


def test_uniform_shards_become_tables_that_read_as_tarfile_does(tmp_path):
    from data_shards.tars import ShardTable, _scan

    members = [(f"d/{i:03d}.{ext}", f"{ext}{i}".encode()) for i in range(5) for ext in ("cls", "jpg", "json")]
    path = write_tar(tmp_path / "u.tar", members)
    table = _scan(str(path))
    assert isinstance(table, ShardTable) and list(table.spans) == ["cls", "jpg", "json"]
    assert list(read_shard(str(path))) == by_tarfile(path)
    # Not uniform: a member missing, a repeated sample key, members out of order -> the grouping loop.
    for broken in (members[:-1], members[:3] + members[:3], members[1:2] + members[:1] + members[2:]):
        path = write_tar(tmp_path / "n.tar", broken)
        assert not isinstance(_scan(str(path)), ShardTable)
        assert list(read_shard(str(path))) == by_tarfile(path)


def test_later_passes_reuse_a_kept_mapping_within_its_byte_budget(tmp_path, monkeypatch):
    """A shard read again (a later pass) comes back as the same table, mapping and records,
    with no new mapping; past the byte budget the oldest tables keep only their index, and
    read the file again, to the same samples."""
    from data_shards import tars

    monkeypatch.setattr(tars, "_TABLE_CACHE", tars._TableCache(max_samples=100, max_mapped_bytes=1 << 20))
    paths = [str(write_tar(tmp_path / f"s{k}.tar", [(f"k{i}.{ext}", f"{ext}{k}{i}".encode()) for i in range(3)
                                                   for ext in ("cls", "jpg")])) for k in range(3)]
    first = [tars._scan(path) for path in paths]
    maps = []
    monkeypatch.setattr(tars, "_map_file", lambda f, size: maps.append(size) or f.read())
    assert [tars._scan(path) for path in paths] == first and maps == []  # the very same objects
    assert tars._TABLE_CACHE.mapped_bytes == sum(len(t.buf) for t in first)

    monkeypatch.undo()
    cache = tars._TableCache(max_samples=100, max_mapped_bytes=len(first[0].buf) + 1)  # room for one
    monkeypatch.setattr(tars, "_TABLE_CACHE", cache)
    tables = [tars._scan(path) for path in paths]
    assert [t.buf for _, t in cache.tables.values()] == [b"", b"", tables[2].buf]  # the newest stays mapped
    again = tars._scan(paths[0])
    assert again is not tables[0] and again.records(range(3)) == [(again.buf, *r[1:]) for r in tables[0].records(range(3))]
    assert [bool(t.buf) for _, t in cache.tables.values()] == [False, False, True]  # paths 1, 2, 0
    assert cache.mapped_bytes == len(again.buf) and cache.samples == 9
    assert list(read_shard(paths[1])) == by_tarfile(paths[1])


def test_a_rewritten_shard_is_indexed_afresh(tmp_path):
    path = tmp_path / "r.tar"
    write_tar(path, [("k0.cls", b"1"), ("k0.jpg", b"a"), ("k1.cls", b"2"), ("k1.jpg", b"b")])
    assert [s["cls"] for s in read_shard(str(path))] == [b"1", b"2"]
    assert [s["cls"] for s in read_shard(str(path))] == [b"1", b"2"]  # from the cached index
    write_tar(path, [("k0.cls", b"3"), ("k0.jpg", b"a"), ("k1.cls", b"44"), ("k1.jpg", b"b")])
    assert [s["cls"] for s in read_shard(str(path))] == [b"3", b"44"]

"""ame_kernels.io: safetensors headers and views, shard writing, checkpoint discovery, atomic folders.

Also home of ``make_family``, the small generated checkpoints test_engine.py and test_cli.py use.
"""

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ame_kernels.errors import MergeError
from ame_kernels.io import AtomicDir, SafetensorsFile, ShardWriter, open_checkpoint, read_header
from ame_kernels.io.atomic import remove_stale_temps
from ame_kernels.engine import parse_size


def tiny_state_dict(seed: int, dtype=torch.bfloat16, vocab=97, hidden=48, layers=2) -> dict:
    """A Llama-shaped miniature with odd sizes, a mix of dtypes and one integer buffer."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"model.embed_tokens.weight": r(vocab, hidden).to(dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = r(hidden, hidden).to(dtype)
        sd[p + "mlp.up_proj.weight"] = r(2 * hidden + 3, hidden).to(dtype)
        sd[p + "input_layernorm.weight"] = (1 + 0.1 * r(hidden)).to(torch.float32)
        sd[p + "mlp.gate_bias"] = r(131).to(torch.float16)
    sd["model.norm.weight"] = r(hidden).to(torch.float32)
    sd["lm_head.weight"] = r(vocab, hidden).to(dtype)
    sd["model.position_ids"] = torch.arange(17)
    return sd


def write_checkpoint(sd: dict, folder: str, shards: int = 1, fmt: str = "safetensors") -> str:
    """Save ``sd`` as a Hugging Face style folder (sharded with an index when shards > 1)."""
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    parts = [names[k::shards] for k in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for k, part in enumerate(parts):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}.{ext}"
        sub = {n: sd[n].contiguous() for n in part}
        if fmt == "safetensors":
            save_file(sub, os.path.join(folder, fname), metadata={"format": "pt"})
        else:  # "bin": torch.save's zip format; "legacy": the pre-1.6 format, which cannot be mapped
            torch.save(sub, os.path.join(folder, fname), _use_new_zipfile_serialization=fmt == "bin")
        weight_map.update({n: fname for n in part})
    if shards > 1:
        with open(os.path.join(folder, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "hidden_size": 48, "source": folder}, f)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "source": folder}, f)
    return folder


def make_family(root, n=3, shards=1, fmt="safetensors", dtype=torch.bfloat16) -> tuple:
    """n ingredient folders under ``root``; returns (paths, state dicts)."""
    sds = [tiny_state_dict(100 + i, dtype) for i in range(n)]
    paths = [write_checkpoint(sd, os.path.join(str(root), f"m{i}"), shards, fmt) for i, sd in enumerate(sds)]
    return paths, sds


def load_folder(folder: str) -> dict:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        out.update(load_file(os.path.join(folder, fname)))
    return out


# --------------------------------------------------------------------------- safetensors


def _bits(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).reshape(-1).numpy()


def test_views_match_the_safetensors_package(tmp_path):
    sd = tiny_state_dict(0)
    path = str(tmp_path / "a.safetensors")
    save_file(sd, path)
    f = SafetensorsFile(path)
    assert set(f.tensors) == set(sd)
    for name, t in sd.items():
        info = f.tensors[name]
        assert info.shape == tuple(t.shape)
        whole = f.view(info, 0, info.numel)
        np.testing.assert_array_equal(whole.view(np.int16) if info.dtype == "bfloat16" else whole, _bits(t))
        if info.numel > 7:  # an element range in the middle
            np.testing.assert_array_equal(f.view(info, 3, 4).view(whole.dtype), whole[3:7])
        f.release(info, 0, info.numel)
    f.close()


def test_shard_writer_roundtrip_in_pieces(tmp_path):
    sd = tiny_state_dict(1)
    # an odd-sized bf16 tensor before an fp32 one: the writer reorders to keep fp32 data aligned
    entries = [(n, {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}[t.dtype], tuple(t.shape)) for n, t in sd.items()]
    entries.sort(key=lambda e: {"bfloat16": 2, "float16": 2, "float32": 4, "int64": 8}[e[1]])
    path = str(tmp_path / "out.safetensors")
    w = ShardWriter(path, entries, {"format": "pt"}).create()
    for name, t in sd.items():
        flat = _bits(t)
        for s in range(0, flat.size, 50):  # written back to front in 50-element pieces
            w.write(name, s, flat[s : s + 50].view(np.uint16) if t.dtype == torch.bfloat16 else flat[s : s + 50])
    assert w.written == w.data_bytes
    w.close()
    back = load_file(path)
    for name, t in sd.items():
        assert torch.equal(back[name], t), name
    assert os.path.getsize(path) == w.size
    (hlen,) = struct.unpack("<Q", open(path, "rb").read(8))
    assert (8 + hlen) % 8 == 0


def test_truncated_file_is_named(tmp_path):
    path = str(tmp_path / "cut.safetensors")
    save_file({"a": torch.zeros(100), "b": torch.ones(100)}, path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(MergeError, match=r"cut\.safetensors: truncated file: tensor 'b'"):
        read_header(path)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 10**12) + b"{}", "header claims"),
        (struct.pack("<Q", 5) + b"{nope", "corrupt safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "corrupt safetensors header"),
    ],
)
def test_corrupt_files_are_named(tmp_path, payload, match):
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write(payload)
    with pytest.raises(MergeError, match=match) as e:
        read_header(path)
    assert "bad.safetensors" in str(e.value)


def test_bad_header_entries(tmp_path):
    def write(header):
        raw = json.dumps(header).encode()
        path = str(tmp_path / "h.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
        return path

    with pytest.raises(MergeError, match="unknown dtype 'Q7'"):
        read_header(write({"x": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}))
    with pytest.raises(MergeError, match="needs 16 bytes"):
        read_header(write({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}))
    with pytest.raises(MergeError, match="overlap"):
        read_header(write({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "y": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}))


# --------------------------------------------------------------------------- discovery


def test_open_folder_single_and_sharded(tmp_path):
    sd = tiny_state_dict(2)
    single = open_checkpoint(write_checkpoint(sd, str(tmp_path / "one")))
    sharded = open_checkpoint(write_checkpoint(sd, str(tmp_path / "three"), shards=3))
    assert single.kind == sharded.kind == "safetensors"
    assert set(single.tensors) == set(sharded.tensors) == set(sd)
    assert len(sharded.files) == 3
    for name, t in sd.items():
        a, b = single.view(name, 0, t.numel()), sharded.view(name, 0, t.numel())
        np.testing.assert_array_equal(a, b)
    assert [os.path.basename(p) for p in single.aux_files()] == ["config.json", "tokenizer.json"]


def test_open_bin_folder_and_file(tmp_path):
    sd = tiny_state_dict(3)
    folder = write_checkpoint(sd, str(tmp_path / "bin"), shards=2, fmt="bin")
    ck = open_checkpoint(folder)
    assert ck.kind == "torch" and set(ck.tensors) == set(sd)
    name = "lm_head.weight"
    np.testing.assert_array_equal(ck.view(name, 5, 9).view(np.int16), _bits(sd[name])[5:14])
    torch.save({"w": torch.ones(3)}, str(tmp_path / "x.pt"))
    assert open_checkpoint(str(tmp_path / "x.pt")).tensors["w"].shape == (3,)


class NotATensor:
    """Pickled by value into a .bin: weights_only=True must refuse it."""


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="RssFile is read from Linux's /proc/self/status")
def test_bin_pages_are_released_chunk_by_chunk(tmp_path):
    """A zip-format .bin is mapped: reading 64 MiB chunk by chunk with release keeps <= 8 MiB of it resident
    (without release all 64 MiB stay), and a released range reads back the same values."""
    from ame_kernels.io.torchfile import TorchFile

    w = torch.randn(16 << 20, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / "big.bin")
    torch.save({"w": w}, path)
    chunk = 1 << 20
    for release, bound in ((True, (0, 8 << 20)), (False, (60 << 20, 1 << 40))):
        f = TorchFile(path)
        info = f.tensors["w"]
        assert not f.in_memory
        base, peak = _rss_file_bytes(), 0
        for s in range(0, info.numel, chunk):
            v = f.view(info, s, chunk)
            np.testing.assert_array_equal(v, w[s : s + chunk].numpy())  # touches every page of the chunk
            del v
            if release:
                f.release(info, s, chunk)
            peak = max(peak, _rss_file_bytes() - base)
        assert bound[0] <= peak < bound[1], (release, peak / 2**20)
        np.testing.assert_array_equal(f.view(info, 5, 9), w[5:14].numpy())  # read back from the file
        f.close()


def test_bin_non_contiguous_and_shared_tensors(tmp_path):
    """A transposed tensor is read through one contiguous copy (dropped after its last chunk); tied tensors
    (one storage) read right after the other's pages were released."""
    from ame_kernels.io.torchfile import TorchFile

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    sd = {"t": torch.randn(70, 300, generator=g).t(), "emb": emb, "head": emb}
    path = str(tmp_path / "x.bin")
    torch.save(sd, path)
    f = TorchFile(path)
    for name, expected in sd.items():
        info = f.tensors[name]
        assert info.shape == tuple(expected.shape)
        got = []
        for s in range(0, info.numel, 4096):
            got.append(f.view(info, s, min(4096, info.numel - s)).copy())
            f.release(info, s, min(4096, info.numel - s))
        flat = expected.reshape(-1)
        flat = flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()
        np.testing.assert_array_equal(np.concatenate(got), flat)
        assert not f._flat
    f.close()


def test_open_legacy_bin(tmp_path):
    """The legacy (non-zip) format cannot be mapped: it is loaded whole and says so (``in_memory``)."""
    sd = tiny_state_dict(5)
    folder = write_checkpoint(sd, str(tmp_path / "legacy"), fmt="legacy")
    ck = open_checkpoint(folder)
    (f,) = ck.files.values()
    assert ck.kind == "torch" and f.in_memory and f.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    name = "lm_head.weight"
    np.testing.assert_array_equal(ck.view(name, 5, 9).view(np.int16), _bits(sd[name])[5:14])
    zf = open_checkpoint(write_checkpoint(sd, str(tmp_path / "zip"), fmt="bin"))
    assert not next(iter(zf.files.values())).in_memory


def test_bin_needs_weights_only(tmp_path):
    path = str(tmp_path / "evil.bin")
    torch.save({"w": torch.ones(2), "obj": NotATensor()}, path)
    with pytest.raises(MergeError, match=r"evil\.bin: cannot be loaded as a weights-only") as e:
        open_checkpoint(path)
    assert "never unpickles" in str(e.value) and "weights_only=False" not in str(e.value)  # not torch's unsafe advice


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path):
    """{"state_dict": sd} and {"model": sd, "step": ...} (training checkpoints) read as sd."""
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    for key in ("state_dict", "model"):
        path = str(tmp_path / f"{key}.pt")
        torch.save({key: sd, "step": 7, "optimizer": {"lr": 0.1}}, path)
        ck = open_checkpoint(path)
        try:
            assert sorted(ck.tensors) == ["b", "w"] and ck.tensors["w"].shape == (2, 3)
        finally:
            ck.close()


def test_missing_shard_and_inconsistent_index(tmp_path):
    sd = tiny_state_dict(4)
    folder = write_checkpoint(sd, str(tmp_path / "m"), shards=2)
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    with pytest.raises(MergeError, match=r"lists shard 'model-00002-of-00002.safetensors', which is missing"):
        open_checkpoint(folder)
    folder = write_checkpoint(sd, str(tmp_path / "n"), shards=2)
    index = os.path.join(folder, "model.safetensors.index.json")
    data = json.load(open(index))
    data["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    json.dump(data, open(index, "w"))
    with pytest.raises(MergeError, match=r"lacks tensor 'ghost.weight'"):
        open_checkpoint(folder)


def test_missing_paths(tmp_path):
    with pytest.raises(MergeError, match="no such file or folder"):
        open_checkpoint(str(tmp_path / "nope"))
    os.mkdir(tmp_path / "empty")
    with pytest.raises(MergeError, match="no checkpoint found in this folder"):
        open_checkpoint(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- atomic folder


def test_atomic_dir_commit_and_abort(tmp_path):
    target = str(tmp_path / "out")
    with AtomicDir(target) as tmp:
        open(os.path.join(tmp, "f"), "w").write("x")
        assert not os.path.exists(target)
    assert not os.listdir(tmp_path)  # left without a commit: nothing remains

    d = AtomicDir(target)
    tmp = d.create()
    open(os.path.join(tmp, "f"), "w").write("new")
    d.commit()
    assert open(os.path.join(target, "f")).read() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_dir_refuses_existing_then_force_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(MergeError, match="already exists"):
        AtomicDir(str(target))
    d = AtomicDir(str(target), force=True)
    tmp = d.create()
    open(os.path.join(tmp, "f"), "w").write("new")
    assert (target / "keep").read_text() == "old"  # untouched until the commit
    d.commit()
    assert sorted(os.listdir(target)) == ["f"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_stale_temp_of_a_dead_process_is_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{dead.stdout.strip()}"
    stale.mkdir()
    mine = tmp_path / f".out.tmp-{os.getpid()}"
    mine.mkdir()
    remove_stale_temps(str(tmp_path / "out"))
    assert not stale.exists() and mine.exists()


@pytest.mark.parametrize("text, expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1e6", 10**6), (1234, 1234), ("10 kb", 10**4)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["five", "0", "-3GB", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(MergeError, match="shard size"):
        parse_size(text)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_shard_stream_writes_exact_bytes(tmp_path, direct):
    from ame_kernels.io.stream import ShardStream

    rng = np.random.default_rng(0)
    stream = ShardStream(max_reserve=5000, direct=direct)  # tiny buffers: many flushes with unaligned tails
    for k, size in enumerate([13, 4096, 50_001]):
        expected = bytearray()
        path = str(tmp_path / f"f{k}")
        stream.open(path, size)
        while stream.tell() < size:
            n = int(min(rng.integers(1, 3000), size - stream.tell()))
            if rng.random() < 0.5:
                chunk = rng.integers(0, 255, n, dtype=np.uint8)
                stream.append(chunk)
            else:
                arr = stream.reserve_array(n, np.uint8)
                arr[:] = rng.integers(0, 255, n, dtype=np.uint8)
                chunk = arr.copy()
                stream.commit(n)
            expected += chunk.tobytes()
        stream.close_file()
        assert open(path, "rb").read() == bytes(expected)
    stream.open(str(tmp_path / "short"), 100)
    stream.append(b"x" * 10)
    with pytest.raises(RuntimeError, match="produced 10 bytes, expected 100"):
        stream.close_file()
    stream.shutdown()


def test_tied_tensors_of_bin_inputs_are_written_once(tmp_path):
    """T5 / GPT-2 style .bin files tie lm_head to the embeddings: the merge wrote both (twice the bytes)."""
    from safetensors.torch import load_file

    from ame_kernels.engine import merge_checkpoints

    paths = []
    for i in range(2):
        emb = torch.randn(50, 16) + i
        sd = {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.randn(16)}
        os.makedirs(tmp_path / f"m{i}")
        torch.save(sd, tmp_path / f"m{i}" / "pytorch_model.bin")
        paths.append(str(tmp_path / f"m{i}"))
    res = merge_checkpoints(paths, str(tmp_path / "out"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == {"embed.weight", "norm.weight"}
    assert any("'lm_head.weight' shares its storage with 'embed.weight'" in w for w in res.warnings)
    # untied in one model: both names stay
    sd = {"embed.weight": torch.randn(50, 16), "lm_head.weight": torch.randn(50, 16), "norm.weight": torch.randn(16)}
    torch.save(sd, tmp_path / "m1" / "pytorch_model.bin")
    merge_checkpoints(paths, str(tmp_path / "out2"))
    assert set(load_file(str(tmp_path / "out2" / "model.safetensors"))) == {"embed.weight", "lm_head.weight", "norm.weight"}

"""Sharded safetensors folders: read tensor by tensor (onto a mesh too), written as transformers writes them."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import transformers
from flax import traverse_util

from flaxformer_lite import cli
from flaxformer_lite.config import ParallelConfig
from flaxformer_lite.interop import hf, parity, weights
from flaxformer_lite.models import param_logical_axes, stack_layers
from flaxformer_lite.runtime import parallel

transformers.logging.set_verbosity_error()


def _shard_size(model) -> int:
    """A shard size that splits the model's float32 tensors into exactly two files: the
    first stops within one tensor (at most 9% of the total here) of 55%, so the rest fits."""
    sizes = [4 * t.numel() for t in model.state_dict().values()]
    assert max(sizes) < 0.09 * sum(sizes)
    return int(0.55 * sum(sizes))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny random Llama saved by transformers whole and in two shards."""
    root = tmp_path_factory.mktemp("shards")
    model = parity.build_hf("llama", root / "whole")
    model.save_pretrained(root / "two", max_shard_size=_shard_size(model))
    return model, root


def _flat(params):
    return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def test_transformers_shards_load_as_the_whole_file(folders, monkeypatch):
    _, root = folders
    index = json.loads((root / "two" / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 2
    cfg, whole = hf.load(root / "whole")
    # Reads of a few rows at a time: every tensor arrives in several pieces.
    monkeypatch.setattr(weights, "CHUNK_BYTES", 200)
    cfg_two, two = hf.load(root / "two")
    assert cfg_two == cfg
    a, b = _flat(whole), _flat(two)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(b[path], a[path], err_msg=path)


def _drop_from_page_cache(files):
    for file in files:
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.mark.parametrize("cached, direct", [(True, True), (False, True), (False, False)],
                         ids=["page-cache", "direct", "plain"])
def test_a_file_reads_at_any_offset(tmp_path, cached, direct):
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 123, np.uint8).tobytes()
    path = tmp_path / "bytes"
    path.write_bytes(data)
    _drop_from_page_cache([path])
    file = weights._File(path)
    if cached:
        path.read_bytes()
    assert file._cached(0, len(data)) == cached
    file.direct &= direct
    for offset, size in [(0, 10), (5, 4096), (4000, 5000), (len(data) - 7, 7), (0, len(data))]:
        got = file.read(weights._File.buffer(size), offset, size, "t")
        assert got.tobytes() == data[offset : offset + size], (offset, size)
    with pytest.raises(hf.HFError, match=f"{path}: ends inside tensor t; the file is truncated"):
        file.read(weights._File.buffer(10), len(data) - 3, 10, "t")
    file.close()


def test_shards_out_of_the_page_cache_load_the_same(folders, tmp_path, monkeypatch):
    _, root = folders
    shutil.copytree(root / "two", tmp_path / "cold")
    _, warm = hf.load(root / "two")
    _drop_from_page_cache((tmp_path / "cold").glob("*.safetensors"))
    monkeypatch.setattr(weights, "CHUNK_BYTES", 200)  # reads that start and end inside disk blocks
    _, cold = hf.load(tmp_path / "cold")
    jax.tree.map(np.testing.assert_array_equal, cold, warm)


def test_an_error_converting_a_chunk_stops_the_reading_and_is_raised(folders):
    _, root = folders
    ckpt = weights.open_checkpoint(root / "two")
    names = ckpt.file_order(ckpt.keys())
    seen = []
    ckpt.read(names, lambda *chunk: seen.append(chunk[0]), chunk_bytes=200)
    chunks, seen = len(seen), []

    def consume(name, start, rows):
        seen.append(name)
        if name == names[1]:
            raise ValueError(f"cannot convert {name}")

    with pytest.raises(ValueError, match=f"cannot convert {names[1]}"):
        ckpt.read(names, consume, workers=2, chunk_bytes=200)
    assert len(seen) < chunks // 2


def test_our_shards_are_what_transformers_writes_and_reads(folders, tmp_path):
    model, root = folders
    cfg, params = hf.load(root / "whole")
    out = hf.save(cfg, params, tmp_path / "out", model_type="llama", max_shard_size=_shard_size(model))
    ours = json.loads((out / hf.INDEX_FILE).read_text())
    theirs = json.loads((root / "two" / hf.INDEX_FILE).read_text())
    assert ours["metadata"] == theirs["metadata"]  # total_size and total_parameters
    assert ours["weight_map"].keys() == theirs["weight_map"].keys()
    assert sorted(set(ours["weight_map"].values())) == sorted(set(theirs["weight_map"].values()))
    reloaded = parity.hf_class("llama").from_pretrained(out)
    assert parity.round_trip_changes(model, reloaded) == []
    _, back = hf.load(out)
    jax.tree.map(np.testing.assert_array_equal, back, params)

    # Saved again whole into the same folder: the shards and their index are gone.
    hf.save(cfg, params, out, model_type="llama")
    assert sorted(p.name for p in out.glob("model*")) == [hf.WEIGHTS_FILE]


def test_scanned_bfloat16_params_export_in_shards(folders, tmp_path):
    model, root = folders
    cfg, params = hf.load(root / "whole", scan_layers=True, param_dtype="bfloat16")
    out = hf.save(cfg, params, tmp_path / "out", model_type="llama", max_shard_size="100KB")
    assert json.loads((out / hf.CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    assert len(set(json.loads((out / hf.INDEX_FILE).read_text())["weight_map"].values())) == 2
    _, back = hf.load(out, scan_layers=True, param_dtype="bfloat16")
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_missing_shard_is_one_line_naming_the_file_and_its_index(folders, tmp_path, capsys):
    _, root = folders
    broken = tmp_path / "broken"
    shutil.copytree(root / "two", broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(hf.HFError) as err:
        hf.load(broken)
    message = str(err.value)
    assert "\n" not in message
    assert str(broken / "model-00002-of-00002.safetensors") in message and hf.INDEX_FILE in message
    assert cli.main(["convert", "--from-hf", str(broken), "--to", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_load_onto_a_mesh_places_each_tensor_on_its_sharding(folders, scan_layers):
    _, root = folders
    pcfg = ParallelConfig(data=2, fsdp=2, tensor=2)
    mesh = parallel.make_mesh(pcfg)
    assert mesh.devices.size == 8
    cfg, params = hf.load(root / "two", mesh=mesh, parallel=pcfg, scan_layers=scan_layers, param_dtype="bfloat16")
    _, reference = hf.load(root / "whole")
    if scan_layers:
        reference = {"params": stack_layers(reference["params"])}
    expected = _flat(parallel.logical_to_sharding(mesh, pcfg, param_logical_axes(cfg)))
    got, ref = traverse_util.flatten_dict(params, sep="/"), _flat(reference)
    assert got.keys() == ref.keys() == expected.keys()
    assert any(s.spec != jax.sharding.PartitionSpec() for s in expected.values())
    for path, x in got.items():
        assert x.sharding == expected[path], path
        assert x.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(x), ref[path].astype(jax.numpy.bfloat16), err_msg=path)


def test_truncated_shard_is_one_line_naming_the_file(folders, tmp_path):
    _, root = folders
    broken = tmp_path / "broken"
    shutil.copytree(root / "two", broken)
    shard = broken / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(hf.HFError, match="model-00001-of-00002.safetensors: not a readable safetensors file") as err:
        hf.load(broken)
    assert "\n" not in str(err.value)

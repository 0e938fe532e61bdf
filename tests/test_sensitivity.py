import json
import os
import shutil

import pytest
import torch
from torch.nn import functional as F

from spt_core import ModelLayout, compute_sensitivity
from spt_core.data.fingerprint import split_fingerprint
from spt_core.data.mini import write_mini_suite
from spt_core.data.vtab import task_info
from spt_core.experiment import BackboneRef, TaskRef, compute_task_sensitivity
from spt_core.sensitivity import check_sensitivity_split
from spt_ray.cli import main as cli_main
from spt_ray.spec import SensitivitySpec
from spt_ray.store import SensitivityRequest
from tests.conftest import random_batches, tiny_vit


def explicit_sensitivity(model, batches):
    """Brute force: backward through every parameter, square each gradient, sum over batches."""
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad ** 2
    return acc


def test_equals_explicit_sum_of_squared_gradients():
    model = tiny_vit().eval()
    batches = random_batches(3)
    smap = compute_sensitivity(model, batches, progress=False)
    expected = explicit_sensitivity(tiny_vit().eval(), batches)
    assert set(smap) == set(ModelLayout.from_model(model).scored_params)
    for name, scores in smap.items():
        torch.testing.assert_close(scores, expected[name], rtol=1e-5, atol=1e-12)
        assert scores.dtype == torch.float32 and scores.shape == expected[name].shape
    assert smap.meta["num_samples"] == 12 and smap.meta["num_batches"] == 3


def test_scored_set_excludes_head_embeddings_and_cls_token():
    smap = compute_sensitivity(tiny_vit(), random_batches(1), progress=False)
    for name in smap:
        assert not name.startswith(("head", "cls_token", "pos_embed", "patch_embed"))
    assert "blocks.0.attn.qkv.weight" in smap and "blocks.1.norm2.bias" in smap and "norm.weight" in smap
    q = smap.logical("blocks.0.attn.q.weight")
    assert q.shape == (48, 48) and torch.equal(q, smap["blocks.0.attn.qkv.weight"][:48])


def test_requires_grad_flags_restored_and_num_batches_honoured():
    model = tiny_vit()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head"))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    smap = compute_sensitivity(model, iter(random_batches(5)), num_batches=2, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert smap.meta["num_batches"] == 2
    assert all(p.grad is None for p in model.parameters())


def test_head_is_the_callers_and_a_zero_head_gives_zero_scores():
    model = tiny_vit().eval()
    torch.nn.init.zeros_(model.head.weight)
    smap = compute_sensitivity(model, random_batches(1), progress=False)
    assert all(float(s.abs().max()) == 0.0 for s in smap.values())


def test_empty_batches_raise():
    with pytest.raises(ValueError, match="no batches"):
        compute_sensitivity(tiny_vit(), [], progress=False)


def test_save_load_round_trip(tmp_path):
    smap = compute_sensitivity(tiny_vit(), random_batches(1), progress=False)
    smap.save(tmp_path / "map.safetensors")
    back = type(smap).load(tmp_path / "map.safetensors")
    assert back.meta == smap.meta and back.layout == smap.layout
    assert all(torch.equal(back[n], smap[n]) for n in smap)


# ---- only training splits are scored; the cache key follows the data the pass reads ------------------
TASK_OF_SUITE = {"mini": "shapes", "vtab": "cifar", "fgvc": "cub"}
EVALUATION_SPLITS = [("mini", "test"), ("mini", "val200"), ("mini", "train800val200"), ("vtab", "test"),
                     ("vtab", "val200"), ("vtab", "train800val200"), ("fgvc", "val"), ("fgvc", "test"),
                     ("fgvc", "trainval")]


@pytest.mark.parametrize("suite, split", EVALUATION_SPLITS)
def test_a_split_holding_evaluation_data_is_refused_everywhere_in_one_line(suite, split, tmp_path):
    """The map places the parameters both phases train: val / test images in it leak into the final score."""
    task = TaskRef(suite, TASK_OF_SUITE[suite], str(tmp_path / "absent"))
    for make in (lambda: check_sensitivity_split(split, suite), lambda: SensitivitySpec(split=split),
                 lambda: SensitivityRequest(task, BackboneRef(), split=split),
                 lambda: compute_task_sensitivity(task, BackboneRef(), split=split, progress=False)):
        with pytest.raises(ValueError, match="leak evaluation data into parameter placement") as err:
            make()
        assert "\n" not in str(err.value) and "fix: use train" in str(err.value)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("suite, split", [("mini", "train800"), ("vtab", "train800"), ("fgvc", "train"),
                                          ("mini", None), ("fgvc", None)])
def test_the_search_phase_training_split_is_accepted(suite, split, tmp_path):
    assert check_sensitivity_split(split, suite) == split
    assert SensitivitySpec(split=split).split == split
    request = SensitivityRequest(TaskRef(suite, TASK_OF_SUITE[suite], str(tmp_path)), BackboneRef(), split=split)
    assert request.data_split == {"fgvc": "train"}.get(suite, "train800")


def test_a_split_of_another_suite_is_refused_for_this_one():
    with pytest.raises(ValueError, match=r"use train800 \(vtab\)"):
        check_sensitivity_split("train", "vtab")
    with pytest.raises(ValueError, match=r"use train \(fgvc\)"):
        check_sensitivity_split("train800", "fgvc")


def test_cli_sensitivity_split_test_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    code = cli_main(["sensitivity", "--task", "shapes", "--split", "test", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "'test' is not allowed" in err and "train800" in err and "leak" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.fixture
def mini_shapes(tmp_path):
    """A real generated mini task (48 / 16 / 16 images), in the layout `spt-ray data mini` writes."""
    write_mini_suite(tmp_path / "a", seed=0, tasks=["shapes"], sizes=(48, 16, 16))
    return tmp_path / "a"


def _key(root) -> dict:
    return SensitivityRequest(TaskRef("mini", "shapes", str(root)), BackboneRef(), num_batches=1).key_fields()


def test_the_cache_key_changes_with_the_data_the_pass_reads_and_only_with_it(mini_shapes, tmp_path):
    first = _key(mini_shapes)
    assert first["data"]["images"] == 48 and first["split"] == "train800"
    assert _key(mini_shapes) == first  # unchanged data: same key
    shutil.copytree(mini_shapes, tmp_path / "copy", copy_function=shutil.copy2)
    assert _key(tmp_path / "copy")["key"] == first["key"]  # an unchanged copy (bytes and mtimes kept)

    task = mini_shapes / "shapes"
    (task / "val200.txt").write_text((task / "val200.txt").read_text().replace(" ", "  "))
    assert _key(mini_shapes)["key"] == first["key"]  # the pass does not read val200
    lines = (task / "train800.txt").read_text().splitlines()
    (task / "train800.txt").write_text("\n".join(lines[:-1]) + "\n")  # one image fewer
    edited = _key(mini_shapes)
    assert edited["key"] != first["key"] and edited["data"]["images"] == 47
    path, label = lines[-1].rsplit(None, 1)
    other = (int(label) + 1) % task_info("shapes").num_classes
    (task / "train800.txt").write_text("\n".join(lines[:-1] + [f"{path} {other}"]) + "\n")  # a label changed
    relabelled = _key(mini_shapes)
    assert relabelled["key"] not in (first["key"], edited["key"]) and relabelled["data"]["images"] == 48

    image = task / lines[0].split()[0]
    before = image.stat()
    shutil.copyfile(task / lines[1].split()[0], image)  # another image's pixels under the same name
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    replaced = _key(mini_shapes)
    assert replaced["key"] != relabelled["key"]
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))  # touched only: size+mtime
    assert _key(mini_shapes)["key"] not in (relabelled["key"], replaced["key"])  # recomputed, never reused stale


def test_an_fgvc_key_follows_its_train_images_and_all_three_label_files(tmp_path):
    """FGVC class ids are remapped over train, val and test: any of the three files changes train's labels."""
    from tests.test_data_fgvc import SPLITS, write_fgvc

    data_dir = write_fgvc(tmp_path, "cub", "images")
    first = split_fingerprint("fgvc", tmp_path, "cub", "train")
    assert first == split_fingerprint("fgvc", tmp_path, "cub", "train") and first["images"] == len(SPLITS["train"])
    (data_dir / "test.json").write_text(json.dumps({**SPLITS["test"], "d/9.jpg": 42}))
    relabelled = split_fingerprint("fgvc", tmp_path, "cub", "train")
    assert relabelled != first
    image = data_dir / "images" / "a" / "1.jpg"
    shutil.copyfile(data_dir / "images" / "b" / "3.jpg", image)
    assert split_fingerprint("fgvc", tmp_path, "cub", "train") != relabelled


def test_a_sweep_scores_only_its_own_suites_training_split(tmp_path):
    from spt_ray.spec import SweepSpec

    common = dict(name="s", data_root=str(tmp_path), storage=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match=r"'train' is not allowed.*use train800 \(vtab\)"):
        SweepSpec(tasks=("cifar",), suite="vtab", sensitivity=SensitivitySpec(split="train"), **common)
    spec = SweepSpec.from_dict({**common, "tasks": ["cub"], "suite": "fgvc", "sensitivity": {"split": "train"}})
    assert spec.sensitivity.split == "train"
    with pytest.raises(ValueError, match="leak evaluation data"):
        SweepSpec.from_dict({**common, "tasks": ["shapes"], "sensitivity": {"split": "val200"}})
    assert not (tmp_path / "runs").exists()

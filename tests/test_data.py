"""FFCV betons written from real images (scikit-learn's digits and generated JPEGs), read back by the loaders."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from autowu.data import DataConfig, TrainLoaderConfig, ValLoaderConfig, WriteConfig, beton_info
from autowu.data import train_loader, val_loader, write_betons
from autowu.data.digits import build_digits_folder
from autowu.data.folders import list_image_folder, open_rgb
from autowu.data.lighting import (FlipLightingNormalize, LightingBias, SeededHorizontalFlip,
                                  flip_lighting_normalize_reference, lighting_offsets, sample_alphas,
                                  sample_flips)
from autowu.data.sample_rng import EpochCell
from autowu.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from conftest import REPO, run_deepspeed

WRITE = WriteConfig(max_resolution=64, num_workers=2)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits folder with ImageNet's odd files added, and its betons."""
    root = build_digits_folder(str(tmp_path_factory.mktemp("digits") / "folders"))
    rng = np.random.default_rng(0)
    odd = os.path.join(root, "train", "3")
    pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert("CMYK").save(os.path.join(odd, "cmyk.JPEG"))
    Image.fromarray(pixels).convert("L").save(os.path.join(odd, "gray.JPEG"))
    Image.fromarray(pixels).save(os.path.join(odd, "png_in_disguise.JPEG"), format="PNG")
    Image.fromarray(pixels).save(os.path.join(odd, "truncated.JPEG"), quality=90)
    with open(os.path.join(odd, "truncated.JPEG"), "r+b") as f:
        f.truncate(300)
    with open(os.path.join(odd, "not_an_image.JPEG"), "w") as f:
        f.write("this is not a JPEG")
    out = str(tmp_path_factory.mktemp("betons"))
    report = write_betons(root, out, WRITE, progress=False)
    return root, out, report


def test_writer_converts_odd_files_and_skips_unreadable_ones(digits):
    root, out, report = digits
    train = report["splits"]["train"]
    assert train["skipped"] == 2
    assert sorted(os.path.basename(s["path"]) for s in train["skipped_files"]) == ["not_an_image.JPEG",
                                                                                 "truncated.JPEG"]
    assert train["converted"] == {"CMYK->RGB": 1, "L->RGB": 1, "PNG named .jpeg": 1}
    assert train["images"] == 1438 + 3 and report["splits"]["val"]["images"] == 359
    assert beton_info(os.path.join(out, "train.beton"))["num_samples"] == 1441
    saved = json.loads(open(os.path.join(out, "write_report.json")).read())
    assert saved["classes"] == [str(d) for d in range(10)]


def test_val_loader_reads_back_the_source_images_and_labels(digits):
    root, out, _ = digits
    config = ValLoaderConfig(resolution=32, crop_ratio=1.0, batch_size=50, num_workers=1)
    # FFCV reuses its output buffers a few batches later: keep copies.
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in val_loader(os.path.join(out, "val.beton"), config)])
    images, labels = torch.cat(images), torch.cat(labels)
    _, samples = list_image_folder(os.path.join(root, "val"))
    assert images.shape == (359, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in samples]
    # Pixels: the source JPEG, normalised (the beton re-encodes half of the images at quality 90).
    first = np.asarray(open_rgb(samples[0][0])[0], dtype=np.float64)
    expected = torch.tensor(((first - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1), dtype=torch.float32)
    assert (images[0] - expected).abs().mean() < 0.05
    again = torch.cat([x.clone() for x, _ in val_loader(os.path.join(out, "val.beton"), config)])
    assert torch.equal(images, again)


def test_train_loader_shapes_order_per_seed_and_lighting(digits):
    _, out, _ = digits
    beton = os.path.join(out, "train.beton")
    config, batch = TrainLoaderConfig(resolution=24, num_workers=1), 32

    def epochs(loader, count=1):
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(count)]

    seed0_epoch0, seed0_epoch1 = epochs(train_loader(beton, config, batch, seed=0), 2)
    images, labels = seed0_epoch0[0]
    assert images.shape == (32, 3, 24, 24) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert len(seed0_epoch0) == 1441 // 32  # drop_last

    def order(batches):
        return torch.cat([y for _, y in batches]).tolist()

    assert order(seed0_epoch0) != order(seed0_epoch1)  # a new order every epoch
    again, = epochs(train_loader(beton, config, batch, seed=0))
    assert order(again) == order(seed0_epoch0)  # the same seed, the same order
    other, = epochs(train_loader(beton, config, batch, seed=1))
    assert order(other) != order(seed0_epoch0)
    resumed, = epochs(train_loader(beton, config, batch, seed=0, epoch=1))
    assert order(resumed) == order(seed0_epoch1)  # a resumed run reads epoch 1's order
    # Augmentation from (seed, epoch, sample): the same seed gives the same pixels, a resume its unbroken self's.
    pixels = lambda batches: torch.cat([x for x, _ in batches])  # noqa: E731
    assert torch.equal(pixels(again), pixels(seed0_epoch0))
    assert torch.equal(pixels(resumed), pixels(seed0_epoch1))
    assert not torch.equal(pixels(other)[:32], pixels(seed0_epoch0)[:32])


def test_gpu_style_lighting_bias_computes_the_cpu_paths_augmentation(digits):
    """The GPU path (flip on uint8, normalise, lighting added as a per-image bias) against the CPU's fused
    pass, on the same images, seed and epoch: the same augmentation."""
    _, out, _ = digits
    beton = os.path.join(out, "train.beton")
    config = TrainLoaderConfig(resolution=24, num_workers=1, flip=True, lighting_alphastd=0.1)
    fused = train_loader(beton, config, 64, seed=3, epoch=2)
    on_batch = train_loader(beton, config, 64, seed=3, epoch=2, lighting_on_batch=True)
    no_lighting = train_loader(beton, TrainLoaderConfig(**{**config.__dict__, "lighting_alphastd": 0.0}), 64,
                               seed=3, epoch=2, lighting_on_batch=True)
    assert not fused.adds_lighting_bias and on_batch.adds_lighting_bias and not no_lighting.adds_lighting_bias
    for (a, la), (b, lb), (c, _) in zip(fused, on_batch, no_lighting):
        assert torch.equal(la, lb)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
        # the lighting moves each image by one colour offset: (a - c) is constant over each image's pixels
        shift = (a - c).flatten(2)
        assert shift.std(dim=2).max() < 1e-4 and shift.mean(dim=2).abs().max() > 1e-3


def test_the_tail_fused_into_the_decoder_is_the_operation_bit_for_bit(digits):
    """The CPU loader runs flip, lighting and normalisation inside the decoder's loop; the same operation on its
    own after the decoder gives the same bits."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    from autowu.data.decoders import SeededRandomResizedCropDecoder
    _, out, _ = digits
    batches = {}
    for fused in (True, False):
        cell = EpochCell(2)
        tail = FlipLightingNormalize(IMAGENET_MEAN, IMAGENET_STD, flip_prob=0.5, alphastd=0.1, seed=3,
                                     epoch_cell=cell)
        decoder = SeededRandomResizedCropDecoder((24, 24), seed=3, epoch_cell=cell, tail=tail if fused else None)
        image = [decoder] + ([] if fused else [tail]) + [ToTensor(), ToTorchImage()]
        loader = Loader(os.path.join(out, "train.beton"), batch_size=64, num_workers=2,
                        order=OrderOption.SEQUENTIAL, pipelines={"image": image, "label": [IntDecoder(), ToTensor()]})
        batches[fused] = [images.clone() for images, _ in loader]
    assert len(batches[True]) == len(batches[False]) > 1 and batches[True][0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(batches[True], batches[False]))


def _compiled(op, enabled):
    from ffcv.pipeline.compiler import Compiler
    Compiler.set_enabled(enabled)
    try:
        return Compiler.compile(op.generate_code())
    finally:
        Compiler.set_enabled(True)


def test_fused_cpu_tail_matches_numpy_compiled_and_not():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (8, 5, 6, 3), dtype=np.uint8)
    indices = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    cell = EpochCell(2)
    alphas, flips = sample_alphas(7, 2, indices, 0.1), sample_flips(7, 2, indices, 0.5)
    assert 0 < flips.sum() < 8 and np.array_equal(alphas[1], alphas[3])  # sample 1 twice: the same draws
    expected = flip_lighting_normalize_reference(images, flips, alphas, IMAGENET_MEAN, IMAGENET_STD)
    op = FlipLightingNormalize(IMAGENET_MEAN, IMAGENET_STD, flip_prob=0.5, alphastd=0.1, seed=7, epoch_cell=cell)
    for enabled in (True, False):
        got = _compiled(op, enabled)(images, np.empty(images.shape, np.float32), indices)
        np.testing.assert_allclose(got, expected, atol=1e-4)
    code = _compiled(op, True)
    cell.set(3)  # the compiled code reads the epoch at run time
    next_epoch = code(images, np.empty(images.shape, np.float32), indices)
    expected = flip_lighting_normalize_reference(images, sample_flips(7, 3, indices, 0.5),
                                                 sample_alphas(7, 3, indices, 0.1), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(next_epoch, expected, atol=1e-4)
    with pytest.raises(ValueError, match="alphastd"):
        FlipLightingNormalize(IMAGENET_MEAN, IMAGENET_STD, alphastd=-1.0)


def test_flip_and_lighting_bias_ops_draw_per_sample():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (16, 4, 5, 3), dtype=np.uint8)
    indices = np.arange(100, 116)
    cell = EpochCell(1)
    flips = sample_flips(9, 1, indices, 0.5)
    expected = images.copy()
    expected[flips] = expected[flips][:, :, ::-1]
    bias = _compiled(LightingBias(IMAGENET_STD, 0.1, seed=9, epoch_cell=cell), True)(
        np.zeros((16, 1), np.int64), np.empty((16, 3), np.float32), indices)
    np.testing.assert_allclose(bias, lighting_offsets(sample_alphas(9, 1, indices, 0.1)) / IMAGENET_STD, rtol=1e-5)
    # alphas ~ N(0, 0.1) per component; offsets of fractions of a level, not rounded to whole levels.
    alphas = sample_alphas(0, 0, range(4000), 0.1)
    assert np.allclose(alphas.std(0), 0.1, rtol=0.06) and np.allclose(alphas.mean(0), 0.0, atol=0.006)
    assert np.abs(np.corrcoef(alphas.T) - np.eye(3)).max() < 0.06
    offsets = lighting_offsets(alphas)
    assert np.abs(offsets - np.rint(offsets)).mean() > 0.2
    for enabled in (True, False):
        got = _compiled(SeededHorizontalFlip(0.5, seed=9, epoch_cell=cell), enabled)(
            images, np.empty_like(images), indices)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_shards_on_two_ranks_are_disjoint_and_cover_the_set(tmp_path):
    folder = tmp_path / "folder"
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(folder / split / cls)
    # 40 generated JPEGs; the label field of this beton is rewritten to each sample's index below.
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
            folder / "train" / "ab"[i % 2] / f"{i:02d}.JPEG")
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
            folder / "val" / "ab"[i % 2] / f"{i:02d}.JPEG")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    _, samples = list_image_folder(str(folder / "train"))

    class Indexed:
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return open_rgb(samples[i][0])[0], i

    beton = str(tmp_path / "indexed.beton")
    DatasetWriter(beton, {"image": RGBImageField(), "label": IntField()}, num_workers=1).from_indexed_dataset(
        Indexed())
    proc = run_deepspeed([REPO / "tests" / "ds_scripts" / "shards.py", beton, tmp_path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shards = [json.loads((tmp_path / f"shard{r}.json").read_text()) for r in range(2)]
    for epoch in ("train_epoch0", "train_epoch1"):
        a, b = set(shards[0][epoch]), set(shards[1][epoch])
        assert len(shards[0][epoch]) == len(shards[1][epoch]) == 20
        assert not a & b and a | b == set(range(40))
    assert shards[0]["train_epoch0"] != shards[0]["train_epoch1"]  # a new order each epoch
    assert set(shards[0]["val"]) | set(shards[1]["val"]) == set(range(40))
    assert not set(shards[0]["val"]) & set(shards[1]["val"])


def test_bad_input_gets_one_clear_error(digits, tmp_path):
    _, out, _ = digits
    with pytest.raises(FileNotFoundError, match="beton not found: .*missing.beton"):
        train_loader(str(tmp_path / "missing.beton"), TrainLoaderConfig(), 32)
    not_beton = tmp_path / "fake.beton"
    not_beton.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="not a readable FFCV beton"):
        val_loader(str(not_beton), ValLoaderConfig())
    with pytest.raises(ValueError, match="fewer than one batch of 4096"):
        train_loader(os.path.join(out, "train.beton"), TrainLoaderConfig(), 4096)
    with pytest.raises(RuntimeError, match="process group"):
        train_loader(os.path.join(out, "train.beton"), TrainLoaderConfig(), 32, distributed=True)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        train_loader(os.path.join(out, "train.beton"), TrainLoaderConfig(), 0)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        write_betons(str(tmp_path / "nowhere"), str(tmp_path / "o"), WRITE, progress=False)
    os.makedirs(tmp_path / "empty" / "train" / "cat")
    os.makedirs(tmp_path / "empty" / "val" / "cat")
    with pytest.raises(ValueError, match="no images"):
        write_betons(str(tmp_path / "empty"), str(tmp_path / "o"), WRITE, progress=False)
    with pytest.raises(ValueError, match="unknown key 'resolutoin' \\(did you mean 'resolution'\\?\\)"):
        DataConfig.from_dict({"train": {"resolutoin": 224}})
    with pytest.raises(ValueError, match="write_mode"):
        DataConfig.from_dict({"write": {"write_mode": "png"}})


def test_shipped_configs_load():
    digits = DataConfig.from_json(str(REPO / "ffcv_configs" / "digits_cpu.json"))
    assert (digits.train.resolution, digits.val.resolution, digits.val.crop_ratio) == (32, 32, 1.0)
    imagenet = DataConfig.from_json(str(REPO / "ffcv_configs" / "rn50_imagenet.json"))
    assert (imagenet.write.write_mode, imagenet.write.max_resolution, imagenet.write.compress_probability,
            imagenet.write.jpeg_quality) == ("proportion", 500, 0.5, 90)
    assert imagenet.train.lighting_alphastd == 0.1 and imagenet.val.crop_ratio == 224 / 256


def test_fast_resize_is_opencvs_linear_under_2x_and_area_beyond():
    import cv2
    from ffcv.pipeline.compiler import Compiler

    from autowu.data.decoders import HAVE_FAST_RESIZE, fast_resize_crop
    assert HAVE_FAST_RESIZE  # setup.py builds it against the OpenCV that scripts/setup.sh installs
    rng = np.random.default_rng(4)
    source = np.asarray(Image.fromarray(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)).resize(
        (400, 400), Image.BICUBIC))
    compiled = Compiler.compile(fast_resize_crop)
    for (top, bottom, left, right), interpolation in [((0, 300, 20, 320), cv2.INTER_LINEAR),
                                                      ((10, 190, 0, 180), cv2.INTER_LINEAR),
                                                      ((0, 400, 0, 400), cv2.INTER_AREA)]:
        out = np.empty((176, 176, 3), np.uint8)
        compiled(source, top, bottom, left, right, out)
        expected = cv2.resize(source[top:bottom, left:right], (176, 176), interpolation=interpolation)
        assert np.abs(out.astype(int) - expected).max() <= 2  # the system OpenCV and the wheel's may round apart


def test_loader_workers_follow_the_cores_and_ranks_of_the_node(monkeypatch, tmp_path):
    import numba

    from autowu.data.loaders import loader_workers, warn_if_page_cache_too_small
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(None) == min(cores, numba.config.NUMBA_NUM_THREADS)
    assert loader_workers(None, local_world_size=8) == max(1, cores // 8)
    monkeypatch.setenv("LOCAL_SIZE", str(cores))  # as DeepSpeed's launcher sets it: one thread a rank here
    assert loader_workers(None) == 1
    assert loader_workers(1) == 1  # an explicit number wins
    with pytest.raises(ValueError, match="numba allows 1 to"):
        loader_workers(numba.config.NUMBA_NUM_THREADS + 1)  # FFCV's numba.set_num_threads would raise

    beton = tmp_path / "big.beton"
    beton.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1024, "SC_PHYS_PAGES": 2}[name])
    with pytest.warns(UserWarning, match="4 KiB|0.0 GiB but this node has 0.0 GiB"):
        assert "os_cache" in warn_if_page_cache_too_small(str(beton), os_cache=True)
    assert warn_if_page_cache_too_small(str(beton), os_cache=False) is None


def test_the_writer_chooses_jpeg_or_raw_by_the_image_not_by_chance(tmp_path):
    """FFCV's 'proportion' mode drew np.random in each writer process: two writes of one folder (two nodes'
    copies of the embedded dataset) held different pixels. Now the choice is a hash of the image."""
    from ffcv.reader import Reader
    root = build_digits_folder(str(tmp_path / "folders"))
    config = WriteConfig(max_resolution=64, num_workers=2, compress_probability=0.5)
    modes, pixels = [], []
    for copy in ("a", "b"):
        write_betons(root, str(tmp_path / copy), config, progress=False)
        reader = Reader(str(tmp_path / copy / "val.beton"))
        modes.append(reader.metadata["f0"]["mode"].copy())
        loader = val_loader(str(tmp_path / copy / "val.beton"),
                            ValLoaderConfig(resolution=32, crop_ratio=1.0, batch_size=359, num_workers=1))
        pixels.append(torch.cat([x.clone() for x, _ in loader]))
    assert np.array_equal(modes[0], modes[1]) and 0.35 < modes[0].mean() < 0.65  # about half JPEG, the same half
    assert torch.equal(pixels[0], pixels[1])

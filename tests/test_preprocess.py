"""Preprocessing parity: open_clip's eval transform and HF's CLIP image processors."""
import numpy as np
import pytest
from PIL import Image

from cgjax.preprocess import PreprocessConfig, preprocess_batch, preprocess_image


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
           [(40, 40), (37, 61), (90, 31), (120, 97), (33, 33)]]
    out.append(Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA"))
    out.append(Image.fromarray(rng.integers(0, 256, (50, 43), dtype=np.uint8), "L"))
    return out


@pytest.mark.parametrize("pp", [
    dict(size=32),
    dict(size=(32, 48)),
    dict(size=32, resize_mode="longest", fill_color=7),
    dict(size=(24, 32), resize_mode="longest"),
    dict(size=32, resize_mode="squash", interpolation="bilinear"),
    dict(size=28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
])
def test_matches_open_clip_eval_transform(images, pp):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    ref = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    cfg = PreprocessConfig.from_open_clip(pp)
    for im in images:
        want = ref(im).numpy()
        got = preprocess_image(im, cfg)
        assert got.dtype == np.float32 and got.shape == want.shape, (im.size, got.shape, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=f"{pp} {im.size} {im.mode}")


HF_CASES = [
    dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    dict(size={"shortest_edge": 36}, crop_size={"height": 30, "width": 32}),
    dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=2,
         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
]


@pytest.mark.parametrize("kw", HF_CASES)
def test_matches_hf_clip_image_processor_pil(images, kw):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(**kw)
    cfg = PreprocessConfig.from_hf_image_processor(proc.to_dict())
    for im in images:
        want = proc(im, return_tensors="np")["pixel_values"][0]
        np.testing.assert_array_equal(preprocess_image(im, cfg), want, err_msg=f"{kw} {im.size} {im.mode}")


@pytest.mark.parametrize("kw", HF_CASES[:2])
def test_close_to_hf_clip_image_processor_torchvision(images, kw):
    """transformers 5's default CLIPImageProcessor resizes a uint8 tensor (torchvision), which
    differs from PIL's resize by at most one uint8 step."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(**kw)
    cfg = PreprocessConfig.from_hf_image_processor(proc.to_dict())
    for im in images:
        want = proc(im, return_tensors="np")["pixel_values"][0]
        got = preprocess_image(im, cfg)
        assert got.shape == want.shape
        one_step = 1.0 / 255 / min(cfg.std) + 1e-5
        assert np.abs(got - want).max() <= one_step
        assert np.mean(np.abs(got - want) > 1e-5) < 0.2  # most pixels identical


@pytest.mark.parametrize("kw", HF_CASES)
def test_to_hf_image_processor_round_trip(images, kw):
    """The config written by ``to_hf_image_processor`` (what the export puts in the HF LLaVA dir)
    builds an HF processor that preprocesses exactly as the config it came from."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = PreprocessConfig.from_hf_image_processor(CLIPImageProcessorPil(**kw).to_dict())
    written = cfg.to_hf_image_processor()
    assert PreprocessConfig.from_hf_image_processor(written) == cfg
    proc = CLIPImageProcessorPil(**{k: v for k, v in written.items() if k != "image_processor_type"})
    for im in images:
        np.testing.assert_array_equal(preprocess_image(im, cfg), proc(im, return_tensors="np")["pixel_values"][0])
    with pytest.raises(ValueError, match="convention"):
        PreprocessConfig(size=32).to_hf_image_processor()


def test_batch_and_arrays(images):
    cfg = PreprocessConfig(size=32)
    batch = preprocess_batch(images[:3], cfg)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess_image(images[1], cfg))
    arr = np.asarray(images[0])
    np.testing.assert_array_equal(preprocess_image(arr, cfg), batch[0])
    assert preprocess_batch([], cfg).shape == (0, 3, 32, 32)


def test_config_errors():
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessConfig(interpolation="cubic-ish")
    with pytest.raises(ValueError, match="resize_mode"):
        PreprocessConfig(resize_mode="fit")
    with pytest.raises(ValueError, match="longest_edge"):
        PreprocessConfig.from_hf_image_processor({"size": {"shortest_edge": 10, "longest_edge": 20}})
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_image(np.zeros((4, 4, 3), np.float32), PreprocessConfig(size=4))

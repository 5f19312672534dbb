"""The Vision Transformer: configuration, the forward pass against a float64 reference, gradients
against finite differences, argument checks, checkpoints, image batches and resumed training,
learning digits, and the vision demo on the command line."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st
from model_cases import check_gradients, mean_loss, rel_err

import pytransformer as pt
from pytransformer.cli import main
from pytransformer.io import CheckpointError
from pytransformer.train import AdamW, ImageBatch, ImageBatcher, Trainer
from pytransformer.vision_demo import (
    DigitSplit,
    load_digit_split,
    train_vision_model,
    vision_settings,
)


def tiny_vit(**overrides) -> pt.ViTConfig:
    """6 x 6 images of 2 channels in 3 x 3 patches (4 patches + the class token), C=16, H=2.
    init_std 0.5: with the paper's 0.02 the class token's row is almost constant, so its layer
    norm divides by nearly eps and a finite difference of step 1e-2 measures curvature."""
    base = dict(
        image_size=6, patch_size=3, num_classes=3, channels=2, d_model=16, num_heads=2, d_ff=24,
        num_layers=2, dropout=0.0, init_std=0.5,
    )
    base.update(overrides)
    return pt.ViTConfig(**base)


def image_batch(cfg: pt.ViTConfig, rng: np.random.Generator, B: int = 3) -> ImageBatch:
    shape = (B, cfg.channels, cfg.image_size, cfg.image_size)
    images = rng.standard_normal(shape).astype(np.float32)
    return ImageBatch(images, rng.integers(0, cfg.num_classes, B))


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_derived_sizes():
    cfg = tiny_vit(layer_norm_eps=1e-5, activation="relu")
    assert pt.ViTConfig.from_json(cfg.to_json()) == cfg
    assert (cfg.grid, cfg.num_patches, cfg.patch_dim) == (2, 4, 18)
    assert cfg.num_encoder_layers == 2 and cfg.norm_first


@pytest.mark.parametrize(
    "field, value, exc, match",
    [
        ("patch_size", 4, ValueError, "does not divide image_size 6"),
        ("patch_size", 0, ValueError, "patch_size"),
        ("image_size", 6.0, TypeError, "image_size"),
        ("num_classes", 1, ValueError, "num_classes"),
        ("channels", True, TypeError, "channels"),
        ("num_heads", 3, ValueError, "divisible"),
        ("dropout", 1.0, ValueError, "dropout"),
        ("layer_norm_eps", 0.0, ValueError, "layer_norm_eps"),
        ("activation", "tanh", ValueError, "activation"),
        ("init_std", -1.0, ValueError, "init_std"),
    ],
)
def test_config_rejects_invalid(field, value, exc, match):
    with pytest.raises(exc, match=match):
        tiny_vit(**{field: value})


def test_model_rejects_a_token_config():
    with pytest.raises(TypeError, match="ViTConfig"):
        pt.VisionTransformer(pt.TransformerConfig(src_vocab_size=5, tgt_vocab_size=5))
    with pytest.raises(TypeError, match="TransformerConfig"):
        pt.Transformer(tiny_vit())


# ----------------------------------------------------------------------------------------------
# the forward pass
# ----------------------------------------------------------------------------------------------
@given(
    patch=st.sampled_from([1, 2, 3]),
    grid=st.integers(1, 3),
    channels=st.integers(1, 3),
    B=st.integers(1, 3),
    layers=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_forward_and_class_attention_match_the_float64_reference(
    patch, grid, channels, B, layers, seed
):
    cfg = tiny_vit(
        image_size=patch * grid, patch_size=patch, channels=channels, num_layers=layers,
        activation="gelu",
    )
    model = pt.VisionTransformer(cfg, seed=seed).eval()
    images = image_batch(cfg, np.random.default_rng(seed), B).images
    logits, probs = ref.vit_forward(
        model.parameters(), images, patch, cfg.num_heads, layers, cfg.layer_norm_eps
    )
    assert rel_err(model.forward(images), logits) < 1e-4
    np.testing.assert_array_equal(model.predict(images), model.forward(images).argmax(axis=1))
    att = model.class_attention(images)
    assert att.shape == (B, layers, cfg.num_heads, grid, grid)
    for k, p in enumerate(probs):  # the reference's weights over the patches, class token left out
        np.testing.assert_allclose(att[:, k].reshape(B, cfg.num_heads, -1), p[:, :, 1:], atol=2e-6)


def test_patches_are_cut_in_grid_order():
    cfg = tiny_vit()
    model = pt.VisionTransformer(cfg)
    images = image_batch(cfg, np.random.default_rng(0), 2).images
    want = ref.vit_patches(images, cfg.patch_size).reshape(-1, cfg.patch_dim)
    np.testing.assert_array_equal(model.patches(images), want)


def test_shapes_and_class_attention_of_one_layer():
    cfg = tiny_vit(num_layers=3)
    model = pt.VisionTransformer(cfg, seed=1)
    images = image_batch(cfg, np.random.default_rng(1), 5).images
    assert model.forward(images).shape == (5, cfg.num_classes)
    labels = model.predict(images)
    assert labels.dtype == np.int64 and labels.shape == (5,)
    assert model.predict(images, return_logits=True).shape == (5, cfg.num_classes)
    att = model.class_attention(images)
    np.testing.assert_array_equal(model.class_attention(images, layer=-1), att[:, 2])
    # Each head's weights over the patches leave out only what the class token gives itself.
    total = att.sum(axis=(-1, -2))
    assert (total > 0).all() and (total < 1).all()
    assert model.num_parameters() == sum(p.size for p in model.parameters().values())


def test_predict_ignores_train_mode_and_dropout():
    cfg = tiny_vit(dropout=0.5, attention_dropout=0.3)
    model = pt.VisionTransformer(cfg, seed=2).train()
    images = image_batch(cfg, np.random.default_rng(2)).images
    first = model.predict(images, return_logits=True)
    np.testing.assert_array_equal(first, model.predict(images, return_logits=True))
    np.testing.assert_array_equal(first, model.eval().forward(images))


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
EMBEDDINGS = ("patch_embed.weight", "patch_embed.bias", "cls_token", "pos_embed", "head.weight")


@pytest.mark.parametrize(
    "overrides", [dict(), dict(dropout=0.2, attention_dropout=0.1)], ids=["plain", "dropout"]
)
def test_gradients_match_finite_differences(overrides, threads):
    """Every parameter, the patch embedding, class token, positions and head among them (GELU:
    finite differences need a smooth function)."""
    threads(1)
    cfg = tiny_vit(**overrides)
    model = pt.VisionTransformer(cfg, seed=3)
    batch = image_batch(cfg, np.random.default_rng(3))
    mean_loss(model, batch, 5)
    for name in EMBEDDINGS:  # a gradient that is wrongly zero would pass the difference check
        assert np.abs(model.gradients()[name]).max() > 1e-4, name
    check_gradients(model, batch)


def test_forward_backward_matches_loss_and_grad():
    """backward(dlogits) of the softmax cross-entropy's gradient gives loss_and_grad's."""
    cfg = tiny_vit()
    model = pt.VisionTransformer(cfg, seed=4)
    batch = image_batch(cfg, np.random.default_rng(4), 4)
    model.zero_grad()
    loss_sum, n = model.loss_and_grad(batch)
    want = model.grad_buffer.copy()
    model.zero_grad()
    logits = ref.f64(model.forward(batch.images))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert n == 4
    assert loss_sum == pytest.approx(-np.log(p[np.arange(4), batch.labels]).sum(), rel=1e-5)
    p[np.arange(4), batch.labels] -= 1.0
    model.backward((p / 4).astype(np.float32))
    assert rel_err(model.grad_buffer, want) < 1e-5
    assert model.evaluate_loss(batch) == pytest.approx((loss_sum, 4), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
def test_bad_images_and_labels_are_rejected():
    cfg = tiny_vit()
    model = pt.VisionTransformer(cfg)
    good = image_batch(cfg, np.random.default_rng(5))
    with pytest.raises(TypeError, match="images.*floating"):
        model.predict(good.images.astype(np.int32))
    with pytest.raises(TypeError, match="images"):
        model.predict(good.images.tolist())
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 2, 6, 6\)"):
        model.predict(good.images[:, :1])
    with pytest.raises(ValueError, match="images"):
        model.forward(good.images[0])
    with pytest.raises(ValueError, match="empty"):
        model.predict(good.images[:0])
    bad = good.images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.predict(bad)
    with pytest.raises(IndexError, match="labels"):
        model.loss_and_grad(ImageBatch(good.images, np.array([0, 3, 1])))
    with pytest.raises(IndexError, match="labels"):
        model.evaluate_loss(ImageBatch(good.images, np.array([0, -1, 1])))
    with pytest.raises(TypeError, match="labels"):
        model.loss_and_grad(ImageBatch(good.images, np.array([0.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        model.loss_and_grad(ImageBatch(good.images, np.array([0, 1])))
    with pytest.raises(TypeError, match="'images'.*ImageBatch"):
        model.loss_and_grad(SimpleNamespace(labels=good.labels))
    with pytest.raises(ValueError, match="layer"):
        model.class_attention(good.images, layer=2)
    with pytest.raises(TypeError, match="dropout_seed"):
        model.forward(good.images, dropout_seed=1.5)
    # float64 images are taken (converted), as numpy code often makes them
    np.testing.assert_array_equal(
        model.predict(good.images.astype(np.float64)), model.predict(good.images)
    )


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    cfg = tiny_vit(dropout=0.1)
    model = pt.VisionTransformer(cfg, seed=6)
    images = image_batch(cfg, np.random.default_rng(6)).images
    model.save(tmp_path / "vit")
    back = pt.VisionTransformer.load(tmp_path / "vit")
    assert back.config == cfg
    for name, value in model.parameters().items():
        np.testing.assert_array_equal(back.parameters()[name], value)
    np.testing.assert_array_equal(
        back.predict(images, return_logits=True), model.predict(images, return_logits=True)
    )
    with pytest.raises(CheckpointError):
        pt.Transformer.load(tmp_path / "vit")
    token_model = pt.TransformerEncoderModel(
        pt.TransformerConfig(src_vocab_size=7, tgt_vocab_size=7, d_model=16, num_heads=2,
                             d_ff=24, num_encoder_layers=1, num_decoder_layers=0)  # fmt: skip
    )
    token_model.save(tmp_path / "tokens")
    with pytest.raises(CheckpointError):
        pt.VisionTransformer.load(tmp_path / "tokens")


# ----------------------------------------------------------------------------------------------
# image batches and training
# ----------------------------------------------------------------------------------------------
def labelled_images(n: int = 23, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 6, 6)).astype(np.float32), rng.integers(0, 3, n)


def test_image_batcher_epochs_visit_every_image_once():
    images, labels = labelled_images()
    batcher = ImageBatcher(images, labels, 5, seed=1)
    assert len(batcher) == 5
    orders = []
    for _ in range(2):
        batches = list(batcher)
        assert [b.size for b in batches] == [5, 5, 5, 5, 3]
        order = np.concatenate([b.indices for b in batches])
        np.testing.assert_array_equal(np.sort(order), np.arange(23))
        for b in batches:
            np.testing.assert_array_equal(b.images, images[b.indices])
            np.testing.assert_array_equal(b.labels, labels[b.indices])
            assert b.n_targets == b.size
        orders.append(order)
    assert batcher.epoch == 1 and not np.array_equal(orders[0], orders[1])
    dropped = ImageBatcher(images, labels, 5, drop_last=True, shuffle=False)
    assert [b.size for b in dropped] == [5, 5, 5, 5]
    np.testing.assert_array_equal(dropped.batch(np.array([4, 2])).labels, labels[[4, 2]])


def test_image_batcher_resumes_with_the_same_batches():
    images, labels = labelled_images()
    straight = ImageBatcher(images, labels, 4, seed=7)
    for _ in range(9):  # into the second epoch (6 batches each)
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))  # it survives a JSON checkpoint
    resumed = ImageBatcher(images, labels, 4, seed=0)  # another seed: the state decides
    resumed.load_state_dict(state)
    for _ in range(8):
        a, b = straight.next_batch(), resumed.next_batch()
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.images, b.images)
    assert resumed.epoch == straight.epoch == 2
    with pytest.raises(ValueError, match="different"):
        ImageBatcher(images, labels, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="different"):
        ImageBatcher(images[:20], labels[:20], 4).load_state_dict(state)
    with pytest.raises(ValueError, match="ImageBatcher state"):
        resumed.load_state_dict({"epoch": 0})


def test_image_batcher_rejects_bad_input():
    images, labels = labelled_images()
    with pytest.raises(TypeError, match="images"):
        ImageBatcher(images.astype(np.uint8), labels, 4)
    with pytest.raises(ValueError, match="images"):
        ImageBatcher(images[:, 0], labels, 4)
    with pytest.raises(TypeError, match="labels"):
        ImageBatcher(images, labels.astype(np.float32), 4)
    with pytest.raises(ValueError, match="labels"):
        ImageBatcher(images, labels[:-1], 4)
    with pytest.raises(IndexError, match="labels"):
        ImageBatcher(images, labels - 1, 4)
    with pytest.raises(ValueError, match="batch_size"):
        ImageBatcher(images, labels, 24)
    with pytest.raises(TypeError, match="shuffle"):
        ImageBatcher(images, labels, 4, shuffle=1)
    with pytest.raises(IndexError, match="indices"):
        ImageBatcher(images, labels, 4).batch(np.array([23]))


def _trainer(images, labels, checkpoint_dir=None):
    model = pt.VisionTransformer(tiny_vit(dropout=0.1), seed=8)
    optimizer = AdamW(model.parameters(), lr=1e-2)
    return Trainer(
        model, optimizer, ImageBatcher(images, labels, 4, seed=8),
        valid_data=[ImageBatch(images[:6], labels[:6])], checkpoint_dir=checkpoint_dir,
        checkpoint_every=3 if checkpoint_dir else 0, progress=False,
    )


def test_trainer_resumes_image_training_bit_identically(tmp_path):
    images, labels = labelled_images()
    straight = _trainer(images, labels)
    straight.fit(8)
    first = _trainer(images, labels, tmp_path)
    first.fit(3)  # checkpoint at step 3, mid-epoch
    resumed = _trainer(images, labels, tmp_path)
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == 3
    result = resumed.fit(8)
    np.testing.assert_array_equal(resumed.model.param_buffer, straight.model.param_buffer)
    assert result["tokens_seen"] == 23 + 2 * 4  # one epoch, then two batches: a target per image
    assert result["valid_tokens"] == 6
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records and all(r["step"] <= 8 for r in records)


def synthetic_split(n: int = 400, seed: int = 0) -> DigitSplit:
    """Four classes of noisy 8 x 8 images: a bright bar in the top, bottom, left or right half."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 2 * n)
    images = rng.normal(0.0, 0.5, (2 * n, 1, 8, 8)).astype(np.float32)
    bars = [(slice(1, 3), slice(1, 7)), (slice(5, 7), slice(1, 7)),
            (slice(1, 7), slice(1, 3)), (slice(1, 7), slice(5, 7))]  # fmt: skip
    for k, (rows, cols) in enumerate(bars):
        images[labels == k, 0, rows, cols] += 2.0
    return DigitSplit(images[:n], labels[:n], images[n:], labels[n:])


def test_learns_digits_well_above_chance(threads):
    """On scikit-learn's digits (chance: 10 %) when it is installed, else on synthetic bars
    (chance: 25 %); the quick demo settings, 200 updates (about 88 % on the digits)."""
    threads(2)
    try:
        split, floor = load_digit_split(), 0.75
    except ImportError:
        split, floor = synthetic_split(), 0.9
    settings = vision_settings(quick=True, steps=200)
    model = train_vision_model(split, settings, progress=False)
    accuracy = (model.predict(split.test_images) == split.test_labels).mean()
    assert accuracy >= floor


# ----------------------------------------------------------------------------------------------
# the demo on the command line
# ----------------------------------------------------------------------------------------------
def test_cli_vision_demo_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert main(["demo", "--vision", "--quick", "--out", str(tmp_path), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "360 held-out digits" in out
    assert (tmp_path / "vision_attention.png").read_bytes()[:4] == b"\x89PNG"
    scores = json.loads((tmp_path / "vision_scores.json").read_text())
    assert scores["accuracy"] >= 80.0
    again = pt.VisionTransformer.load(tmp_path / "vision_model")
    assert again.config.image_size == 8


def test_cli_vision_demo_without_scikit_learn(tmp_path, capsys, monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    assert main(["demo", "--vision", "--quick", "--out", str(tmp_path)]) == 2
    assert "pytransformer[vision]" in capsys.readouterr().err

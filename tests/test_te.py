"""Temporal Ensembling: canonical-frame warps, bank bias correction and accumulation, per-cell coverage, identical
banks across workers, and the cross-method weight-0 check."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from raysemi.data.batch import Batch
from raysemi.data.transforms import train_views
from raysemi.errors import ConfigError
from raysemi.methods import Progress, build_method
from raysemi.methods.base import DataInfo
from raysemi.methods.components import canonical_to_crop, crop_to_canonical
from raysemi.models import build_model
from tests.conftest import PROBE_CLASSES, make_probe_batches, probe_info

IDENTITY = [0.0, 0.0, 1.0, 1.0, 0.0]
INFO = DataInfo(num_classes=3, num_unlabeled=4, num_labeled=2)


class ChannelLogits(nn.Module):
    """Logits = scale * input channels (3 classes): predictions are known by hand, one trainable scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def _te(info: DataInfo = INFO, **hparams):
    hparams = {"bank_height": 4, "bank_width": 4, "bank_dtype": "float32", **hparams}
    return build_method("te", lambda in_channels=3: ChannelLogits(), info, hparams)


def _batch(
    images: torch.Tensor, ids: list[int], geometry: list[list[float]] | None = None, labelled=False
) -> Batch:
    n, _, h, w = images.shape
    masks = torch.zeros(n, h, w, dtype=torch.long) if labelled else torch.full((n, h, w), 255)
    geometry = torch.tensor(geometry if geometry is not None else [IDENTITY] * n)
    return Batch(
        images, masks, torch.tensor(ids), geometry=geometry, valid=torch.ones(n, h, w, dtype=torch.bool)
    )


def _float(t: torch.Tensor) -> float:
    return float(t.detach())


# ---------------------------------------------------------------------------------------------- warps


def test_identity_warps_are_exact() -> None:
    maps = torch.rand(2, 3, 4, 5)
    identity = torch.tensor([IDENTITY, IDENTITY])
    assert torch.allclose(canonical_to_crop(maps, identity, (4, 5)), maps, atol=1e-6)
    means, covered = crop_to_canonical(maps, identity, (4, 5))
    assert torch.equal(means, maps)
    assert torch.equal(covered, torch.ones(2, 4, 5))


def test_crop_to_canonical_averages_pixels_within_cells() -> None:
    maps = torch.rand(1, 2, 8, 8)
    means, covered = crop_to_canonical(maps, torch.tensor([IDENTITY]), (4, 4))
    assert torch.allclose(means, F.avg_pool2d(maps, 2), atol=1e-6)
    assert torch.equal(covered, torch.ones(1, 4, 4))


def test_flipped_sub_crop_maps_onto_its_mirrored_cells_and_back() -> None:
    # crop 8x8 of rows 0.25-0.75, columns 0.5-1.0 of the image, mirrored: crop (i, j) sits on cell (4 + i, 15 - j)
    geometry = torch.tensor([[0.25, 0.5, 0.5, 0.5, 1.0]])
    crop = torch.rand(1, 2, 8, 8)
    means, covered = crop_to_canonical(crop, geometry, (16, 16))
    expected = torch.zeros(1, 2, 16, 16)
    expected[:, :, 4:12, 8:16] = crop.flip(-1)
    assert torch.equal(means, expected)
    expected_covered = torch.zeros(1, 16, 16)
    expected_covered[:, 4:12, 8:16] = 1.0
    assert torch.equal(covered, expected_covered)
    bank = torch.rand(1, 2, 16, 16)
    assert torch.allclose(
        canonical_to_crop(bank, geometry, (8, 8)), bank[:, :, 4:12, 8:16].flip(-1), atol=1e-6
    )
    assert torch.allclose(canonical_to_crop(means, geometry, (8, 8)), crop, atol=1e-6)


def test_padded_and_out_of_image_pixels_update_no_cell() -> None:
    # the crop spans rows -0.5..1.5 of the image: its top and bottom quarters are padding
    geometry = torch.tensor([[-0.5, 0.0, 2.0, 1.0, 0.0]])
    crop = torch.rand(1, 1, 8, 4)
    valid = torch.zeros(1, 8, 4, dtype=torch.bool)
    valid[:, 2:6] = True
    means, covered = crop_to_canonical(crop, geometry, (4, 4), valid)
    assert torch.equal(means, crop[:, :, 2:6])
    assert torch.equal(covered, torch.ones(1, 4, 4))
    valid[:, 2] = False
    _, covered = crop_to_canonical(crop, geometry, (4, 4), valid)
    assert torch.equal(covered[0, :, 0], torch.tensor([0.0, 1.0, 1.0, 1.0]))


# ---------------------------------------------------------------------------------------------- bank


def test_first_accumulation_target_is_that_prediction_and_has_no_consistency() -> None:
    method = _te()
    images = torch.randn(2, 3, 4, 4)
    labelled = _batch(torch.randn(1, 3, 4, 4), [1], labelled=True)
    out = method(labelled, _batch(images, [3, 0]), Progress(5, 10))
    assert _float(out.terms["unsup"]) == 0.0
    rows = torch.tensor([3, 0])
    target, has_target = method.ensemble_target(rows, torch.tensor([IDENTITY, IDENTITY]), (4, 4))
    assert torch.allclose(target, images.softmax(dim=1), atol=1e-6)
    assert torch.equal(has_target, torch.ones(2, 4, 4))
    assert torch.equal(method.bank_count[[0, 3, 5]], torch.ones(3, 4, 4, dtype=torch.int32))
    assert method.bank_count[[1, 2, 4]].sum() == 0


def test_second_visit_target_is_the_bias_corrected_average() -> None:
    # alpha 0.6: Z = 0.6 * 0.4 z1 + 0.4 z2 = 0.24 z1 + 0.4 z2, divided by 1 - 0.6^2 = 0.64
    method = _te(alpha=0.6, cons_weight=2.0)
    labelled = _batch(torch.zeros(1, 3, 4, 4), [0], labelled=True)
    first, second, third = torch.randn(3, 1, 3, 4, 4)
    method(labelled, _batch(first, [2]), Progress(5, 10))
    out = method(labelled, _batch(second, [2]), Progress(5, 10))
    z1, z2, z3 = (x.softmax(dim=1) for x in (first, second, third))
    expected_loss = 2.0 * ((z2 - z1) ** 2).sum() / (2 * 3 * 4 * 4)  # labelled rows: same prediction, error 0
    assert _float(out.terms["unsup"]) == pytest.approx(float(expected_loss), rel=1e-5)
    target, _ = method.ensemble_target(torch.tensor([2]), torch.tensor([IDENTITY]), (4, 4))
    assert torch.allclose(target, 0.375 * z1 + 0.625 * z2, atol=1e-6)
    method(labelled, _batch(third, [2]), Progress(5, 10))
    target, _ = method.ensemble_target(torch.tensor([2]), torch.tensor([IDENTITY]), (4, 4))
    weights = torch.tensor([0.6**2 * 0.4, 0.6 * 0.4, 0.4]) / (1 - 0.6**3)
    assert torch.allclose(target, weights[0] * z1 + weights[1] * z2 + weights[2] * z3, atol=1e-6)
    assert torch.equal(method.bank_count[2], torch.full((4, 4), 3, dtype=torch.int32))


def test_cells_outside_the_crop_keep_their_state_and_count() -> None:
    method = _te()
    left_half = [[0.0, 0.0, 1.0, 0.5, 0.0]]
    labelled = _batch(torch.zeros(1, 3, 4, 2), [0], left_half, labelled=True)
    method(labelled, _batch(torch.randn(1, 3, 4, 2), [1], left_half), Progress(5, 10))
    assert torch.equal(method.bank_count[1, :, :2], torch.ones(4, 2, dtype=torch.int32))
    assert method.bank_count[1, :, 2:].sum() == 0
    assert method.bank[1, :, :, 2:].abs().sum() == 0
    # the next full-image visit only has a target on the left half
    labelled = _batch(torch.zeros(1, 3, 4, 4), [0], labelled=True)
    out = method(labelled, _batch(torch.randn(1, 3, 4, 4), [1]), Progress(5, 10))
    assert out.logs["target_coverage"] == pytest.approx(0.5)


def test_fp16_bank_stays_a_distribution_under_random_crops() -> None:
    torch.manual_seed(0)
    method = _te(bank_dtype="float16", bank_height=6, bank_width=5)
    labelled = _batch(torch.zeros(1, 3, 8, 8), [0], labelled=True)
    for _ in range(6):
        top, left = torch.rand(2).tolist()
        geometry = [[top - 0.3, left - 0.3, 0.8, 0.9, float(torch.rand(()) > 0.5)]]
        method(labelled, _batch(3 * torch.randn(1, 3, 8, 8), [2], geometry), Progress(5, 10))
    assert method.bank.dtype == torch.float16
    count = method.bank_count[2].float()
    z_hat = method.bank[2].float() / (1 - 0.6**count)
    seen = count > 0
    assert seen.any() and not seen.all()
    assert torch.allclose(z_hat.sum(dim=0)[seen], torch.ones(int(seen.sum())), atol=3e-3)
    assert torch.equal(method.bank[2].sum(dim=0)[~seen], torch.zeros(int((~seen).sum()), dtype=torch.float16))


def test_fp16_first_accumulation_matches_within_storage_precision() -> None:
    method = _te(bank_dtype="float16")
    images = torch.randn(1, 3, 4, 4)
    method(_batch(torch.zeros(1, 3, 4, 4), [0], labelled=True), _batch(images, [1]), Progress(5, 10))
    target, _ = method.ensemble_target(torch.tensor([1]), torch.tensor([IDENTITY]), (4, 4))
    assert torch.allclose(target, images.softmax(dim=1), atol=1e-3)


def test_labelled_images_stay_out_of_the_bank_without_cons_on_labeled() -> None:
    method = _te(cons_on_labeled=False)
    assert len(method.bank) == INFO.num_unlabeled
    method(
        _batch(torch.randn(1, 3, 4, 4), [1], labelled=True),
        _batch(torch.randn(1, 3, 4, 4), [2]),
        Progress(5, 10),
    )
    assert method.bank_count.sum(dim=(1, 2)).tolist() == [0, 0, 16, 0]


@pytest.mark.parametrize(("labelled_id", "unlabelled_id"), [(0, 4), (2, 0), (-1, 0)])
def test_ids_outside_their_set_fail_with_a_clear_message(labelled_id: int, unlabelled_id: int) -> None:
    method = _te()
    labelled = _batch(torch.zeros(1, 3, 4, 4), [labelled_id], labelled=True)
    with pytest.raises(ValueError, match="outside the bank"):
        method(labelled, _batch(torch.zeros(1, 3, 4, 4), [unlabelled_id]), Progress(5, 10))
    assert method.bank_count.sum() == 0


@pytest.mark.parametrize(("crop", "cells"), [((90, 120), (12, 15)), ((513, 513), (65, 65)), ((64, 64), (8, 8))])
def test_default_bank_is_the_crop_at_output_stride_8(crop: tuple[int, int], cells: tuple[int, int]) -> None:
    info = DataInfo(num_classes=3, num_unlabeled=2, num_labeled=1, crop_size=crop)
    method = build_method("te", lambda in_channels=3: ChannelLogits(), info, {})
    assert method.bank.shape == (3, 3, *cells) and method.bank_count.shape == (3, *cells)
    explicit = build_method("te", lambda in_channels=3: ChannelLogits(), info, {"bank_height": 7, "bank_width": 9})
    assert explicit.bank.shape == (3, 3, 7, 9)


def test_a_thin_line_keeps_its_class_at_stride_8_where_the_old_16x16_bank_erased_it() -> None:
    # a one-hot 2-pixel-wide vertical line of class 1 at columns 11-12 of a 256x256 crop (= the whole image).
    # Stride 8: cell 1 spans columns 8-15, mean 2/8; pixel centres 11.5 and 12.5 sit 0.5 from its centre 12, so
    # bilinear sampling gives 0.25 * (1 - 0.5/8) = 0.234375. 16x16 cells (stride 16): cell 0 spans columns 0-15,
    # mean 2/16; centres 8 and 24: 0.125 * (1 - 3.5/16) = 0.09765625 and 0.125 * (1 - 4.5/16) = 0.08984375.
    info = DataInfo(num_classes=3, num_unlabeled=1, num_labeled=1, crop_size=(256, 256))
    line = torch.zeros(1, 256, 256, dtype=torch.long)
    line[:, :, 11:13] = 1
    images = 40.0 * F.one_hot(line, 3).permute(0, 3, 1, 2).float()
    targets = {}
    for name, cells in (("stride_8", {}), ("old_16x16", {"bank_height": 16, "bank_width": 16})):
        method = build_method("te", lambda in_channels=3: ChannelLogits(), info, {"bank_dtype": "float32", **cells})
        method(_batch(torch.zeros(1, 3, 256, 256), [0], labelled=True), _batch(images, [0]), Progress(5, 10))
        target, _ = method.ensemble_target(torch.tensor([0]), torch.tensor([IDENTITY]), (256, 256))
        targets[name] = target[0, 1, 0, 11:13]
    assert torch.allclose(targets["stride_8"], torch.tensor([0.234375, 0.234375]), atol=1e-6)
    assert torch.allclose(targets["old_16x16"], torch.tensor([0.09765625, 0.08984375]), atol=1e-6)


def test_rampup_is_a_fraction_of_the_run_whatever_its_length() -> None:
    # 15% of the run with rampup_length 0.3: sigmoid ramp exp(-5 (1 - 0.5)^2), at 200 or 20,000 iterations
    images = torch.randn(1, 3, 4, 4)
    ramps = [
        _te(rampup_length=0.3)(_batch(images, [0], labelled=True), _batch(images, [1]), Progress(15 * n, 100 * n))
        .logs["ramp"]
        for n in (2, 200)
    ]
    assert ramps == pytest.approx([math.exp(-1.25)] * 2)


def test_bad_choices_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="method.bank_dtype"):
        _te(bank_dtype="bfloat8")
    with pytest.raises(ConfigError, match="method.alpha"):
        _te(alpha=1.0)
    with pytest.raises(ConfigError, match="method.bank_stride"):
        _te(bank_stride=0)
    with pytest.raises(ConfigError, match="method.bank_height/bank_width"):
        _te(bank_height=8, bank_width=0)


@pytest.mark.parametrize("coverage", [1.5, 0.0])
def test_min_cell_coverage_outside_its_range_is_a_one_line_config_error(coverage: float) -> None:
    # Never checked before: 1.5 asks for more than a cell's whole area (the bank stays empty), 0 updates the cells
    # the crop does not cover with a zero mean.
    with pytest.raises(ConfigError, match=r"^method\.min_cell_coverage: expected a value in \(0, 1\]") as err:
        _te(min_cell_coverage=coverage)
    assert "\n" not in str(err.value)


def _tiny(in_channels: int = 3) -> nn.Module:
    return build_model("tiny", PROBE_CLASSES, in_channels=in_channels, width=8)


def test_weight_zero_leaves_the_supervised_loss() -> None:
    labelled, unlabelled = make_probe_batches(seed=4)
    torch.manual_seed(0)
    method = build_method("te", _tiny, probe_info(), {"cons_weight": 0.0}).eval()
    method(labelled, unlabelled, Progress(5, 10))
    out = method(labelled, unlabelled, Progress(5, 10))
    torch.manual_seed(0)
    baseline = build_method("supervised", _tiny, probe_info(), {}).eval()
    reference = baseline(labelled, unlabelled, Progress(5, 10)).losses["main"]
    assert _float(out.terms["unsup"]) == 0.0
    assert out.logs["cons_raw"] > 0.0
    assert torch.allclose(out.losses["main"], reference, atol=1e-6)


def test_the_consistency_trains_the_network_and_never_the_bank() -> None:
    method = _te()
    labelled = _batch(torch.zeros(1, 3, 4, 4), [0], labelled=True)
    method(labelled, _batch(torch.randn(1, 3, 4, 4), [1]), Progress(5, 10))
    out = method(labelled, _batch(torch.randn(1, 3, 4, 4), [1]), Progress(5, 10))
    out.terms["unsup"].backward()
    assert method.net.scale.grad is not None and method.net.scale.grad != 0
    assert not method.bank.requires_grad and method.bank.grad is None
    assert {"bank", "bank_count"} <= set(method.state_dict())
    assert math.isfinite(out.logs["bank_filled"])


# ---------------------------------------------------------------------------------------------- workers


def _rank_batches(rank: int) -> tuple[Batch, Batch]:
    g = torch.Generator().manual_seed(rank)
    geometry = [[0.1 * rank, 0.2, 0.7, 0.8, float(rank)], [-0.2, 0.3 * rank, 1.1, 0.6, 1.0 - rank]]
    labelled = _batch(
        torch.randn(1, 3, 6, 6, generator=g), [rank], [[0.0, 0.1, 0.9, 0.9, 0.0]], labelled=True
    )
    return labelled, _batch(torch.randn(2, 3, 6, 6, generator=g), [2 * rank, (2 * rank + 3) % 4], geometry)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    method = _te(bank_dtype="float16")
    for _ in range(2):
        method(*_rank_batches(rank), Progress(5, 10))
    torch.save({"bank": method.bank, "count": method.bank_count}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_workers_apply_every_update_and_end_with_identical_banks(tmp_path: Path) -> None:
    # fork: spawned workers would re-import torch, which takes far longer than the test itself
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    banks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(banks[0]["bank"], banks[1]["bank"])
    assert torch.equal(banks[0]["count"], banks[1]["count"])
    # one process seeing both workers' batches side by side, rank 0 first, builds the same bank
    reference = _te(bank_dtype="float16")
    (l0, u0), (l1, u1) = _rank_batches(0), _rank_batches(1)
    both = [
        Batch(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in ("images", "masks", "ids")))
        for a, b in ((l0, l1), (u0, u1))
    ]
    for merged, parts in zip(both, ((l0, l1), (u0, u1)), strict=True):
        merged.geometry = torch.cat([p.geometry for p in parts])
        merged.valid = torch.cat([p.valid for p in parts])
    for _ in range(2):
        reference(*both, Progress(5, 10))
    assert torch.equal(reference.bank_count, banks[0]["count"])
    assert torch.equal(reference.bank, banks[0]["bank"])


def test_ensemble_pseudo_label_accuracy_is_logged_against_eval_masks() -> None:
    method = _te()
    labelled = _batch(torch.zeros(1, 3, 4, 4), [0], labelled=True)
    unlabelled = _batch(torch.randn(1, 3, 4, 4), [1])
    unlabelled.eval_masks = unlabelled.images.argmax(dim=1)
    assert "pseudo_label_accuracy" not in method(labelled, unlabelled, Progress(5, 10)).logs
    assert method(labelled, unlabelled, Progress(5, 10)).logs["pseudo_label_accuracy"] == 1.0
    unlabelled.eval_masks = (unlabelled.eval_masks + 1) % 3
    assert method(labelled, unlabelled, Progress(5, 10)).logs["pseudo_label_accuracy"] == 0.0


def test_warps_follow_the_geometry_that_the_training_transforms_report() -> None:
    # labels made of 8x8 blocks = one class per cell of a 4x6 grid over a 32x48 image; random real training views
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 4, (4, 6), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
    cell_classes = mask[::8, ::8]
    canonical = F.one_hot(cell_classes, 4).permute(2, 0, 1).float()[None]
    for seed in range(4):
        view = train_views(
            torch.zeros(3, 32, 48, dtype=torch.uint8), mask, (24, 24), torch.Generator().manual_seed(seed)
        )
        geometry, valid, labels = (
            view["geometry"][None],
            view["valid"][None],
            view["masks"][None].clamp_max(3),
        )
        means, covered = crop_to_canonical(
            F.one_hot(labels, 4).permute(0, 3, 1, 2).float(), geometry, (4, 6), valid
        )
        updated = covered[0] >= 0.5
        assert updated.any()
        assert torch.equal(means.argmax(dim=1)[0][updated], cell_classes[updated])
        # bilinear interpolation between cell centres blurs block edges: most pixels still match
        warped = canonical_to_crop(canonical, geometry, (24, 24)).argmax(dim=1)
        assert (warped[valid] == labels[valid]).float().mean() > 0.85

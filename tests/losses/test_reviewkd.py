"""ReviewKD against the paper's ABF + HCL written out here in float64 (convolutions as sums over channels and
shifts, batch norm from batch moments, pooling by reshape), and two training steps on CIFAR ResNets."""

import math

import pytest
import torch
from hydra.utils import instantiate

from kd.errors import KdError
from kd.losses import Features, ReviewKD
from kd.losses.reviewkd import hierarchical_context_loss
from tests.losses.test_catalogue_losses import cifar_cfg, fit_steps
from tests.tiny_models import tiny_student, tiny_teacher


def mse_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    values = (a - b).flatten().tolist()
    return sum(v * v for v in values) / len(values)


def pool_by_hand(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average over size x size equal blocks (H divisible by size)."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def hcl_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    """Paper (Sec. 3.3): full map at weight 1, then 4x4, 2x2, 1x1 pools (those smaller than H) at 1/2, 1/4, 1/8."""
    used = [(1.0, s, t)]
    weight = 1.0
    for size in (4, 2, 1):
        if size < s.shape[-2]:
            weight /= 2
            used.append((weight, pool_by_hand(s, size), pool_by_hand(t, size)))
    return sum(w * mse_by_hand(a, b) for w, a, b in used) / sum(w for w, _, _ in used)


@pytest.mark.parametrize("height", [8, 4, 2, 1])
def test_hcl_matches_the_pyramid_by_hand(height):
    generator = torch.Generator().manual_seed(height)
    s = torch.rand(3, 2, height, height, generator=generator, dtype=torch.float64)
    t = torch.rand(3, 2, height, height, generator=generator, dtype=torch.float64) * 2
    assert hierarchical_context_loss(s, t).item() == pytest.approx(hcl_by_hand(s, t), rel=1e-12)
    # the normalization: equal error at every level gives that error (here a constant offset of 0.5)
    assert hierarchical_context_loss(s, s + 0.5).item() == pytest.approx(0.25, rel=1e-12)


def conv_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-padded 'same' convolution with an odd square kernel: a sum over kernel offsets of channel mixes."""
    k = weight.shape[-1]
    pad = k // 2
    n, _, h, w = x.shape
    padded = torch.zeros(n, x.shape[1], h + 2 * pad, w + 2 * pad, dtype=x.dtype)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    out = torch.zeros(n, weight.shape[0], h, w, dtype=x.dtype)
    for dy in range(k):
        for dx in range(k):
            out += torch.einsum("oc,nchw->nohw", weight[:, :, dy, dx], padded[:, :, dy : dy + h, dx : dx + w])
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def batch_norm_by_hand(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode batch norm: batch moments per channel (biased variance), then the affine map."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    gamma, beta = bn.weight.double().view(1, -1, 1, 1), bn.bias.double().view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * gamma + beta


def abf_by_hand(module, x: torch.Tensor, deeper: torch.Tensor | None):
    x = batch_norm_by_hand(conv_by_hand(x, module.reduce[0].weight.double()), module.reduce[1])
    if deeper is not None:
        fy, fx = x.shape[-2] // deeper.shape[-2], x.shape[-1] // deeper.shape[-1]  # nearest upsampling
        deeper = deeper.repeat_interleave(fy, dim=2).repeat_interleave(fx, dim=3)
        logits = conv_by_hand(torch.cat([x, deeper], 1), module.attention[0].weight.double(),
                              module.attention[0].bias.double())  # fmt: skip
        z = 1 / (1 + torch.exp(-logits))
        x = x * z[:, 0:1] + deeper * z[:, 1:2]
    out = batch_norm_by_hand(conv_by_hand(x, module.output[0].weight.double()), module.output[1])
    return out, x


def test_reviewkd_matches_abf_and_hcl_by_hand_over_three_levels():
    """Two stage pairs (the second student map 8x8 against a 4x4 teacher map: pooled 2x2 to it) and the pooled 1x1
    level; review from deep to shallow, each level's fused map handed to the next shallower one."""
    torch.manual_seed(0)
    loss = ReviewKD(review_weight=2.0, warmup_epochs=0, student_stages=[0, 1], teacher_stages=[1, 3], ce_weight=0.5)
    loss.bind(tiny_student(), tiny_teacher())
    with torch.no_grad():  # non-trivial affine parameters of the batch norms
        for bn in [m for m in loss.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    generator = torch.Generator().manual_seed(3)
    s0, s1 = (torch.rand(6, 4, 8, 8, generator=generator) for _ in range(2))
    t1, t3 = torch.rand(6, 8, 8, 8, generator=generator), torch.rand(6, 8, 4, 4, generator=generator) - 0.5
    logits = torch.randn(6, 3, generator=generator)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    value = loss(logits, torch.zeros(6, 3), labels, Features({0: s0, 1: s1}, {1: t1, 3: t3}))

    student = [s0.double(), s1.double(), s1.double().mean(dim=(2, 3), keepdim=True)]
    teacher = [t1.double(), t3.double(), t3.double().mean(dim=(2, 3), keepdim=True)]
    total, deeper = 0.0, None
    for level in (2, 1, 0):
        out, deeper = abf_by_hand(loss.fusions[level], student[level], deeper)
        if out.shape[-1] != teacher[level].shape[-1]:
            out = pool_by_hand(out, teacher[level].shape[-1])
        total += hcl_by_hand(out, teacher[level])
    ce = sum(
        -row[g] + math.log(sum(math.exp(v) for v in row))
        for row, g in zip(logits.tolist(), labels.tolist(), strict=True)
    )
    assert loss.last_terms["reviewkd"].item() == pytest.approx(2.0 * total, rel=1e-5)
    assert loss.last_terms["ce"].item() == pytest.approx(0.5 * ce / 6, rel=1e-5)
    assert value.item() == pytest.approx(2.0 * total + 0.5 * ce / 6, rel=1e-5)


def test_reviewkd_warms_up_linearly_and_its_fusions_learn():
    torch.manual_seed(0)
    loss = ReviewKD(warmup_epochs=4, ce_weight=0.0)
    loss.bind(tiny_student(), tiny_teacher())
    assert [len(loss.fusions), loss.feature_stages().student, loss.feature_stages().teacher] == [2, (1,), (3,)]
    generator = torch.Generator().manual_seed(1)
    features = Features(
        {1: torch.rand(5, 4, 8, 8, generator=generator)}, {3: torch.rand(5, 8, 4, 4, generator=generator)}
    )
    values = []
    for epoch in (0, 1, 3, 9):
        loss.start_epoch(epoch)
        values.append(loss(torch.zeros(5, 3), torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), features))
    assert [v.item() / values[-1].item() for v in values] == pytest.approx([0.25, 0.5, 1.0, 1.0], rel=1e-6)
    values[-1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_epochs": -1}, r"loss.warmup_epochs=-1 must be a whole number >= 0"),
        ({"max_mid_channels": 0}, r"loss.max_mid_channels=0 must be a whole number >= 1"),
        ({"pooled": "no"}, r"loss.pooled='no' must be true or false"),
        ({"review_weight": -1.0}, r"loss.review_weight=-1.0 must not be negative"),
    ],
)
def test_bad_reviewkd_settings_are_refused_with_one_sentence(kwargs, message):
    with pytest.raises(KdError, match=message):
        ReviewKD(**kwargs)


def test_reviewkd_passes_the_preflight_check_before_bind(make_cfg):
    from kd.tasks.checks import check_loss_gives_gradient

    cfg = make_cfg("loss=reviewkd")
    loss = instantiate(cfg.loss)
    assert loss.feature_stages()
    check_loss_gives_gradient(loss, cfg.loss, 10)


def test_two_reviewkd_training_steps_on_cifar_resnets(make_cfg, tmp_path):
    """resnet8 (16/32/64 channels) against resnet8x4 (64/128/256): fusions sized from feature_info, optimized with
    the student and checkpointed."""
    module, trainer = fit_steps(cifar_cfg(make_cfg, "loss=reviewkd", "loss.warmup_epochs=0"), tmp_path)
    assert trainer.global_step == 2
    assert set(module.loss.last_terms) == {"reviewkd", "ce"}
    assert all(torch.isfinite(v) and v > 0 for v in module.loss.last_terms.values())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.loss.parameters()} <= optimized
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(state["loss.fusions.0.output.0.weight"], module.loss.fusions[0].output[0].weight)
    assert module.loss.fusions[-1].output[0].weight.shape[0] == 256  # the teacher's last width

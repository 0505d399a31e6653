"""Every loss against values worked out by hand (plain math, explicit loops over classes), its gradient
reaching only the student, and its behaviour on extreme logits and on fp16/bf16 inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from kd.errors import KdError
from kd.launch.configs import CONF_DIR
from kd.losses import (
    DIST,
    DecoupledKD,
    Features,
    FitNet,
    HintonKD,
    LabelCrossEntropy,
    SoftTargetCrossEntropy,
    SymmetricKL,
    WeightedSum,
)
from tests.tiny_models import tiny_student, tiny_teacher

# loss=deit takes a distilled student's two heads, not one tensor: its own file checks the same (test_deit.py);
# loss=feature_kd compares features through a projector, not logits (test_feature_kd.py).
LOSS_OPTIONS = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml") if p.stem not in ("deit", "feature_kd"))


def softmax_row(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(p[c] * math.log(p[c] / q[c]) for c in range(len(p)))


def cross_entropy(row, label):
    return -math.log(softmax_row(row)[label])


def pearson(x, y):
    n = len(x)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    cov = sum((x[i] - mean_x) * (y[i] - mean_y) for i in range(n))
    var_x = sum((x[i] - mean_x) ** 2 for i in range(n))
    var_y = sum((y[i] - mean_y) ** 2 for i in range(n))
    return cov / math.sqrt(var_x * var_y)


STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.3, -0.2, 2.5, 0.0], [-1.5, 0.4, 0.1, 1.2]]
TEACHER = [[0.2, -1.0, 3.0, 0.5], [1.1, 0.7, 1.9, -0.8], [-0.3, -0.9, 0.6, 2.2]]
LABELS = [1, 2, 3]


def tensors():
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)


def test_soft_ce_is_kl_plus_teacher_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    loss = SoftTargetCrossEntropy()(student, teacher, torch.zeros(16, dtype=torch.long))
    p_teacher = F.softmax(teacher, dim=1)
    kl_value = (p_teacher * (F.log_softmax(teacher, dim=1) - F.log_softmax(student, dim=1))).sum(1).mean()
    entropy = -(p_teacher * F.log_softmax(teacher, dim=1)).sum(1).mean()
    torch.testing.assert_close(loss, kl_value + entropy, rtol=1e-6, atol=1e-6)


def test_soft_ce_matches_hand_computation():
    student, teacher = [[1.0, 2.0, 0.5]], [[0.2, -1.0, 3.0]]
    q, p = softmax_row(student[0]), softmax_row(teacher[0])
    expected = -sum(p[c] * math.log(q[c]) for c in range(3))
    loss = SoftTargetCrossEntropy()(torch.tensor(student), torch.tensor(teacher), torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kd_matches_hand_computation_with_label_term():
    student, teacher, label, t, alpha = [[1.0, 2.0, 0.5]], [[0.2, -1.0, 3.0]], 1, 4.0, 0.25
    q, p = softmax_row(student[0], t), softmax_row(teacher[0], t)
    expected = alpha * cross_entropy(student[0], label) + (1 - alpha) * t * t * kl(p, q)
    loss_fn = HintonKD(temperature=t, alpha=alpha)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), torch.tensor([label]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert set(loss_fn.last_terms) == {"kd", "ce"}


def test_ce_with_label_smoothing_and_mixed_labels_matches_hand_computation():
    student, _, _ = tensors()
    mixed = [[0.0, 0.7, 0.3, 0.0], [0.6, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0]]  # mixup labels
    eps = 0.1
    expected = 0.0
    for row, q in zip(STUDENT, mixed, strict=True):
        p = softmax_row(row)
        smoothed = [(1 - eps) * q[c] + eps / 4 for c in range(4)]
        expected -= sum(smoothed[c] * math.log(p[c]) for c in range(4)) / 3
    loss = LabelCrossEntropy(label_smoothing=eps)(student, None, torch.tensor(mixed))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    hard = LabelCrossEntropy(label_smoothing=eps)(student, None, torch.tensor(LABELS))
    expected_hard = 0.0
    for row, label in zip(STUDENT, LABELS, strict=True):
        p = softmax_row(row)
        smoothed = [(1 - eps) * (c == label) + eps / 4 for c in range(4)]
        expected_hard -= sum(smoothed[c] * math.log(p[c]) for c in range(4)) / 3
    assert hard.item() == pytest.approx(expected_hard, rel=1e-6)


def test_dml_matches_hand_computation():
    student, teacher, labels = tensors()
    expected = 0.0
    for s_row, t_row in zip(STUDENT, TEACHER, strict=True):
        p_s, p_t = softmax_row(s_row), softmax_row(t_row)
        expected += (kl(p_s, p_t) + kl(p_t, p_s)) / 2 / 3
    loss_fn = SymmetricKL()
    assert loss_fn(student, teacher, labels).item() == pytest.approx(expected, rel=1e-6)
    assert set(loss_fn.last_terms) == {"dml"}


def test_js_is_the_dml_loss(make_cfg):
    assert isinstance(instantiate(make_cfg("loss=js").loss), SymmetricKL)


def dkd_by_hand(t, alpha, beta, ce_weight, warmup_weight):
    tckd = nckd = ce = 0.0
    for s_row, t_row, g in zip(STUDENT, TEACHER, LABELS, strict=True):
        p_s, p_t = softmax_row(s_row, t), softmax_row(t_row, t)
        tckd += kl([p_t[g], 1 - p_t[g]], [p_s[g], 1 - p_s[g]]) / 3
        rest = [c for c in range(4) if c != g]
        q_s = softmax_row([s_row[c] for c in rest], t)
        q_t = softmax_row([t_row[c] for c in rest], t)
        nckd += kl(q_t, q_s) / 3
        ce += cross_entropy(s_row, g) / 3
    return ce_weight * ce + warmup_weight * t * t * (alpha * tckd + beta * nckd)


def test_dkd_matches_hand_computation_and_warms_up_per_epoch():
    student, teacher, labels = tensors()
    loss_fn = DecoupledKD(alpha=1.5, beta=8.0, temperature=2.0, ce_weight=0.5, warmup_epochs=4)
    for epoch, weight in [(0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0)]:
        loss_fn.start_epoch(epoch)
        expected = dkd_by_hand(2.0, 1.5, 8.0, 0.5, weight)
        assert loss_fn(student, teacher, labels).item() == pytest.approx(expected, rel=1e-5), epoch
    assert set(loss_fn.last_terms) == {"tckd", "nckd", "ce"}


def test_dkd_paper_defaults_apply_full_weight_from_the_first_epoch():
    student, teacher, labels = tensors()
    loss_fn = DecoupledKD()
    loss_fn.start_epoch(0)
    assert loss_fn(student, teacher, labels).item() == pytest.approx(dkd_by_hand(1.0, 1.0, 0.5, 1.0, 1.0), rel=1e-5)


def test_dkd_uses_the_dominant_class_of_a_mixed_label():
    student, teacher, labels = tensors()
    mixed = F.one_hot(labels, 4).float() * 0.7 + F.one_hot(labels.flip(0), 4).float() * 0.3
    loss_fn = DecoupledKD(ce_weight=0.0)
    hard = loss_fn(student, teacher, labels)
    assert loss_fn(student, teacher, mixed).item() == pytest.approx(hard.item(), rel=1e-6)


def test_dist_matches_hand_computation():
    student, teacher, labels = tensors()
    tau, beta, gamma, ce_weight = 2.0, 1.5, 3.0, 0.25
    y_s = [softmax_row(row, tau) for row in STUDENT]
    y_t = [softmax_row(row, tau) for row in TEACHER]
    inter = 1 - sum(pearson(y_s[i], y_t[i]) for i in range(3)) / 3
    columns = [([y_s[i][c] for i in range(3)], [y_t[i][c] for i in range(3)]) for c in range(4)]
    intra = 1 - sum(pearson(s, t) for s, t in columns) / 4
    ce = sum(cross_entropy(row, g) for row, g in zip(STUDENT, LABELS, strict=True)) / 3
    expected = ce_weight * ce + tau * tau * (beta * inter + gamma * intra)
    loss_fn = DIST(beta=beta, gamma=gamma, tau=tau, ce_weight=ce_weight)
    assert loss_fn(student, teacher, labels).item() == pytest.approx(expected, rel=1e-5)
    assert set(loss_fn.last_terms) == {"inter", "intra", "ce"}


def test_fitnet_matches_hand_computation_through_its_adapter():
    loss_fn = FitNet(student_stage=-1, teacher_stage=-1, hint_weight=10.0, ce_weight=0.5)
    loss_fn.bind(tiny_student(), tiny_teacher())  # student last stage: 4 channels at 8x8; teacher: 8 at 4x4
    assert loss_fn.feature_stages().student == (1,) and loss_fn.feature_stages().teacher == (3,)
    weight = [[0.1 * (o + 1) - 0.05 * i for i in range(4)] for o in range(8)]
    bias = [0.01 * o for o in range(8)]
    with torch.no_grad():
        loss_fn.adapter.weight.copy_(torch.tensor(weight).view(8, 4, 1, 1))
        loss_fn.adapter.bias.copy_(torch.tensor(bias))
    torch.manual_seed(0)
    student_map, teacher_map = torch.rand(1, 4, 8, 8), torch.rand(1, 8, 4, 4)
    s, t = student_map[0].tolist(), teacher_map[0].tolist()
    squared = 0.0
    for o in range(8):
        for y in range(4):
            for x in range(4):
                # adapter output averaged over the 2x2 window that pooling 8x8 -> 4x4 takes
                window = [(2 * y + dy, 2 * x + dx) for dy in (0, 1) for dx in (0, 1)]
                adapted = sum(sum(weight[o][i] * s[i][yy][xx] for i in range(4)) + bias[o] for yy, xx in window) / 4
                squared += (adapted - t[o][y][x]) ** 2
    mse = squared / (8 * 4 * 4)
    logits = torch.tensor([STUDENT[0]])
    expected = 10.0 * mse + 0.5 * cross_entropy(STUDENT[0], 1)
    features = Features({1: student_map}, {3: teacher_map})
    value = loss_fn(logits, torch.tensor([TEACHER[0]]), torch.tensor([1]), features)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_fitnet_refuses_a_stage_out_of_range_and_a_network_without_features():
    with pytest.raises(KdError, match=r"loss.student_stage=5 is out of range: the student has 2 stages"):
        FitNet(student_stage=5).bind(tiny_student(), tiny_teacher())
    student = tiny_student()
    student.net.feature_info = None  # as a network without timm's feature API
    with pytest.raises(KdError, match="the student network exposes none"):
        FitNet().bind(student, tiny_teacher())


def test_weighted_sum_from_config_matches_hand_computation(make_cfg):
    loss_fn = instantiate(make_cfg("loss=kd_ce").loss)
    assert isinstance(loss_fn, WeightedSum)
    student, teacher, labels = tensors()
    expected = 0.0
    for s_row, t_row, g in zip(STUDENT, TEACHER, LABELS, strict=True):
        kd_term = 16.0 * kl(softmax_row(t_row, 4.0), softmax_row(s_row, 4.0))
        expected += (1.0 * kd_term + 0.1 * cross_entropy(s_row, g)) / 3
    assert loss_fn(student, teacher, labels).item() == pytest.approx(expected, rel=1e-6)
    assert set(loss_fn.last_terms) == {"kd", "ce"}
    assert loss_fn.uses_teacher


def test_weighted_sum_names_child_terms_and_forwards_every_hook():
    loss_fn = WeightedSum(
        {
            "dkd": {"weight": 2.0, "loss": DecoupledKD(warmup_epochs=2)},
            "ce": {"weight": 0.5, "loss": LabelCrossEntropy()},
        }
    )
    loss_fn.start_epoch(0)
    assert loss_fn.losses["dkd"].kd_weight == 0.5
    student, teacher, labels = tensors()
    value = loss_fn(student, teacher, labels)
    assert set(loss_fn.last_terms) == {"dkd/tckd", "dkd/nckd", "dkd/ce", "ce"}
    dkd = DecoupledKD(warmup_epochs=2)
    expected = 2.0 * dkd(student, teacher, labels) + 0.5 * F.cross_entropy(student, labels)
    torch.testing.assert_close(value, expected)
    assert not WeightedSum({"ce": {"weight": 1.0, "loss": LabelCrossEntropy()}}).uses_teacher


def test_ce_ignores_the_teacher():
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = LabelCrossEntropy()(logits, None, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    assert not LabelCrossEntropy.uses_teacher


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HintonKD(temperature=0), "temperature"),
        (lambda: DecoupledKD(temperature=-1), "temperature"),
        (lambda: DecoupledKD(beta=-0.5), "loss.beta=-0.5 must not be negative"),
        (lambda: DIST(tau=0), "loss.tau=0"),
        (lambda: LabelCrossEntropy(label_smoothing=1.0), r"loss.label_smoothing=1.0 must lie in \[0, 1\)"),
        (lambda: WeightedSum({"ce": {"weight": -1, "loss": LabelCrossEntropy()}}), "weight=-1"),
        (lambda: WeightedSum({"ce": {"weight": 1}}), "loss.terms.ce must be"),
    ],
)
def test_bad_loss_settings_are_refused_with_one_sentence(make, message):
    with pytest.raises(KdError, match=message):
        make()


def bound_loss(make_cfg, option: str):
    loss = instantiate(make_cfg(f"loss={option}").loss)
    loss.bind(tiny_student(), tiny_teacher())
    loss.bind_data(64)  # a training set of 64 images (CRD's memories)
    return loss


def leaf_inputs(loss, scale: float, dtype: torch.dtype, batch: int = 6):
    """Student and teacher logits (and feature maps for feature losses) as leaves that record gradients."""
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_(True)

    stages = loss.feature_stages()
    student_maps = {stage: leaf(batch, 4, 8, 8) for stage in stages.student}
    teacher_maps = {stage: leaf(batch, 8, 4, 4) for stage in stages.teacher}
    target = torch.arange(batch) % 10
    return leaf(batch, 10), leaf(batch, 10), target, Features(student_maps, teacher_maps, torch.arange(batch))


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_gradient_reaches_only_the_student(make_cfg, option):
    loss = bound_loss(make_cfg, option)
    student, teacher, target, features = leaf_inputs(loss, 3.0, torch.float32)
    loss(student, teacher, target, features).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features.student.values())
    assert teacher.grad is None and all(f.grad is None for f in features.teacher.values())
    trainable = [p for p in loss.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # the fitnet adapter learns too


@pytest.mark.parametrize("option", LOSS_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_loss_and_gradient_are_finite_for_extreme_logits_and_half_precision(make_cfg, option, dtype):
    for scale in (1.0, 1e4):
        loss = bound_loss(make_cfg, option)
        student, teacher, target, features = leaf_inputs(loss, scale, dtype)
        with torch.no_grad():  # saturate the softmaxes: +-1e4 logits
            student.copy_(student.sign() * scale)
            teacher.copy_(-teacher.sign() * scale)
        value = loss(student, teacher, target, features)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value), (scale, value)
        assert torch.isfinite(student.grad.float()).all()
        assert all(torch.isfinite(f.grad.float()).all() for f in features.student.values())

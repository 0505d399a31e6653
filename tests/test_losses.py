import math

import pytest
import torch
import torch.nn.functional as F

from kd.errors import KdError
from kd.losses import HintonKD, LabelCrossEntropy, SoftTargetCrossEntropy


def softmax_row(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def test_soft_ce_is_kl_plus_teacher_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10) * 3, torch.randn(16, 10) * 3
    loss = SoftTargetCrossEntropy()(student, teacher, torch.zeros(16, dtype=torch.long))
    p_teacher = F.softmax(teacher, dim=1)
    kl = (p_teacher * (F.log_softmax(teacher, dim=1) - F.log_softmax(student, dim=1))).sum(1).mean()
    entropy = -(p_teacher * F.log_softmax(teacher, dim=1)).sum(1).mean()
    torch.testing.assert_close(loss, kl + entropy, rtol=1e-6, atol=1e-6)


def test_soft_ce_matches_hand_computation():
    student, teacher = [[1.0, 2.0, 0.5]], [[0.2, -1.0, 3.0]]
    q, p = softmax_row(student[0]), softmax_row(teacher[0])
    expected = -sum(p[c] * math.log(q[c]) for c in range(3))
    loss = SoftTargetCrossEntropy()(torch.tensor(student), torch.tensor(teacher), torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kd_matches_hand_computation_with_label_term():
    student, teacher, label, t, alpha = [[1.0, 2.0, 0.5]], [[0.2, -1.0, 3.0]], 1, 4.0, 0.25
    q, p = softmax_row(student[0], t), softmax_row(teacher[0], t)
    kl = sum(p[c] * math.log(p[c] / q[c]) for c in range(3))
    ce = -math.log(softmax_row(student[0])[label])
    expected = alpha * ce + (1 - alpha) * t * t * kl
    loss_fn = HintonKD(temperature=t, alpha=alpha)
    loss = loss_fn(torch.tensor(student), torch.tensor(teacher), torch.tensor([label]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert set(loss_fn.last_terms) == {"kd", "ce"}


def test_ce_ignores_the_teacher():
    logits, target = torch.randn(8, 10), torch.randint(0, 10, (8,))
    loss = LabelCrossEntropy()(logits, None, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    assert not LabelCrossEntropy.uses_teacher


def test_kd_rejects_non_positive_temperature():
    with pytest.raises(KdError, match="temperature"):
        HintonKD(temperature=0)


@pytest.mark.parametrize("loss_fn", [SoftTargetCrossEntropy(), HintonKD()])
def test_gradient_reaches_only_the_student(loss_fn):
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    loss_fn(student, teacher.detach(), torch.zeros(4, dtype=torch.long)).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None

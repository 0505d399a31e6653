"""The catalogue losses (logit standardization, AT, SP, PKT, RKD, CRD), each against its paper's formula written
out here in plain torch (explicit loops, no kd code), CRD's memory as state, and two training steps of each."""

import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from kd.errors import KdError
from kd.losses import (
    AttentionTransfer,
    ContrastiveRepresentationKD,
    DecoupledKD,
    Features,
    HintonKD,
    ProbabilisticKnowledgeTransfer,
    RelationalKD,
    SimilarityPreserving,
    SoftTargetCrossEntropy,
    SymmetricKL,
)
from kd.models import Classifier, Preprocessing
from kd.models.cifar_resnet import CifarResNet
from kd.module import DistillationModule
from kd.tasks.common import build_data, optimizer_factory
from kd.tasks.models import build_student, build_teacher
from kd.teachers import FrozenTeacher
from tests.tiny_models import tiny_student, tiny_teacher

RGB = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=(3, 32, 32))

# ---------------------------------------------------------------- logit standardization (Sun et al., CVPR 2024)


def z_score_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, over its standard deviation (unbiased, as the authors' code) plus 1e-7."""
    rows = []
    for row in logits.tolist():
        mean = sum(row) / len(row)
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
        rows.append([(v - mean) / (std + 1e-7) for v in row])
    return torch.tensor(rows, dtype=torch.float64)


def logits(seed: int, batch: int = 5, classes: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator) * 3 + 1
    teacher = torch.randn(batch, classes, generator=generator) * 5 - 2
    return student, teacher, torch.randint(0, classes, (batch,), generator=generator)


def test_standardized_kd_matches_the_papers_formula_and_keeps_the_label_term_raw():
    student, teacher, labels = logits(0)
    t, alpha = 2.0, 0.3
    z_s, z_t = z_score_by_hand(student), z_score_by_hand(teacher)
    expected_kl = 0.0
    for i in range(len(student)):
        q = [math.exp(v / t) for v in z_s[i].tolist()]
        p = [math.exp(v / t) for v in z_t[i].tolist()]
        q, p = [v / sum(q) for v in q], [v / sum(p) for v in p]
        expected_kl += sum(p[c] * math.log(p[c] / q[c]) for c in range(len(p))) / len(student)
    raw_ce = sum(
        -student[i, labels[i]].item() + math.log(sum(math.exp(v) for v in student[i].tolist()))
        for i in range(len(student))
    ) / len(student)
    loss = HintonKD(temperature=t, alpha=alpha, logit_standardization=True)
    value = loss(student, teacher, labels)
    assert loss.last_terms["kd"].item() == pytest.approx((1 - alpha) * t * t * expected_kl, rel=1e-5)
    assert loss.last_terms["ce"].item() == pytest.approx(alpha * raw_ce, rel=1e-5)
    assert value.item() == pytest.approx((1 - alpha) * t * t * expected_kl + alpha * raw_ce, rel=1e-5)


@pytest.mark.parametrize("option", ["kd", "dkd", "dml", "soft_ce"])
def test_every_logit_loss_offers_standardization_from_config(make_cfg, option):
    """On: the loss of the raw logits equals the plain loss of the logits standardized by hand (each loss's own
    formula is checked in test_losses.py), and it ignores any per-image shift and positive scale of the logits."""
    on = instantiate(make_cfg(f"loss={option}", "loss.logit_standardization=true").loss)
    off = instantiate(make_cfg(f"loss={option}").loss)
    assert on.logit_standardization and not off.logit_standardization
    student, teacher, labels = logits(1)
    on_value = on(student, teacher, labels)
    kd_terms = {k: v for k, v in on.last_terms.items() if k != "ce"}
    off(z_score_by_hand(student).float(), z_score_by_hand(teacher).float(), labels)
    for name, value in kd_terms.items():
        torch.testing.assert_close(value, off.last_terms[name], rtol=1e-5, atol=1e-6)
    scale, shift = torch.tensor([[0.5], [2.0], [3.0], [1.0], [7.0]]), torch.tensor([[4.0], [-1.0], [0.0], [9.0], [2.0]])
    on(student * scale + shift, teacher * scale.flip(0) - shift, labels)
    for name, value in kd_terms.items():
        torch.testing.assert_close(on.last_terms[name], value, rtol=1e-4, atol=1e-5)
    assert on_value.item() != pytest.approx(off(student, teacher, labels).item(), rel=1e-3)


@pytest.mark.parametrize("make", [HintonKD, DecoupledKD, SymmetricKL, SoftTargetCrossEntropy])
def test_standardization_flag_must_be_a_boolean(make):
    with pytest.raises(KdError, match=r"loss.logit_standardization='yes' must be true or false"):
        make(logit_standardization="yes")


# ---------------------------------------------------------------- feature losses on fixed tensors


def feature_maps(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(*shape, generator=generator) * 2 - 0.5 for shape in shapes]


def ce_by_hand(student_logits: torch.Tensor, labels: torch.Tensor) -> float:
    rows = student_logits.tolist()
    return sum(-row[g] + math.log(sum(math.exp(v) for v in row)) for row, g in zip(rows, labels.tolist(), strict=True))


def attention_by_hand(fmap: list, p: float) -> list[float]:
    """Q[j] = (1/C) sum_c |F_c[j]|^p at each position j, divided by its L2 norm over positions."""
    channels, height, width = len(fmap), len(fmap[0]), len(fmap[0][0])
    q = [sum(abs(fmap[c][y][x]) ** p for c in range(channels)) / channels for y in range(height) for x in range(width)]
    norm = math.sqrt(sum(v * v for v in q))
    return [v / norm for v in q]


def average_2x2(fmap: list) -> list:
    return [
        [
            [
                sum(channel[2 * y + dy][2 * x + dx] for dy in (0, 1) for dx in (0, 1)) / 4
                for x in range(len(channel) // 2)
            ]
            for y in range(len(channel) // 2)
        ]
        for channel in fmap
    ]


def test_attention_transfer_matches_the_papers_formula_over_several_stages():
    # stage 1: same 4x4 size; stage 2: the student's 8x8 map is pooled to the teacher's 4x4; channels differ
    s1, t1, s2, t2 = feature_maps(0, (3, 2, 4, 4), (3, 5, 4, 4), (3, 2, 8, 8), (3, 6, 4, 4))
    beta, p = 1000.0, 2.0
    expected = 0.0
    for student_map, teacher_map in ((s1, t1), (s2, t2)):
        squared, count = 0.0, 0
        for i in range(3):
            s = student_map[i].tolist()
            s = average_2x2(s) if len(s[0]) == 8 else s
            a_s, a_t = attention_by_hand(s, p), attention_by_hand(teacher_map[i].tolist(), p)
            squared += sum((x - y) ** 2 for x, y in zip(a_s, a_t, strict=True))
            count += len(a_s)
        expected += squared / count  # the mean over images and positions
    loss = AttentionTransfer(beta=beta, p=p, ce_weight=0.0)
    loss.stages = type(loss.feature_stages())((1, 2), (1, 2))
    value = loss(
        torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), Features({1: s1, 2: s2}, {1: t1, 2: t2})
    )
    assert value.item() == pytest.approx(beta * expected, rel=1e-5)
    assert set(loss.last_terms) == {"at"}


def test_attention_transfer_defaults_to_every_stage_but_the_stem(make_cfg):
    loss = instantiate(make_cfg("loss=at").loss)
    student = Classifier(CifarResNet(8, (16, 16, 32, 64), num_classes=10), RGB)
    teacher = FrozenTeacher(Classifier(CifarResNet(20, (32, 64, 128, 256), num_classes=10), RGB))
    loss.bind(student, teacher)
    assert loss.feature_stages().student == (1, 2, 3) and loss.feature_stages().teacher == (1, 2, 3)
    loss = instantiate(make_cfg("loss=at").loss)
    loss.bind(tiny_student(), tiny_teacher())  # 2 stages against 4: the student's last with the teacher's last
    assert loss.feature_stages().student == (1,) and loss.feature_stages().teacher == (3,)


def test_similarity_preserving_matches_the_papers_formula():
    s1, t1, s2, t2 = feature_maps(1, (4, 3, 4, 4), (4, 6, 2, 2), (4, 2, 8, 8), (4, 5, 8, 8))
    gamma, batch = 3000.0, 4
    expected = 0.0
    for student_map, teacher_map in ((s1, t1), (s2, t2)):
        grams = []
        for fmap in (student_map, teacher_map):
            rows = [fmap[i].flatten().tolist() for i in range(batch)]
            gram = [
                [sum(a * b for a, b in zip(rows[i], rows[j], strict=True)) for j in range(batch)] for i in range(batch)
            ]
            grams.append([[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in gram])
        expected += sum((grams[0][i][j] - grams[1][i][j]) ** 2 for i in range(batch) for j in range(batch)) / batch**2
    loss = SimilarityPreserving(gamma=gamma, student_stages=[0, 1], teacher_stages=[0, 1], ce_weight=0.5)
    loss.bind(tiny_student(), tiny_teacher())
    labels = torch.tensor([0, 3, 1, 2])
    student_logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]] * 4)
    value = loss(student_logits, student_logits, labels, Features({0: s1, 1: s2}, {0: t1, 1: t2}))
    assert value.item() == pytest.approx(gamma * expected + 0.5 * ce_by_hand(student_logits, labels) / 4, rel=1e-5)


def pooled_by_hand(fmap: torch.Tensor) -> list[list[float]]:
    return [
        [sum(sum(row) for row in channel) / (len(channel) * len(channel[0])) for channel in image]
        for image in fmap.tolist()
    ]


def test_pkt_matches_the_papers_formula_on_pooled_penultimate_features():
    s_map, t_map = feature_maps(2, (5, 4, 8, 8), (5, 8, 4, 4))
    weight, eps = 30000.0, 1e-7
    probabilities = []
    for vectors in (pooled_by_hand(s_map), pooled_by_hand(t_map)):
        units = [[v / math.sqrt(sum(w * w for w in vec)) for v in vec] for vec in vectors]
        kernel = [[(sum(a * b for a, b in zip(u, w, strict=True)) + 1) / 2 for w in units] for u in units]
        probabilities.append([[k / sum(row) for k in row] for row in kernel])
    p_s, p_t = probabilities
    kl = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(5) for j in range(5)) / 25
    loss = ProbabilisticKnowledgeTransfer(weight=weight, ce_weight=0.0)
    loss.bind(tiny_student(), tiny_teacher())
    assert loss.feature_stages() == type(loss.feature_stages())((1,), (3,))  # the last stage of each
    value = loss(
        torch.zeros(5, 3), torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), Features({1: s_map}, {3: t_map})
    )
    assert value.item() == pytest.approx(weight * kl, rel=1e-3)  # float32: a KL of near-equal probabilities


def huber(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_matches_the_papers_distance_and_angle_terms():
    s_map, t_map = feature_maps(3, (4, 4, 8, 8), (4, 8, 4, 4))
    s_map, t_map = s_map * 3, t_map * 0.5  # distances on different scales: the mean-distance normalization matters
    n = 4
    distance_terms, angle_terms = [], []
    for vectors in (pooled_by_hand(s_map), pooled_by_hand(t_map)):
        dist = [[math.dist(vectors[i], vectors[j]) for j in range(n)] for i in range(n)]
        mean = sum(dist[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        distance_terms.append([[dist[i][j] / mean for j in range(n)] for i in range(n)])
        cosines = {}
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    a = [vectors[i][d] - vectors[j][d] for d in range(len(vectors[j]))]
                    b = [vectors[k][d] - vectors[j][d] for d in range(len(vectors[j]))]
                    norm_a, norm_b = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
                    # a zero vector (i == j or k == j) has cosine 0 with everything, as in RKD's code
                    cosines[i, j, k] = (
                        0.0
                        if norm_a == 0 or norm_b == 0
                        else sum(x * y for x, y in zip(a, b, strict=True)) / (norm_a * norm_b)
                    )
        angle_terms.append(cosines)
    distance = sum(huber(distance_terms[0][i][j], distance_terms[1][i][j]) for i in range(n) for j in range(n)) / n**2
    angle = sum(huber(angle_terms[0][key], angle_terms[1][key]) for key in angle_terms[0]) / n**3
    loss = RelationalKD(distance_weight=25.0, angle_weight=50.0, ce_weight=0.0)
    loss.bind(tiny_student(), tiny_teacher())
    loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), Features({1: s_map}, {3: t_map}))
    assert set(loss.last_terms) == {"rkd_distance", "rkd_angle"}
    assert loss.last_terms["rkd_distance"].item() == pytest.approx(25.0 * distance, rel=1e-5)
    assert loss.last_terms["rkd_angle"].item() == pytest.approx(50.0 * angle, rel=1e-5)


# ---------------------------------------------------------------- CRD: contrast against momentum memories

N_DATA, K, DIM, NCE_T, MOMENTUM = 12, 5, 4, 0.07, 0.5


def bound_crd(seed: int = 0) -> ContrastiveRepresentationKD:
    torch.manual_seed(seed)
    loss = ContrastiveRepresentationKD(
        weight=0.8, feat_dim=DIM, num_negatives=K, nce_t=NCE_T, nce_momentum=MOMENTUM, ce_weight=0.0
    )
    loss.bind(tiny_student(), tiny_teacher())
    loss.bind_data(N_DATA)
    return loss


def crd_inputs(seed: int = 4):
    s_map, t_map = feature_maps(seed, (3, 4, 8, 8), (3, 8, 4, 4))
    return torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), Features({1: s_map}, {3: t_map})


INDICES = torch.tensor([7, 2, 10])


def embed_by_hand(vectors: list[list[float]], linear: torch.nn.Linear) -> list[list[float]]:
    weight, bias = linear.weight.tolist(), linear.bias.tolist()
    out = []
    for vec in vectors:
        e = [sum(w * v for w, v in zip(row, vec, strict=True)) + b for row, b in zip(weight, bias, strict=True)]
        norm = math.sqrt(sum(v * v for v in e))
        out.append([v / norm for v in e])
    return out


def nce_by_hand(embeddings, memory, rows, normalizer=None):
    """CRD's NCE with P_n = 1/N_DATA: scores exp(<m, e>/T) / Z, Z = mean score * N_DATA from this batch if not given."""
    scores = [
        [math.exp(sum(a * b for a, b in zip(memory[r], e, strict=True)) / NCE_T) for r in row]
        for e, row in zip(embeddings, rows, strict=True)
    ]
    if normalizer is None:
        normalizer = sum(sum(row) for row in scores) / (len(scores) * len(scores[0])) * N_DATA
    noise = K / N_DATA
    total = 0.0
    for row in scores:
        p = [s / normalizer for s in row]
        total += math.log(p[0] / (p[0] + noise + 1e-7)) + sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
    return -total / len(scores), normalizer


def test_crd_matches_the_nce_formula_and_updates_its_memories_by_momentum():
    loss = bound_crd()
    memory_s, memory_t = loss.memory_student.tolist(), loss.memory_teacher.tolist()
    student_logits, teacher_logits, labels, features = crd_inputs()
    torch.manual_seed(11)
    value = loss(student_logits, teacher_logits, labels, Features(features.student, features.teacher, INDICES))
    torch.manual_seed(11)  # the negatives: K uniform draws over the training set per image, from the global generator
    rows = torch.cat([INDICES[:, None], torch.randint(0, N_DATA, (3, K))], dim=1).tolist()
    e_s = embed_by_hand(pooled_by_hand(features.student[1]), loss.embed_student.linear)
    e_t = embed_by_hand(pooled_by_hand(features.teacher[3]), loss.embed_teacher.linear)
    nce_s, z_s = nce_by_hand(e_s, memory_t, rows)  # the student's embedding against the teacher's memory
    nce_t, z_t = nce_by_hand(e_t, memory_s, rows)
    assert value.item() == pytest.approx(0.8 * (nce_s + nce_t), rel=1e-4)
    assert loss.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-4)
    for memory_before, memory_after, embeddings in (
        (memory_s, loss.memory_student, e_s),
        (memory_t, loss.memory_teacher, e_t),
    ):
        for row in range(N_DATA):
            if row in INDICES.tolist():
                e = embeddings[INDICES.tolist().index(row)]
                mixed = [MOMENTUM * m + (1 - MOMENTUM) * v for m, v in zip(memory_before[row], e, strict=True)]
                norm = math.sqrt(sum(v * v for v in mixed))
                assert memory_after[row].tolist() == pytest.approx([v / norm for v in mixed], rel=1e-5)
            else:
                assert memory_after[row].tolist() == memory_before[row]  # untouched
    # a second batch uses the normalizers fixed by the first
    memory_t2 = loss.memory_teacher.tolist()
    torch.manual_seed(12)
    value = loss(student_logits, teacher_logits, labels, Features(features.student, features.teacher, INDICES))
    torch.manual_seed(12)
    rows = torch.cat([INDICES[:, None], torch.randint(0, N_DATA, (3, K))], dim=1).tolist()
    assert loss.last_terms["crd"].item() == pytest.approx(
        0.8
        * (
            nce_by_hand(e_s, memory_t2, rows, z_s)[0]
            + nce_by_hand(e_t, loss_memory_before(memory_s, e_s), rows, z_t)[0]
        ),
        rel=1e-4,
    )


def loss_memory_before(memory: list, embeddings: list) -> list:
    """The student memory after the first batch's momentum update (what the second batch reads)."""
    updated = [list(row) for row in memory]
    for position, row in enumerate(INDICES.tolist()):
        mixed = [MOMENTUM * m + (1 - MOMENTUM) * v for m, v in zip(memory[row], embeddings[position], strict=True)]
        norm = math.sqrt(sum(v * v for v in mixed))
        updated[row] = [v / norm for v in mixed]
    return updated


def test_crd_state_is_in_the_state_dict_and_restores_exactly():
    loss = bound_crd(seed=0)
    student_logits, teacher_logits, labels, features = crd_inputs()
    batch = Features(features.student, features.teacher, INDICES)
    loss(student_logits, teacher_logits, labels, batch)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    assert {"memory_student", "memory_teacher", "normalizers", "embed_student.linear.weight"} <= set(state)
    assert tuple(state["memory_student"].shape) == (N_DATA, DIM)
    fresh = bound_crd(seed=5)  # other heads and memories
    assert not torch.equal(fresh.memory_student, state["memory_student"])
    fresh.load_state_dict(state)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    torch.manual_seed(3)
    expected = loss(student_logits, teacher_logits, labels, batch)
    torch.manual_seed(3)
    assert torch.equal(fresh(student_logits, teacher_logits, labels, batch), expected)
    assert torch.equal(fresh.memory_teacher, loss.memory_teacher)


def test_crd_negatives_follow_the_global_seed():
    student_logits, teacher_logits, labels, features = crd_inputs()
    batch = Features(features.student, features.teacher, INDICES)
    values = []
    for seed in (1, 1, 2):
        loss = bound_crd()
        torch.manual_seed(seed)
        values.append(loss(student_logits, teacher_logits, labels, batch).item())
    assert values[0] == values[1] and values[0] != values[2]


def test_crd_refuses_a_batch_without_image_indices():
    loss = bound_crd()
    with pytest.raises(KdError, match=r"needs each image's training-set index"):
        loss(*crd_inputs())


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: AttentionTransfer(beta=-1), r"loss.beta=-1 must not be negative"),
        (lambda: AttentionTransfer(p=0), r"loss.p=0 must be positive"),
        (lambda: SimilarityPreserving(gamma=-3), r"loss.gamma=-3 must not be negative"),
        (lambda: ProbabilisticKnowledgeTransfer(weight=-1), r"loss.weight=-1 must not be negative"),
        (lambda: RelationalKD(angle_weight=-50), r"loss.angle_weight=-50 must not be negative"),
        (lambda: ContrastiveRepresentationKD(num_negatives=0), r"loss.num_negatives=0 must be a positive integer"),
        (lambda: ContrastiveRepresentationKD(nce_t=0), r"loss.nce_t=0 must be positive"),
        (lambda: ContrastiveRepresentationKD(nce_momentum=1.0), r"loss.nce_momentum=1.0 must lie in \[0, 1\)"),
        (lambda: ContrastiveRepresentationKD(feat_dim=0), r"loss.feat_dim=0 must be a positive integer"),
        (lambda: ContrastiveRepresentationKD(weight=-0.8), r"loss.weight=-0.8 must not be negative"),
    ],
)
def test_bad_catalogue_settings_are_refused_with_one_sentence(make, message):
    with pytest.raises(KdError, match=message) as error:
        make()
    assert str(error.value).count(". ") == 0 and len(str(error.value)) < 300


@pytest.mark.parametrize(
    ("student_stages", "teacher_stages", "message"),
    [
        ([1, 2], [3], r"loss.student_stages=\[1, 2\] and loss.teacher_stages=\[3\] must be lists of the same length"),
        ([1], None, r"must be lists of the same length"),
        ([5], [1], r"loss.student_stages=\[5\] has 5, out of range: the student has 2 stages"),
        ([], [], r"was given no stages"),
    ],
)
def test_bad_stage_lists_are_refused_at_bind(student_stages, teacher_stages, message):
    with pytest.raises(KdError, match=message):
        AttentionTransfer(student_stages=student_stages, teacher_stages=teacher_stages).bind(
            tiny_student(), tiny_teacher()
        )


def test_a_network_without_features_is_refused():
    student = tiny_student()
    student.net.feature_info = None
    for loss in (AttentionTransfer(), SimilarityPreserving(), ProbabilisticKnowledgeTransfer(), RelationalKD()):
        with pytest.raises(KdError, match="the student network exposes none"):
            loss.bind(student, tiny_teacher())


# ---------------------------------------------------------------- two training steps of each, CIFAR ResNets


def cifar_cfg(make_cfg, *overrides: str):
    return make_cfg(
        "data=fake",
        "data.num_classes=10",
        "data.train_size=48",
        "teacher=resnet8x4",  # 256 channels at the last stage against the student's 64: heads and kernels differ
        "student=resnet8",
        "teacher.weights=none",
        "student.weights=none",
        "sched.warmup_epochs=0",
        *overrides,
    )


def fit_steps(cfg, tmp_path, steps: int = 2, ckpt_path=None, seed: int = 0) -> tuple[DistillationModule, L.Trainer]:
    data = build_data(cfg, cfg.student)
    torch.manual_seed(0)  # the same (random) teacher for every run
    teacher = build_teacher(cfg, data.num_classes, None)
    torch.manual_seed(seed)
    student = build_student(cfg.student, data.num_classes, None)
    module = DistillationModule(
        student, instantiate(cfg.loss), optimizer_factory(cfg), instantiate(cfg.sched), data.num_classes, teacher
    )
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize(
    ("option", "terms"),
    [
        ("kd", {"kd", "ce"}),
        ("at", {"at", "ce"}),
        ("sp", {"sp", "ce"}),
        ("pkt", {"pkt", "ce"}),
        ("rkd", {"rkd_distance", "rkd_angle", "ce"}),
        ("crd", {"crd", "ce"}),
    ],
)
def test_two_training_steps_on_cifar_resnets(make_cfg, tmp_path, option, terms):
    extra = ["loss.logit_standardization=true", "loss.temperature=2", "loss.alpha=0.1"] if option == "kd" else []
    extra += ["loss.num_negatives=1024"] if option == "crd" else []
    cfg = cifar_cfg(make_cfg, f"loss={option}", *extra)
    module, trainer = fit_steps(cfg, tmp_path)
    assert trainer.global_step == 2
    assert set(module.loss.last_terms) == terms
    assert all(torch.isfinite(v) and v > 0 for v in module.loss.last_terms.values())
    assert module.teacher.check_unchanged() == module.teacher.start_fingerprint
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.loss.parameters()} <= optimized  # CRD's heads learn with the student


def test_crd_memories_are_checkpointed_and_restored_on_resume(make_cfg, tmp_path):
    cfg = cifar_cfg(make_cfg, "loss=crd", "loss.num_negatives=256")
    module, _ = fit_steps(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["state_dict"]
    assert tuple(state["loss.memory_student"].shape) == (48, 128)
    assert torch.equal(state["loss.memory_teacher"], module.loss.memory_teacher)
    assert (state["loss.normalizers"] > 0).all()  # fixed by the first batch
    # the module hands over each image's dataset index: the 2 x 16 distinct images seen got renormalized rows
    for memory in (state["loss.memory_student"], state["loss.memory_teacher"]):
        assert int(((memory.norm(dim=1) - 1).abs() < 1e-5).sum()) == 32
    # another start (other student, heads and memories) until the checkpoint is restored
    resumed, trainer = fit_steps(cfg, tmp_path / "resumed", steps=2, ckpt_path=tmp_path / "run" / "last.ckpt", seed=1)
    assert trainer.global_step == 2
    for name in ("memory_student", "memory_teacher", "normalizers", "embed_student.linear.weight"):
        assert torch.equal(resumed.loss.state_dict()[name], state[f"loss.{name}"]), name


def test_cifar_resnets_report_their_stages_from_the_same_forward_pass():
    torch.manual_seed(0)
    model = Classifier(CifarResNet(8, (32, 64, 128, 256), num_classes=10), RGB).eval()
    images = torch.rand(2, 3, 32, 32)
    info = model.feature_info()
    assert [(i["num_chs"], i["reduction"]) for i in info] == [(32, 1), (64, 1), (128, 2), (256, 4)]
    with torch.no_grad():
        logits, features = model.forward_with_features(images, (0, 1, 2, 3))
        torch.testing.assert_close(logits, model(images))
        stem = model.net.relu(model.net.bn1(model.net.conv1(model.normalize(images))))
        torch.testing.assert_close(features[0], stem)
        torch.testing.assert_close(features[3], model.net.layer3(model.net.layer2(model.net.layer1(stem))))
    for stage, feature in features.items():
        assert tuple(feature.shape[1:]) == (
            info[stage]["num_chs"],
            32 // info[stage]["reduction"],
            32 // info[stage]["reduction"],
        )


@pytest.mark.parametrize("option", ["at", "sp", "pkt", "rkd", "crd"])
def test_feature_losses_pass_the_preflight_check_before_bind(make_cfg, option):
    """run.py probes every loss on random logits before the models exist; a feature loss must say it reads
    features (its stages) so the probe leaves it alone, as it does for loss=fitnet."""
    from kd.tasks.checks import check_loss_gives_gradient

    cfg = make_cfg(f"loss={option}")
    loss = instantiate(cfg.loss)
    assert loss.feature_stages()
    check_loss_gives_gradient(loss, cfg.loss, 10)


@pytest.mark.slow
def test_a_crd_run_resumed_mid_epoch_ends_with_the_same_memories_and_weights(tmp_path, cache_dir):
    """run.py end to end: resuming from the step-2 checkpoint of a 4-steps-per-epoch run restores CRD's heads,
    memories and normalizers (and the generator its negatives come from), so both runs end bit-identical."""
    from tests.conftest import run_cli

    run = [
        "data=fake",
        "data.num_classes=10",
        "data.train_size=64",
        "teacher=resnet8x4",
        "student=resnet8",
        "teacher.weights=none",
        "student.weights=none",
        "loss=crd",
        "loss.num_negatives=512",
        "trainer.max_epochs=2",
        "sched.warmup_epochs=0",
        "logger=csv",
        "callbacks.checkpoint.every_n_train_steps=2",
        "callbacks.checkpoint.save_top_k=-1",
    ]
    alone, resumed = tmp_path / "alone", tmp_path / "resumed"
    alone.mkdir(), resumed.mkdir()
    result = run_cli(*run, cwd=alone, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    middle = tmp_path / "step2.ckpt"
    middle.write_bytes((alone / "checkpoints" / "epoch=0-step=2.ckpt").read_bytes())
    result = run_cli(*run, f"ckpt_path={middle}", cwd=resumed, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = torch.load(alone / "checkpoints" / "last.ckpt", weights_only=False)
    got = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert got["global_step"] == expected["global_step"] == 8
    assert {"loss.memory_student", "loss.memory_teacher", "loss.normalizers"} <= set(got["state_dict"])
    for key, value in expected["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key


@pytest.mark.parametrize("option", ["at", "sp", "pkt", "rkd", "crd"])
def test_feature_losses_compute_in_float32_under_mixed_precision(make_cfg, option):
    """Under trainer.precision=bf16-mixed the training step runs in autocast; the relation losses' Gram matrices,
    distances and exponentials must not drop to bfloat16 (the same value as without autocast)."""
    values = []
    for enabled in (False, True):
        loss = instantiate(make_cfg(f"loss={option}", "loss.ce_weight=0").loss)
        torch.manual_seed(0)
        loss.bind(tiny_student(), tiny_teacher())
        loss.bind_data(16)
        s_map, t_map = feature_maps(6, (6, 4, 8, 8), (6, 8, 4, 4))
        stages = loss.feature_stages()
        features = Features({s: s_map for s in stages.student}, {t: t_map for t in stages.teacher}, torch.arange(6) * 2)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            values.append(loss(torch.zeros(6, 3), torch.zeros(6, 3), torch.zeros(6, dtype=torch.long), features))
    assert values[1].dtype == torch.float32
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-7)

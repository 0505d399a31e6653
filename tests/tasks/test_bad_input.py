"""Bad input stops a run before any work: one line on stderr naming the bad value, exit code 2, nothing left."""

import io
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from kd.data.imagefolder import ImageFolderData
from kd.errors import KdError
from kd.launch.configs import CONF_DIR
from kd.launch.preflight import check_overrides, check_writable_folder, unknown_option_message
from kd.launch.run import user_error
from kd.losses import DistillationLoss
from kd.tasks.checks import check_loss_gives_gradient, check_run_length
from kd.tasks.common import build_data, build_trainer
from kd.tasks.models import build_teacher_model
from kd.tasks.train import fit
from tests.conftest import FAST, HYDRA_FILES, assert_only_hydra_files, files_under, run_cli

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


MAX_MESSAGE = 300  # characters of one kd error line


@pytest.fixture(autouse=True)
def kd_messages_are_short_single_lines(monkeypatch):
    """Every KdError raised by a test of this file (in this process) is one line under MAX_MESSAGE characters."""
    raised: list[str] = []
    original = KdError.__init__

    def record(self, *args):
        original(self, *args)
        raised.append(str(self))

    monkeypatch.setattr(KdError, "__init__", record)
    yield
    for message in raised:
        assert "\n" not in message and len(message) < MAX_MESSAGE, f"{len(message)} characters: {message!r}"


def assert_refused(result, expected: str, out: Path, cache: Path | None = None) -> None:
    """Exit code 2, the error as one short line starting with 'error:', no traceback, only Hydra's files left."""
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.stderr[-2000:]
    assert len(errors[0]) < MAX_MESSAGE + len("error: "), f"{len(errors[0])} characters: {errors[0]}"
    assert "Traceback" not in result.stderr
    assert_only_hydra_files(out, cache)


# ---------------------------------------------------------------- the command line (before Hydra composes)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["teacher=nosuch"], "error: teacher=nosuch is unknown; python -m kd.zoo lists the zoo"),
        (["student=resnet_nope"], "error: student=resnet_nope is unknown; did you mean resnet"),
        (
            ["loss=nosuch"],
            "error: loss=nosuch is unknown; choose one of at, ce, crd, deit, dist, dkd, dml, feature_kd, fitnet, "
            "function_matching, hard_kd, js, kd, ",
        ),
        (["data=imagenett"], "error: data=imagenett is unknown; choose one of cifar10, cifar100, digits, fake"),
        (["-m", "loss=kd,nosuch"], "error: loss=nosuch is unknown; choose one of "),
    ],
)
@pytest.mark.slow  # a python run.py process per case: over 10 s each
def test_unknown_group_option_is_one_line_naming_valid_names(tmp_path, args, expected):
    result = run_cli(*args, cwd=tmp_path, cache_dir=tmp_path / "cache")
    assert_refused(result, expected, tmp_path, tmp_path / "cache")
    assert result.stderr.strip().splitlines()[-1].startswith(expected)
    if args[0].startswith(("teacher", "student")):  # the closest zoo names and how to name any other model
        assert len(result.stderr.strip().splitlines()[-1]) <= 200 and ".model=NAME" in result.stderr
    assert not files_under(tmp_path)  # refused before Hydra made anything


def test_unknown_option_of_a_long_group_names_the_closest_and_where_the_rest_are():
    with pytest.raises(KdError) as refused:
        check_overrides(["teacher=resnet50vd"])
    message = str(refused.value)
    assert message.startswith("teacher=resnet50vd is unknown; did you mean resnet50_vd")  # the nearest first
    assert len(message) <= 200 and "teacher=timm teacher.model=NAME" in message
    long_group = [f"option{i:02d}" for i in range(40)]  # a group whose full list would not fit in one short line
    message = unknown_option_message("loss", "option07x", long_group)
    assert message.startswith("loss=option07x is unknown; closest: option07, ") and message.endswith(
        "see all 40 options with ls conf/loss/"
    )


@pytest.mark.slow  # a python run.py process per case: over 10 s each
def test_unwritable_hydra_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli(f"hydra.run.dir={blocker}/run", cwd=tmp_path, cache_dir=tmp_path / "cache")
    expected = f"error: hydra.run.dir={blocker}/run cannot be written ({blocker} is not a folder); choose a folder"
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(expected)
    assert "Traceback" not in result.stderr
    assert files_under(tmp_path) == {"a-file"}


def test_output_folder_the_filesystem_refuses_is_found_by_creating_it(tmp_path):
    """Permission bits say yes to root; creating the folder is what tells (here: a folder below a regular file)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KdError, match=rf"^hydra.run.dir={blocker}/sub/deeper cannot be written \({blocker} is not a"):
        check_writable_folder("hydra.run.dir", f"{blocker}/sub/deeper")
    proc = Path("/proc/kd-cannot-write-here")
    if Path("/proc/self").exists():  # Linux: no file can be made directly in /proc, not even by root
        with pytest.raises(KdError, match=rf"^hydra.run.dir={proc} cannot be written \({proc}: "):
            check_writable_folder("hydra.run.dir", str(proc))
        assert not proc.exists()

    fresh = tmp_path / "new" / "deeper" / "run"  # creatable: accepted, and what the check made is gone again
    check_writable_folder("hydra.sweep.dir", str(fresh))
    assert files_under(tmp_path) == {"file"} and not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    check_writable_folder("hydra.run.dir", str(kept / "run"))
    assert kept.is_dir() and not list(kept.iterdir())  # the existing folder stays, only the new one went


def test_preflight_accepts_valid_overrides_and_sweeps():
    check_overrides(["teacher=digits_teacher", "loss=kd,ce", "loss=glob(*)", "seed=range(3)", "optim.lr=0.2"])
    check_overrides(["+experiment=digits_kd", "hydra.run.dir=outputs/${now:%H}", "~logger"])
    check_overrides(["logger=[csv,wandb,tensorboard]", "seed=0,1", "logger=[csv],[wandb]"])
    with pytest.raises(KdError, match=r"^optim=adam is unknown; choose one of adamw, sgd"):
        check_overrides(["optim=choice(sgd,adam)"])
    with pytest.raises(KdError, match=r"^logger=wandbb is unknown; choose one of csv, none, tensorboard, wandb"):
        check_overrides(["logger=[csv,wandbb]"])


# ---------------------------------------------------------------- through run.py: refused before any work


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["trainer.max_epochs=2", "sched.warmup_epochs=3"], "error: sched.warmup_epochs=3 covers the whole run (66 of"),
        # offline: the timm weights cannot be downloaded, found when the teacher is built (after the trainer)
        (
            ["teacher=resnet152_vd", "student=resnet50_vd"],
            "error: timm weights 'resnet152d.ra2_in1k' could not be downloaded",
        ),
    ],
)
@pytest.mark.slow  # a python run.py process per case: over 10 s each
def test_refused_run_writes_only_hydra_files(tmp_path, args, expected):
    """Loggers start only after every check: no csv/hparams.yaml, no wandb/offline-run-* of a refused run."""
    cache = tmp_path / "cache"  # empty: weights=auto would train both digits models first
    offline = {"HF_HUB_OFFLINE": "1"}
    result = run_cli(*args, cwd=tmp_path, cache_dir=cache, extra_env=offline)
    assert_refused(result, expected, tmp_path, cache)
    assert files_under(tmp_path) == HYDRA_FILES  # Hydra did start: the refusal came from kd, after composing


# ---------------------------------------------------------------- nonsensical numbers (in process)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.batch_size=0"], "data.batch_size=0 must be at least 1"),
        (["optim.lr=0"], "optim.lr=0 must be positive"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 must be positive"),
        (["loss.temperature=0"], "loss.temperature=0 must be positive"),
        (["loss.temperature=-2"], "loss.temperature=-2 must be positive"),
        (["sched.warmup_epochs=-1"], "sched.warmup_epochs=-1 is negative"),
        (["sched.min_lr=0.5"], "sched.min_lr=0.5 must lie in [0, optim.lr=0.1]"),
        (["trainer.max_epochs=2", "sched.warmup_epochs=2"], "sched.warmup_epochs=2 covers the whole run (44 of 44"),
        (["trainer.max_epochs=0"], "this run would take no training step"),
        (["ckpt_path=last"], "pass its output folder as hydra.run.dir=FOLDER together with its original overrides"),
        (["ckpt_path=/nowhere/last.ckpt"], "ckpt_path=/nowhere/last.ckpt does not exist"),
    ],
)
def test_nonsensical_settings_stop_before_any_work(make_cfg, tmp_path, overrides, expected):
    cache = tmp_path / "fresh-cache"
    cfg = make_cfg(*FAST, f"paths.cache_dir={cache}", *overrides)
    with pytest.raises(Exception) as raised:
        fit(cfg, task="distill")
    refused = user_error(raised.value)  # what the CLI prints (instantiate wraps constructors' errors)
    assert refused is not None and expected in str(refused) and "\n" not in str(refused), raised.value
    assert not list(cache.rglob("*")), "the run trained a model before refusing"
    assert_only_hydra_files(tmp_path / "out")


def test_unwritable_output_folder_is_refused(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = make_cfg(*FAST, f"paths.output_dir={blocker}/out")
    with pytest.raises(KdError, match=f"output folder {blocker}/out cannot be written"):
        fit(cfg, task="distill")


class WeightedTerms(DistillationLoss):
    """A loss of weighted terms, as a config-built weighted sum would be."""

    def __init__(self, kd_weight: float, ce_weight: float) -> None:
        super().__init__()
        self.kd_weight, self.ce_weight = kd_weight, ce_weight

    def terms(self, student_logits, teacher_logits, target):
        return {
            "kd": self.kd_weight * torch.nn.functional.mse_loss(student_logits, teacher_logits),
            "ce": self.ce_weight * torch.nn.functional.cross_entropy(student_logits, target),
        }


def test_loss_with_all_weights_zero_is_refused():
    cfg = OmegaConf.create({"kd_weight": 0.0, "ce_weight": 0})
    with pytest.raises(KdError, match=r"no gradient \(its terms are all weighted zero: loss.kd_weight=0.0, loss.ce_w"):
        check_loss_gives_gradient(WeightedTerms(0.0, 0), cfg, num_classes=10)
    check_loss_gives_gradient(WeightedTerms(0.0, 0.1), cfg, num_classes=10)  # one weight is enough


def test_mixup_with_an_odd_batch_is_refused(make_cfg):
    # BatchMixup checks the configured batch when it is built, before any work (kd.tasks.train.fit builds it first).
    for name in ("mixup", "cutmix", "mixup_cutmix"):
        with pytest.raises(Exception) as refused:  # hydra's instantiate wraps the constructor's KdError
            instantiate(make_cfg(f"mixup={name}", "data.batch_size=63").mixup)
        assert "but data.batch_size is 63, an odd number; use an even data.batch_size" in str(user_error(refused.value))
        instantiate(make_cfg(f"mixup={name}", "data.batch_size=64").mixup)
    assert make_cfg("data.batch_size=63").get("mixup") is None  # off by default: nothing to pair


def test_run_length_counts_steps_as_lightning_does(make_cfg, tmp_path):
    cfg = make_cfg(*FAST, "trainer.max_epochs=3", "trainer.accumulate_grad_batches=2", "sched.warmup_epochs=1")
    data = build_data(cfg, cfg.student)
    trainer = build_trainer(cfg, tmp_path)
    check_run_length(trainer, data, instantiate(cfg.sched))  # 1437 images: 22 batches, 11 steps per epoch
    with pytest.raises(KdError, match=r"covers the whole run \(33 of 33 steps\)"):
        check_run_length(trainer, data, instantiate(cfg.sched, warmup_epochs=3))


# ---------------------------------------------------------------- weights files


@pytest.fixture
def digits_cfg(make_cfg):
    return make_cfg(*FAST)


def build_teacher_from(cfg, path):
    cfg.teacher.weights = str(path)
    return build_teacher_model(cfg.teacher, 10)


def other_net_state(cfg, model: str, num_classes: int) -> dict:
    return instantiate(cfg[model].arch).build(num_classes).state_dict()


def test_weights_files_that_cannot_be_used_are_named(digits_cfg, tmp_path):
    good = tmp_path / "teacher.pth"
    torch.save(other_net_state(digits_cfg, "teacher", 10), good)
    build_teacher_from(digits_cfg, good)  # the reference: a complete file loads

    cases = {
        "missing.pth": (None, "does not exist; pass an existing file or a timm tag"),
        "empty.pth": (b"", "is empty; pass a complete weights file"),
        "truncated.pth": (good.read_bytes()[: good.stat().st_size // 2], "is truncated"),
        "notes.pth": (b"these are my notes, not weights", "is corrupt (IndexError"),
        "story.pth": (b"once upon a time", "is corrupt"),
        "truncated.safetensors": (b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "is truncated"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(KdError) as refused:
            build_teacher_from(digits_cfg, path)
        assert str(refused.value).startswith(f"weights file {path} ") and expected in str(refused.value), name

    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    with pytest.raises(KdError, match="holds no state dict of tensors; save model.state_dict"):
        build_teacher_from(digits_cfg, listing)


def test_weights_of_another_architecture_or_class_count_are_refused_for_a_teacher(digits_cfg, tmp_path):
    student_file = tmp_path / "student.pth"
    torch.save(other_net_state(digits_cfg, "student", 10), student_file)
    with pytest.raises(
        KdError, match=r"do not fit this architecture \(missing keys features.3.0.weight.*shape mismatch in "
    ):
        build_teacher_from(digits_cfg, student_file)

    three_classes = tmp_path / "teacher-3-classes.safetensors"
    save_file(other_net_state(digits_cfg, "teacher", 3), str(three_classes))
    with pytest.raises(
        KdError,
        match="another number of classes than the dataset's 10; give teacher weights trained on these classes",
    ):
        build_teacher_from(digits_cfg, three_classes)


# ---------------------------------------------------------------- image folders


def jpeg_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def image_tree(root: Path, classes=("cat", "dog"), per_class=2) -> Path:
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class):
                (folder / f"{index}.jpg").write_bytes(jpeg_bytes((40 * index, 80, 120)))
    return root


def image_data(root: Path, **kwargs) -> ImageFolderData:
    data = ImageFolderData(str(root), batch_size=2, num_workers=0, image_size=8, **kwargs)
    data.setup("fit")
    return data


def only_train(root: Path) -> None:
    (root / "train").mkdir(parents=True)


def val_classes_renamed(root: Path) -> None:
    image_tree(root)
    (root / "val" / "dog").rename(root / "val" / "wolf")


def extra_train_class(root: Path) -> None:
    image_tree(root)
    (root / "train" / "bird").mkdir()


def empty_val_class(root: Path) -> None:
    image_tree(root)
    for image in (root / "val" / "cat").iterdir():
        image.unlink()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: None, "data folder {root}/train does not exist; set data.root to a folder with train/ and val/"),
        (Path.mkdir, "data folder {root}/train does not exist"),
        (only_train, "data folder {root}/train has no class folders; put each class's images in {root}/train/<class>/"),
        (val_classes_renamed, "train/ and val/ under {root} have different class folders (e.g. ['dog', 'wolf'])"),
        (extra_train_class, "train/ and val/ under {root} have different class folders (e.g. ['bird'])"),
        (empty_val_class, "class folder {root}/val/cat has no images; put its images there or remove the folder"),
    ],
)
def test_data_roots_that_cannot_be_used_are_named(tmp_path, make, expected):
    root = tmp_path / "images"
    make(root)
    with pytest.raises(KdError) as refused:
        image_data(root)
    assert expected.format(root=root) in str(refused.value)


def test_hidden_folders_are_not_classes(tmp_path):
    root = image_tree(tmp_path / "images")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    data = image_data(root)
    assert data.class_names == ["cat", "dog"] and data.train_set.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("notes.txt", b"a text file among the images", "is not an image file (by its extension)"),
        ("page.jpg", b"<html>404 Not Found</html>", "is not an image (its first bytes match no image format)"),
        ("empty.png", b"", "is empty"),
    ],
)
def test_bad_image_files_stop_the_run_by_default_naming_the_file(tmp_path, name, content, reason):
    root = image_tree(tmp_path / "images")
    bad = root / "train" / "dog" / name
    bad.write_bytes(content)
    with pytest.raises(KdError) as refused:
        image_data(root)
    assert str(refused.value) == (
        f"image file {bad} {reason}; remove or replace it, or pass data.bad_images=skip to leave such files out"
    )


def test_bad_image_files_are_left_out_and_counted_with_skip(tmp_path, caplog):
    root = image_tree(tmp_path / "images")
    (root / "train" / "dog" / "page.jpg").write_bytes(b"<html></html>")
    (root / "train" / "cat" / "notes.txt").write_bytes(b"notes")
    data = image_data(root, bad_images="skip")
    assert len(data.train_set) == 4 and len(data.train_set.skipped) == 2
    assert "left out 2 unreadable or non-image files" in caplog.text


def test_an_image_that_fails_to_decode_is_named_or_skipped(tmp_path):
    root = image_tree(tmp_path / "images")
    broken = root / "train" / "cat" / "1.jpg"
    broken.write_bytes(jpeg_bytes()[:40])  # a valid JPEG header, cut off: passes the header check
    data = image_data(root)
    index = [path for path, _ in data.train_set.samples].index(str(broken))
    with pytest.raises(KdError, match=f"image file {broken} cannot be decoded"):
        data.train_set[index]

    skipping = image_data(root, bad_images="skip")
    image, label = skipping.train_set[index]
    assert image.shape == (3, 8, 8) and label == 1  # the next sample (dog/0.jpg) in its place
    assert str(broken) in skipping.train_set.skipped


def test_unknown_bad_images_policy_is_refused(tmp_path):
    with pytest.raises(KdError, match="data.bad_images=ignore is unknown; use stop or skip"):
        ImageFolderData(str(image_tree(tmp_path / "images")), bad_images="ignore")


def test_a_worker_error_stays_one_line(tmp_path):
    root = image_tree(tmp_path / "images")
    (root / "train" / "cat" / "0.jpg").write_bytes(jpeg_bytes()[:40])
    data = ImageFolderData(str(root), batch_size=4, num_workers=1, image_size=8)
    data.setup("fit")
    with pytest.raises(KdError) as refused:
        next(iter(data.train_dataloader()))
    assert str(refused.value).startswith(f"image file {root}/train/cat/0.jpg cannot be decoded")
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------- misspelled keys, keywords kd sets itself


def test_a_misspelled_key_is_one_line_naming_the_closest_keys_of_its_group(tmp_path):
    result = run_cli("optim.learning_rate=0.1", cwd=tmp_path, cache_dir=tmp_path / "cache")
    assert_refused(result, "error: optim.learning_rate=0.1 is not a key of optim; closest: optim.lr,", tmp_path)
    assert "python run.py --cfg job" in result.stderr and "+optim" not in result.stderr  # never Hydra's advice
    assert not files_under(tmp_path)  # refused before Hydra made anything


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.batchsize=32"], "data.batchsize=32 is not a key of data; closest: data.batch_size,"),
        (["sed=1"], "sed=1 is not a key at the top of the config; closest: seed,"),
        (["optim=adamw", "optim.momentum=0.9"], "optim.momentum=0.9 is not a key of optim; closest: optim."),
        (
            ["trainer.max_epoch=3", "optim.lr=0.2,0.3"],
            "trainer.max_epoch=3 is not a key of trainer; closest: trainer.max_epochs",
        ),
        (
            ["teacher=timm", "teacher.model=resnet10t", "teacher.arch.drop_rat=0.1"],
            "(+teacher.arch.drop_rat=0.1 passes a new keyword to the model's builder)",
        ),
    ],
)
def test_unknown_keys_are_refused_before_hydra_composes(overrides, expected):
    with pytest.raises(KdError) as refused:
        check_overrides(overrides)
    assert expected in str(refused.value) and "--cfg job" in str(refused.value)


def test_keys_that_exist_or_are_added_on_purpose_pass():
    check_overrides(["teacher=timm", "teacher.model=resnet10t", "+teacher.arch.drop_rate=0.1", "teacher.weights=none"])
    check_overrides(["optim=adamw,sgd", "optim.momentum=0.5"])  # the key of one swept option: Hydra checks each job
    check_overrides(["experiment=cifar100_kd", "sched.milestones=[1,2]", "data.classes=10", "optim.lr=0.1,0.2"])


def test_kd_distill_refuses_an_unknown_key_the_same_way():
    import kd

    loader = torch.utils.data.DataLoader([(torch.zeros(1, 8, 8), 0)])
    with pytest.raises(KdError, match=r"^optim.learning_rate=0.1 is not a key of optim; closest: optim.lr,"):
        kd.distill(torch.nn.Linear(64, 10), torch.nn.Linear(64, 10), loader, loader, optim={"learning_rate": 0.1})


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["teacher=timm", "teacher.model=resnet10t", "+teacher.arch.num_classes=0"],
            "loss=kd compares class predictions, but teacher.arch.num_classes=0 gives features only; use "
            "loss=feature_kd",
        ),
        (
            ["student=timm", "student.model=resnet10t", "+student.arch.num_classes=5"],
            "student.arch.num_classes=5 cannot be given to a timm model (kd builds the classifier for the dataset's",
        ),
        (
            ["teacher=timm", "teacher.model=resnet10t", "+teacher.arch.pretrained=true"],
            "teacher.arch.pretrained=True cannot be given to a timm model (kd loads the weights itself: set "
            "teacher.weights=pretrained",
        ),
        (
            ["student=torchvision", "student.model=alexnet", "+student.arch.in_chans=1"],
            "student.arch.in_chans=1 cannot be given to a torchvision model (torchvision's models read 3-channel "
            "images; name the model with student=timm",
        ),
    ],
)
def test_keywords_kd_passes_itself_are_refused_in_one_sentence(make_cfg, tmp_path, overrides, expected):
    with pytest.raises(KdError) as refused:
        fit(make_cfg(*overrides), task="distill")
    assert expected in str(refused.value)
    assert_only_hydra_files(tmp_path / "out")


def test_the_model_builders_refuse_those_keywords_too():
    from kd.models.arch import TimmArch, TorchvisionArch

    with pytest.raises(KdError, match=r"^pretrained=True cannot be given to a timm model \(kd loads the weights"):
        TimmArch("resnet10t", pretrained=True)
    with pytest.raises(KdError, match=r"^arch.num_classes=-3 must be 0 \(features only\) or a class count"):
        TimmArch("resnet10t", num_classes=-3)
    assert TimmArch("resnet10t", num_classes=0).build(10).num_classes == 0  # an embedding teacher's network
    with pytest.raises(KdError, match=r"^pretrained=True cannot be given to a torchvision model"):
        TorchvisionArch("alexnet", pretrained=True)
    assert TimmArch("resnet10t", in_chans=1).build(10).conv1[0].in_channels == 1  # timm's in_chans is kd's too


def test_pretrained_weights_of_a_model_without_published_ones_are_refused(tmp_path):
    """IGC V1, ShuffleNet V1 and the Residual Attention Network have no published PyTorch weights (the student's
    refusal, the same sentence, is tested in tests/models/test_seed_zoo_rows.py)."""
    args = ("data=fake", "teacher=attention92", "teacher.weights=pretrained")
    result = run_cli(*args, cwd=tmp_path, cache_dir=tmp_path / "cache")
    assert_refused(result, "has no published PyTorch weights (the authors released", tmp_path, tmp_path / "cache")
    assert "weights=none" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quantize.method=int4", "quantize.method=int4 is unknown; use qad"),
        ("quantize.epochs=-1", "quantize.epochs=-1 must be a whole number of epochs, 0 or more"),
        ("quantize.calibration_batches=0", "quantize.calibration_batches=0 must be at least 1"),
        ("quantize.calibration_batches=-3", "quantize.calibration_batches=-3 must be at least 1"),
        ("quantize.lr_scale=0", "quantize.lr_scale=0 must be positive"),
    ],
)
def test_bad_quantize_settings_are_refused_before_any_work(make_cfg, tmp_path, override, message):
    from kd.tasks.quantize import quantize

    with pytest.raises(KdError, match=message):
        quantize(make_cfg("task=quantize", override))
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_quantize_run_without_a_finished_run_is_refused(make_cfg, tmp_path):
    from kd.tasks.quantize import quantize

    with pytest.raises(KdError, match=f"quantize.run={tmp_path} holds no finished kd run"):
        quantize(make_cfg("task=quantize", f"quantize.run={tmp_path}"))


def test_quantize_refuses_an_onnx_student(make_cfg, tmp_path):
    from kd.tasks.quantize import quantize

    with pytest.raises(KdError, match="is an exported file, which kd cannot fine-tune or re-quantize"):
        quantize(make_cfg("task=quantize", f"student.weights={tmp_path / 'student.int8.onnx'}"))


# ---------------------------------------------------------------- loss=deit, loss=hard_kd


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss=deit", "loss.distill_type=medium"], "loss.distill_type=medium is unknown; use hard"),
        (["loss=deit", "loss.temperature=0"], "loss.temperature=0 must be positive"),
        (["loss=deit", "loss.class_weight=-1"], "loss.class_weight=-1 must not be negative"),
        (["loss=deit", "loss.distill_weight=-0.5"], "loss.distill_weight=-0.5 must not be negative"),
        (["loss=deit", "loss.label_smoothing=1.5"], "loss.label_smoothing=1.5 must lie in [0, 1)"),
        (["loss=deit"], "loss=deit trains a student with a distillation head, which ConvNet lacks; choose a timm"),
        (["loss=hard_kd", "loss.label_smoothing=-0.1"], "loss.label_smoothing=-0.1 must lie in [0, 1)"),
        (["loss=hard_kd", "loss.ce_weight=-1"], "loss.ce_weight=-1 must not be negative"),
    ],
)
def test_bad_deit_and_hard_kd_settings_stop_before_any_work(make_cfg, tmp_path, overrides, expected):
    cache = tmp_path / "fresh-cache"
    cfg = make_cfg(*FAST, f"paths.cache_dir={cache}", *overrides)
    with pytest.raises(Exception) as raised:
        fit(cfg, task="distill")
    refused = user_error(raised.value)
    assert refused is not None and expected in str(refused) and "\n" not in str(refused), raised.value
    assert len(str(refused)) < MAX_MESSAGE


# ---------------------------------------------------------------- strong augmentation and teacher.view


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.auto_augment=randaug-m9", "data.auto_augment=randaug-m9 is not a timm auto-augment string; use e.g."),
        ("data.auto_augment=rand-q9", "data.auto_augment=rand-q9 is not a timm auto-augment string"),
        ("data.re_prob=1.5", "data.re_prob=1.5 must lie in [0, 1]"),
        ("data.re_prob=-0.25", "data.re_prob=-0.25 must lie in [0, 1]"),
        ("data.re_mode=blur", "data.re_mode=blur is not one of const, rand, pixel"),
        ("data.color_jitter=-0.4", "data.color_jitter=-0.4 must be one number >= 0"),
        ("data.scale=[0.8,0.2]", "data.scale=[0.8, 0.2] must be [min, max] with min <= max, both (0.0, 1.0]"),
        ("data.ratio=[2.0]", "data.ratio=[2.0] must be two numbers [min, max]"),
        ("teacher.view=same", "teacher.view=same is not one of consistent, fixed, independent"),
    ],
)
def test_bad_augmentation_and_teacher_view_settings_stop_before_any_work(make_cfg, tmp_path, override, expected):
    cache = tmp_path / "fresh-cache"
    with pytest.raises(Exception) as raised:
        fit(make_cfg(*FAST, f"paths.cache_dir={cache}", override), task="distill")
    refused = user_error(raised.value)
    assert refused is not None and str(refused).startswith(expected), raised.value
    assert "\n" not in str(refused) and len(str(refused)) < MAX_MESSAGE
    assert not list(cache.rglob("*")), "the run trained a model before refusing"
    assert not files_under(tmp_path / "out"), "a refused run wrote into its output folder"


# ---------------------------------------------------------------- named layers of the feature losses


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["loss=fitnet", "loss.student_layers=[featurs.1]", "loss.teacher_layers=[features.3]"],
            "loss.student_layers has 'featurs.1', which is no module of the student (ConvNet); did you mean features.1",
        ),
        (
            ["loss=at", "loss.student_layers=[features.1]", "loss.teacher_layers=[feature.3]"],
            "loss.teacher_layers has 'feature.3', which is no module of the teacher (ConvNet); did you mean features.3",
        ),
        (
            ["loss=at", "loss.student_layers=[features.0,features.1]", "loss.teacher_layers=[features.3]"],
            "loss=at got 2 student_layers and 1 teacher_layers; give the same number",
        ),
        (
            ["loss=crd", "loss.student_layers=[features.0,features.1]"],
            "loss=crd got 2 student_layers and 0 teacher_layers; give 1 each",
        ),
        (["loss=sp", "loss.student_layers=features.1"], "loss.student_layers='features.1' must be a non-empty list"),
        (["loss=rkd", "loss.teacher_layers=[]"], "loss.teacher_layers=[] must be a non-empty list of module names"),
        (["loss=reviewkd", "loss.teacher_layers=[3]"], "loss.teacher_layers=[3] must hold module names (strings)"),
    ],
)
def test_bad_named_layers_stop_before_any_work(make_cfg, tmp_path, overrides, expected):
    cache = tmp_path / "fresh-cache"
    cfg = make_cfg(*FAST, f"paths.cache_dir={cache}", *overrides)
    with pytest.raises(Exception) as raised:
        fit(cfg, task="distill")
    refused = user_error(raised.value)
    assert refused is not None and expected in str(refused) and "\n" not in str(refused), raised.value
    assert len(str(refused)) < MAX_MESSAGE
    assert not list(cache.rglob("*")), "the run trained a model before refusing"
    assert not files_under(tmp_path / "out"), "a refused run wrote into its output folder"


# ---------------------------------------------------------------- an embedding teacher, loss=feature_kd

EMBEDDING_TEACHER = [
    "teacher=timm", "teacher.model=vit_tiny_patch16_224", "teacher.weights=none", "+teacher.arch.num_classes=0",
    "+teacher.arch.img_size=8", "+teacher.arch.patch_size=2", "+teacher.arch.depth=1", "+teacher.arch.embed_dim=16",
    "+teacher.arch.num_heads=2", "+teacher.arch.data_config={input_size:[3,8,8]}",
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss=kd"], "loss=kd compares class predictions, but teacher.arch.num_classes=0 gives features only"),
        (["loss=dkd"], "use loss=feature_kd (or another feature loss)"),
        (["loss=feature_kd", "teacher.cache=cache"], "leave teacher.cache=null"),
        (["loss=feature_kd", "loss.distance=l1"], "loss.distance=l1 is unknown; use cosine or mse"),
        (["loss=feature_kd", "loss.weight=-1"], "loss.weight=-1 must not be negative"),
        (["loss=feature_kd", "loss.teacher_layers=[block.0]"], "did you mean blocks.0"),
        (["loss=feature_kd", "+teacher.arch.num_classes=-3"], "teacher.arch.num_classes=-3 cannot be given to a timm"),
    ],
)
def test_bad_embedding_teacher_settings_stop_before_any_work(make_cfg, tmp_path, overrides, expected):
    cache = tmp_path / "fresh-cache"
    teacher = EMBEDDING_TEACHER if "+teacher.arch.num_classes=-3" not in overrides else EMBEDDING_TEACHER[:3]
    cfg = make_cfg(
        "student.pretrain.epochs=2", "trainer.max_epochs=2", f"paths.cache_dir={cache}", *teacher, *overrides
    )
    with pytest.raises(Exception) as raised:
        fit(cfg, task="distill")
    refused = user_error(raised.value)
    assert refused is not None and expected in str(refused) and "\n" not in str(refused), raised.value
    assert len(str(refused)) < MAX_MESSAGE


# ---------------------------------------------------------------- teacher.precision


@pytest.mark.parametrize(
    "value, expected",
    [
        ("fp8", "teacher.precision=fp8 is unknown; use auto, 32, bf16 or 16 (16 on GPUs only)"),
        ("16", "teacher.precision=16 runs on GPUs only; use teacher.precision=bf16 or auto on a CPU"),
    ],
)
def test_a_teacher_precision_that_cannot_run_is_refused_before_any_work(make_cfg, tmp_path, value, expected):
    cache = tmp_path / "fresh-cache"
    cfg = make_cfg(*FAST, f"paths.cache_dir={cache}", f"teacher.precision={value}", "trainer.accelerator=cpu")
    with pytest.raises(Exception) as raised:
        fit(cfg, task="distill")
    assert str(user_error(raised.value)) == expected
    assert not list(cache.rglob("*")), "the run trained a model before refusing"
    assert not files_under(tmp_path / "out"), "a refused run wrote into its output folder"


def test_a_bad_teacher_view_on_the_command_line_exits_with_code_2_in_one_line(tmp_path):
    result = run_cli("teacher.view=fixd", cwd=tmp_path, cache_dir=tmp_path / "cache")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: teacher.view=fixd is not one of consistent, fixed, independent; consistent is the default"
    )

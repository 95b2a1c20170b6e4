"""The torchrun overrides (``multi_gpu_*.yaml``) on 2 gloo ranks on the CPU, through the real bundles.

Distillation and saliency-guided training on 2 ranks x batch 2 end with the same student as one process x batch 4
(the same global batch). For the math to be the same, not just close:

- no shuffling: the single process's loader keeps the datalist order, and a ``DistributedSampler`` without
  shuffling gives rank r the samples r, r + 2, ... (``even_divisible``), so each global step sees the same four
  samples as the single process's batch;
- no random augmentation (``--augment_prob 0``) and no dropout (``--student_def#dropout 0.0``);
- no statistics over the batch: BatchNorm in training mode normalizes with the statistics of each rank's batch
  (2 samples, not 4), which changes the forward pass itself; DDP only averages gradients. The student therefore
  uses GroupNorm (``norm="group"``), whose statistics are per sample. (InstanceNorm, also per sample, refuses the
  single voxel left after five poolings of the 32^3 test volumes.)

With that, DDP's gradient (mean over ranks of each rank's mean loss) equals the single process's mean loss
gradient up to floating-point summation order. The single-process reference runs ``monai.bundle.run`` inside the
test process (no second interpreter start-up), the 2-rank run is a real ``torchrun``.

The other tests run the new overrides (``multi_gpu_train.yaml``, ``multi_gpu_prune.yaml``): both ranks end
identical, ranks > 0 create no MLflow run, and pruning removes the same channels on every rank. All runs reuse
the session's tiny teacher, its dataset and its MLflow store.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, VENV_BIN, bundle_run
from mlflow.tracking import MlflowClient

from monai_kdx.networks import ShallowCNN, count_parameters
from monai_kdx.pruning import load_pruned

TORCHRUN = ("timeout", "-k", "10", "240", str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m")
SINGLE = ("--batch_size", "4", "--train#dataloader#shuffle", "False")  # one process, the global batch
TWO_RANKS = ("--batch_size", "2", "--train#sampler#shuffle", "False", "--save_rank_weights", "True")
# float32 weights after 2 Adam steps of lr 1e-3: measured differences are ~1e-6 (summation order, amplified where
# Adam divides tiny gradients by their own size); per-rank BatchNorm statistics instead give ~3e-3
TOLERANCE = 5e-5


@pytest.fixture
def shared(brain_teacher, tmp_path):
    """This test's output folder on the session teacher's dataset (symlinked) and MLflow store (no new database
    to create); torch on one thread per process (two ranks share the two cores)."""
    teacher_dir, env, uri = brain_teacher
    (tmp_path / "data").symlink_to(teacher_dir / "data", target_is_directory=True)
    env = {**env, "OMP_NUM_THREADS": "1"}
    teacher = str(teacher_dir / "runs" / "models" / "model.pt")
    return tmp_path, env, uri, ("--tracking_uri", uri, "--teacher_ckpt", teacher)


def _runs_named(uri: str, name: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("brain_mri_3d")
    return [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == name]


def _model_state(path) -> dict[str, torch.Tensor]:
    """The network's state dict in a ``CheckpointSaver`` file (nested under ``"model"`` when it saves several)."""
    state = torch.load(path, weights_only=True)
    return state.get("model", state)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def _no_augmentation(config: str) -> list[str]:
    """No random augmentation: the training transform list (train_teacher.yaml's, as ``config`` leaves it) takes its
    probabilities from ``augment_prob``; the check below fails if a config hard-codes one."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        [str(REPO / "bundles" / "brain_mri_3d" / "configs" / name) for name in ("train_teacher.yaml", config)]
    )
    transforms = parser["train#preprocessing#transforms"]
    fixed = [t["_target_"] for t in transforms if t["_target_"].startswith("Rand") and t.get("prob") != "@augment_prob"]
    assert not fixed, f"{config}: random transforms not driven by augment_prob: {fixed}"
    return ["--augment_prob", "0"]


def _one_process(tmp_path, configs: list[str], *overrides: str) -> None:
    """The single-process reference: ``monai.bundle.run`` (what ``python -m monai.bundle run`` calls) in this
    process, which has everything imported already, on the same tiny settings as :func:`conftest.bundle_run`;
    command-line style ``overrides`` are parsed as the command line would. The random states that the bundle's
    ``set_determinism`` changes are restored afterwards."""
    from fire.parser import DefaultParseValue
    from monai.bundle import run

    root = REPO / "bundles" / "brain_mri_3d" / "configs"
    arguments = [*TINY, *overrides]
    pairs = zip(arguments[::2], arguments[1::2], strict=True)
    values = {key.removeprefix("--"): DefaultParseValue(value) for key, value in pairs}
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        run(
            config_file=[str(root / name) for name in configs], meta_file=str(root / "metadata.json"),
            logging_file=False, bundle_root=str(root.parent), output_dir=str(tmp_path / "runs"),
            dataset_dir=str(tmp_path / "data"), **values,
        )  # fmt: skip
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


# a GroupNorm student without dropout: the one spec (student_def) also builds the MLflow model of distill.yaml
GROUP_NORM_STUDENT = ["--student_def#norm", "group", "--student_def#dropout", "0.0"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, rank_file, ckpt_dir",
    [("distill", "student_rank{}.pt", "student"), ("saliency_train", "saliency_rank{}.pt", "saliency")],
)
def test_two_ranks_match_one_process_on_the_global_batch(shared, one_thread, stage, rank_file, ckpt_dir):
    """Distillation (KD + attention transfer) and saliency-guided training (Grad-CAM toward gaze, from epoch 2):
    2 ranks x batch 2 end with the same student as 1 process x batch 4, within float32 rounding."""
    tmp_path, env, uri, common = shared
    override = "multi_gpu_distill.yaml" if stage == "distill" else "multi_gpu_saliency.yaml"
    exact = [*common, *_no_augmentation(f"{stage}.yaml"), *GROUP_NORM_STUDENT]
    configs = ["train_teacher.yaml", f"{stage}.yaml"]

    _one_process(tmp_path, configs, *exact, *SINGLE, "--run_name", f"{stage}_one")
    single = _model_state(tmp_path / "runs" / ckpt_dir / "model_final.pt")
    bundle_run(
        "brain_mri_3d", [*configs, override], tmp_path, env, *exact, *TWO_RANKS, "--run_name", f"{stage}_two",
        launcher=TORCHRUN,
    )  # fmt: skip
    ranks = [torch.load(tmp_path / "runs" / rank_file.format(r), weights_only=True) for r in range(2)]
    _assert_identical(ranks[0], ranks[1])
    saved = _model_state(tmp_path / "runs" / ckpt_dir / "model_final.pt")  # by rank 0
    _assert_identical(saved, ranks[0])

    difference = _max_difference(single, ranks[0])
    print(f"{stage}: max |single - 2 ranks| = {difference:.3g}")
    assert difference < TOLERANCE
    assert len(_runs_named(uri, f"{stage}_one")) == 1
    (two,) = _runs_named(uri, f"{stage}_two")  # ranks > 0 create no run
    logged = {"train_kd", "train_attention"} if stage == "distill" else {"train_saliency"}
    assert logged <= set(two.data.metrics) and all(two.data.metrics[k] > 0 for k in logged)  # the terms trained


@pytest.mark.slow
def test_teacher_training_on_two_ranks(shared):
    """multi_gpu_train.yaml: DDP teacher on a sharded training split, both ranks end with the same weights, rank 0
    writes the checkpoints and the only MLflow run (with the validation accuracy reduced over ranks)."""
    tmp_path, env, uri, common = shared
    configs = ["train_teacher.yaml", "multi_gpu_train.yaml"]
    extra = ("--tracking_uri", uri, "--run_name", "train_two", "--save_rank_weights", "True", "--batch_size", "2")
    bundle_run("brain_mri_3d", configs, tmp_path, env, *extra, launcher=TORCHRUN)
    ranks = [torch.load(tmp_path / "runs" / f"teacher_rank{r}.pt", weights_only=True) for r in range(2)]
    parameters = {k for k in ranks[0] if "running_" not in k and "num_batches" not in k}
    # BatchNorm running statistics are updated from each rank's batch (DDP broadcasts rank 0's before each step)
    _assert_identical({k: ranks[0][k] for k in parameters}, {k: ranks[1][k] for k in parameters})
    saved = _model_state(tmp_path / "runs" / "models" / "model_final.pt")
    _assert_identical(saved, ranks[0])
    assert (tmp_path / "runs" / "models" / "model.pt").exists()
    (run,) = _runs_named(uri, "train_two")
    assert run.info.status == "FINISHED" and run.data.params["batch_size"] == "2"
    assert {"train_loss", "train_accuracy", "val_accuracy"} <= set(run.data.metrics)


@pytest.mark.slow
def test_pruning_on_two_ranks_removes_the_same_channels(shared):
    """multi_gpu_prune.yaml on the teacher: relevance (taylor, data-dependent) from each rank's calibration shard,
    summed over ranks, so both ranks prune the same channels and take the same gate decision: their pruning reports
    (accepted, parameters, MACs, accuracy, explanation agreement of the candidate before DDP re-wrapping) and layer
    widths are identical; the pruned network is re-wrapped in DDP and fine-tuned in sync (identical weights);
    rank 0 writes the pruned file and the only MLflow run."""
    tmp_path, env, uri, common = shared
    configs = ["train_teacher.yaml", "prune.yaml", "multi_gpu_prune.yaml"]
    extra = ("--prune_source", "teacher", "--prune_method", "taylor", "--prune_ratio", "0.5", "--batch_size", "2",
             "--run_name", "prune_two", "--save_rank_weights", "True")  # fmt: skip
    bundle_run("brain_mri_3d", configs, tmp_path, env, *common, *extra, launcher=TORCHRUN)
    ranks = [torch.load(tmp_path / "runs" / f"pruned_rank{r}.pt", weights_only=True) for r in range(2)]
    reports = [rank["report"] for rank in ranks]
    assert len(reports[0]) == len(reports[1]) == 1
    for key in ("accepted", "params_after", "macs_after", "accuracy_after", "agreement"):
        assert reports[0][0][key] == reports[1][0][key], key
    assert reports[0][0]["accepted"] and reports[0][0]["params_after"] < 0.5 * reports[0][0]["params_before"]
    states = [rank["state_dict"] for rank in ranks]
    parameters = {k for k in states[0] if "running_" not in k and "num_batches" not in k}
    # the same layer widths on both ranks, and the same fine-tuned weights
    _assert_identical({k: states[0][k] for k in parameters}, {k: states[1][k] for k in parameters})
    assert {k: v.shape for k, v in states[0].items()} == {k: v.shape for k, v in states[1].items()}
    pruned = load_pruned(tmp_path / "runs" / "pruned" / "model_pruned.pt")  # by rank 0
    _assert_identical(pruned.state_dict(), states[0])
    assert count_parameters(pruned) == reports[0][0]["params_after"]
    (run,) = _runs_named(uri, "prune_two")
    metrics = run.data.metrics
    assert metrics["prune_steps"] == 1 and metrics["prune_params"] == reports[0][0]["params_after"]
    assert "test_accuracy" in metrics and "val_accuracy" in metrics


def test_shallow_cnn_norms_per_sample_statistics():
    """``norm="group"``/``"instance"``: a sample's output in training mode does not depend on the rest of its batch
    (with ``"batch"`` it does); an unknown norm is refused."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 64, 64)
    for norm, independent in (("group", True), ("instance", True), ("batch", False)):
        net = ShallowCNN(2, 1, 3, norm=norm, dropout=0.0).train()
        together = net(x)[:2]
        alone = net(x[:2])
        assert torch.allclose(together, alone, atol=1e-5) is independent, norm
    with pytest.raises(ValueError, match="norm"):
        ShallowCNN(2, 1, 3, norm="layer")


@pytest.mark.parametrize("bundle", ["brain_mri_3d", "chest_xray_2d"])
def test_every_training_config_has_a_torchrun_override(bundle):
    """Each training config has its ``multi_gpu_*.yaml`` override in both bundles, set up the same way: the tracking
    store checked first, the process group and ignite's distributed context created on every rank, sharded
    training data, the network in DDP, rank-0-only MLflow runs (``is_not_rank0`` in the base config). The steps they
    share are the base config's ``ddp`` section, copied in by macros (``"%ddp#initialize"``)."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    for stage, override in (
        ("train_teacher", "multi_gpu_train"),
        ("distill", "multi_gpu_distill"),
        ("saliency_train", "multi_gpu_saliency"),
        ("prune", "multi_gpu_prune"),
    ):
        parser = ConfigParser()
        names = dict.fromkeys(("train_teacher", stage, override))  # train_teacher once
        parser.read_config([str(configs / f"{name}.yaml") for name in names])
        parser.parse()  # the macros resolved
        assert "torch.distributed.get_rank() > 0" in parser["is_not_rank0"]
        initialize = parser["initialize"]
        assert initialize[0] == "$monai_kdx.tracking.check_tracking_uri(@tracking_uri)", override
        assert any("init_process_group(backend=" in line for line in initialize), override
        assert "$idist.sync()" in initialize, override
        assert parser["train#sampler"]["_target_"] == "DistributedSampler", override
        assert parser["train#dataloader#sampler"] == "@train::sampler", override  # ids as parsed: "::" for "#"
        assert parser["network"].startswith("$@ddp::wrap("), override
        assert "torch.nn.parallel.DistributedDataParallel(" in parser["ddp#wrap"], override
        assert any("destroy_process_group" in line for line in parser["finalize"]), override
    assert parser["calibration#dataloader#sampler"] == "@calibration::sampler"  # prune: relevance from each shard


def test_new_overrides_differ_only_by_bundle():
    for name in ("multi_gpu_train.yaml", "multi_gpu_prune.yaml"):
        brain = (REPO / "bundles" / "brain_mri_3d" / "configs" / name).read_text()
        chest = (REPO / "bundles" / "chest_xray_2d" / "configs" / name).read_text()
        assert brain.replace("brain_mri_3d", "chest_xray_2d") == chest, name


@pytest.mark.parametrize("bundle", ["brain_mri_3d", "chest_xray_2d"])
@pytest.mark.parametrize("stage", [None, "distill", "prune", "saliency_train"])
def test_save_rank_weights_reads_the_command_lines_spelling(bundle, stage, tmp_path):
    """``--save_rank_weights false`` arrives as the string ``"false"`` (fire parses only Python literals): it must
    switch the rank files off, not on. The finalize step that makes their folder runs only when the flag is true,
    in any spelling; the step that writes them has the same condition."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / bundle / "configs"
    override = {None: "multi_gpu_train", "saliency_train": "multi_gpu_saliency"}.get(stage, f"multi_gpu_{stage}")
    parser = ConfigParser()
    parser.read_config([str(configs / f"{name}.yaml") for name in ("train_teacher", stage, override) if name])
    parser.parse()  # the finalize steps copied in from the base config's ddp section
    steps = [step for step in parser["finalize"] if "save_rank_weights" in step]
    assert len(steps) == 2 and steps[0].rsplit(" if ", 1)[1] == steps[1].rsplit(" if ", 1)[1]  # the same condition
    for value, on in (("false", False), ("False", False), (False, False), ("0", False), ("true", True), (True, True)):
        folder = tmp_path / f"runs_{value!s}_{type(value).__name__}"
        parser.update({"output_dir": str(folder), "save_rank_weights": value})
        parser.parse(reset=True)
        assert parser.get_parsed_content("finalize#0") is None
        assert folder.is_dir() is on, value

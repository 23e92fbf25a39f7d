"""``configs/multi_gpu_train.json``: DistributedDataParallel training through ``torchrun``, on CPU with Gloo.

The end-to-end test trains one bundle on tiny synthetic data, alternating world sizes on one checkpoint:
one process (1 epoch) -> ``torchrun --nproc_per_node=2`` resuming it (1 more epoch) -> one process resuming
that (1 more). The torchrun run adds, through a test-only config file on the command line, a ``finalize``
step that makes every rank save its weights, metrics and training-sampler draws to ``rank<RANK>.pt``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from torch.utils.data import DistributedSampler

from networks import bundle_gen
from networks.bundle.distributed import DistributedRandomSampler, is_not_rank0, shared_seed
from networks.bundle.synthetic import make_dataset, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
BUNDLE = "synapse_bisegmamba"
MULTI = ["configs/train.json", "configs/multi_gpu_train.json"]


# ------------------------------------------------------------------ fast checks


def test_distributed_random_sampler_is_one_stream_split_across_ranks():
    data = list(range(5))
    ranks = [DistributedRandomSampler(data, num_samples=40, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    single = DistributedRandomSampler(data, num_samples=80, seed=3, num_replicas=1, rank=0)
    assert all(isinstance(s, DistributedSampler) for s in ranks)  # MONAI's workflows call set_epoch on it
    streams = []
    for epoch in (1, 2):
        for s in ranks + [single]:
            s.set_epoch(epoch)
        r0, r1, one = list(ranks[0]), list(ranks[1]), list(single)
        assert len(r0) == len(r1) == len(ranks[0]) == 40
        assert one[0::2] == r0 and one[1::2] == r1  # rank r takes draws r, r + 2, ...
        assert set(one) == set(data) and r0 != r1
        assert list(ranks[0]) == r0  # reproducible within an epoch
        streams.append(one)
    assert streams[0] != streams[1]  # a new draw every epoch
    seeds = {DistributedRandomSampler(data, 4, num_replicas=1, rank=0).seed for _ in range(3)}
    assert len(seeds) > 1  # seed None: a random one per run
    assert not is_not_rank0() and shared_seed(7) == 7


@pytest.mark.parametrize("name", bundle_gen.bundle_names())
def test_only_logging_and_saving_handlers_are_disabled_on_other_ranks(name):
    conf = ConfigParser.load_config_files([str(BUNDLES / name / c) for c in MULTI])
    disabled = {"train": ["StatsHandler", "TensorBoardStatsHandler"],
                "validate": ["StatsHandler", "TensorBoardStatsHandler", "networks.bundle.BestModelSaver"]}
    for part, expected in disabled.items():
        handlers = conf[part]["handlers"]
        assert [h["_target_"] for h in handlers if h.get("_disabled_") == "@is_not_rank0"] == expected
        assert all(h.get("_disabled_") in (None, "@is_not_rank0") for h in handlers)
    kept = [h["_target_"] for h in conf["train"]["handlers"] if "_disabled_" not in h]
    assert kept == ["LrScheduleHandler", "ValidationHandler", "networks.bundle.ResumableCheckpoint",
                    "networks.bundle.NonFiniteGuard"]  # every rank stops on a NaN gradient (they are all-reduced)
    assert conf["train"]["handlers"][0]["print_lr"] == "$not @is_not_rank0"
    assert conf["train"]["sampler"]["_target_"] == "networks.bundle.distributed.DistributedRandomSampler"
    assert conf["validate"]["sampler"]["even_divisible"] is False


def test_nccl_and_cuda_branches_resolve_on_a_gpu_node(monkeypatch):
    """multi_gpu_train.json parsed as on rank 3 of a 4-GPU node (CUDA faked, nothing initialised):
    the device comes from LOCAL_RANK, the process group is asked for NCCL, DDP gets that device,
    and the samplers split the data by the process group's rank and world size."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: calls.append(("init", a, kw)))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 3)

    def parse(local_rank):
        if local_rank is None:
            monkeypatch.delenv("LOCAL_RANK", raising=False)
        else:
            monkeypatch.setenv("LOCAL_RANK", local_rank)
        parser = ConfigParser()
        parser.read_config([str(BUNDLES / BUNDLE / c) for c in MULTI])
        parser["train#dataset"] = "$list(range(10))"
        parser["validate#dataset"] = "$list(range(10))"
        parser["seed"] = 5
        return parser

    assert parse(None).get_parsed_content("device") == torch.device("cuda:0")
    parser = parse("3")
    device = parser.get_parsed_content("device")
    assert device == torch.device("cuda:3")
    assert parser.get_parsed_content("network#device_ids") == [device]
    parser.get_parsed_content("initialize#1")  # init_process_group
    parser.get_parsed_content("initialize#2")  # set_device
    assert calls == [("init", (), {"backend": "nccl"}), ("set_device", device)]
    assert parser.get_parsed_content("is_not_rank0") is True
    train, val = parser.get_parsed_content("train#sampler"), parser.get_parsed_content("validate#sampler")
    assert isinstance(train, DistributedRandomSampler) and (train.num_replicas, train.rank) == (4, 3)
    assert len(train) == parser.get_parsed_content("epoch_length") * parser.get_parsed_content("batch_size")
    assert (val.num_replicas, val.rank) == (4, 3) and list(val) == [3, 7]  # no padding: even_divisible false


# ------------------------------------------------------------------ torchrun, 2 ranks, Gloo


def _workflow(bundle_root, data, **extra):
    conf = BUNDLES / BUNDLE / "configs"
    overrides = tiny_overrides("synapse", bundle_root=str(bundle_root), dataset_dir=str(data), **extra)
    return ConfigWorkflow(config_file=str(conf / "train.json"), meta_file=str(conf / "metadata.json"),
                          logging_file=str(conf / "logging.conf"), workflow_type="train", **overrides)


def _train_in_process(bundle_root, data, max_epochs):
    wf = _workflow(bundle_root, data, max_epochs=max_epochs)
    wf.initialize()
    try:
        wf.run()
        return next(h for h in wf.parser.get_parsed_content("train#handlers") if hasattr(h, "loaded_epoch"))
    finally:
        wf.finalize()


def _evaluate_in_process(bundle_root, data, state):
    """val_mean_dice and per-case Dice of ``state`` on fold 0's validation cases, in this one process."""
    wf = _workflow(bundle_root, data, resume=False)
    wf.initialize()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        wf.parser.get_parsed_content("network").load_state_dict(state)
        evaluator = wf.parser.get_parsed_content("validate#evaluator")
        evaluator.run()
        return evaluator.state.metrics["val_mean_dice"], evaluator.state.metric_details["val_mean_dice"]
    finally:
        torch.set_num_threads(threads)
        wf.finalize()


def _cli_overrides(overrides):
    out = []
    for k, v in overrides.items():
        if k in ("device", "amp"):
            continue  # from LOCAL_RANK / the defaults: the CPU here
        out += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_then_resume_with_other_world_sizes(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    make_dataset("synapse", str(data), n_train=6, n_test=0, num_folds=2)  # fold 0: 3 training, 3 validation cases
    ckpt = run / "models" / "checkpoint.pt"

    # 1. one process, epoch 1
    assert _train_in_process(run, data, max_epochs=1).loaded_epoch is None

    # 2. two processes resume it for epoch 2; every rank dumps its final state (test-only config file)
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"finalize": [
        "$torch.save({'state': @network.module.state_dict(), 'metrics': dict(@validate#evaluator.state.metrics), "
        "'details': @validate#evaluator.state.metric_details['val_mean_dice'], 'indices': list(@train#sampler), "
        "'seed': @train#sampler.seed}, @bundle_root + '/rank' + os.environ['RANK'] + '.pt')",
        "$torch.distributed.is_initialized() and torch.distributed.destroy_process_group()"]}))
    overrides = tiny_overrides("synapse", bundle_root=str(run), dataset_dir=str(data), max_epochs=2,
                               log_dir=str(run / "logs_ddp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", repr(MULTI + [str(dump)]),
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf", *_cli_overrides(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=str(BUNDLES / BUNDLE), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    log = proc.stdout
    assert proc.returncode == 0, log[-5000:]
    assert log.count(f"resumed from {ckpt}: epoch 1, iteration 2") == 2  # both ranks loaded the 1-process checkpoint

    ranks = [torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]  # both ranks ran to the end
    saved = torch.load(ckpt, weights_only=True)
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k  # DDP kept the replicas identical
        assert torch.equal(v, saved["model"][k]), k  # rank 0 saved the unwrapped module's weights
    assert not any(k.startswith("module.") for k in torch.load(run / "models" / "model.pt", weights_only=True))
    assert saved["trainer"]["iteration"] == 4 and saved["lr_scheduler"]["last_epoch"] == 2
    assert all(float(s["step"]) == 4 for s in saved["optimizer"]["state"].values())
    # the training draws: one shared seed, each rank its own slice of the epoch's stream
    assert ranks[0]["seed"] == ranks[1]["seed"]
    stream = DistributedRandomSampler(list(range(3)), num_samples=4, seed=ranks[0]["seed"], num_replicas=1, rank=0)
    stream.set_epoch(2)
    assert list(stream) == [i for pair in zip(ranks[0]["indices"], ranks[1]["indices"]) for i in pair]

    # exactly one of each file, all written by one process (rank 0)
    assert sorted(p.name for p in (run / "models").iterdir()) == ["checkpoint.pt", "model.pt"]
    events = list((run / "logs_ddp").iterdir())
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert log.count("Epoch[2] Metrics -- val_mean_dice") == 1 and log.count("Epoch: 2/2, Iter: 2/2") == 1
    assert log.count("Current learning rate") == 1

    # validation: the 3 cases sharded 2 + 1 (no padding duplicate), gathered; the Dice of one process on them
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    details = ranks[0]["details"]
    assert details.shape[0] == 3
    dice, single_details = _evaluate_in_process(tmp_path / "eval", data, ranks[0]["state"])
    assert ranks[0]["metrics"]["val_mean_dice"] == pytest.approx(dice, rel=1e-6, abs=1e-9)
    # rank 0 held cases 0 and 2, rank 1 case 1
    assert torch.allclose(details[[0, 2, 1]], single_details.cpu(), rtol=1e-6, atol=1e-9, equal_nan=True)

    # 3. one process resumes the two-process checkpoint for epoch 3
    assert _train_in_process(run, data, max_epochs=3).loaded_epoch == 2
    assert torch.load(ckpt, weights_only=True)["trainer"]["iteration"] == 6


def _resume_worker(rank, port, folder):
    import torch.distributed as dist
    from ignite.engine import Engine

    from networks.bundle import ResumableCheckpoint

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 0 sees a checkpoint, rank 1 none (as on a node without the shared folder)
        handler = ResumableCheckpoint(os.path.join(folder, f"checkpoint{rank}.pt"), {"model": torch.nn.Linear(2, 2)})
        try:
            handler.load(Engine(lambda e, b: None))
            outcome = "loaded"
        except RuntimeError as err:
            outcome = str(err)
        Path(folder, f"outcome{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_that_resume_from_different_epochs_stop_with_a_clear_error(tmp_path):
    import socket

    from ignite.engine import Engine

    from networks.bundle import ResumableCheckpoint

    trainer = Engine(lambda e, b: None)
    ResumableCheckpoint(str(tmp_path / "checkpoint0.pt"), {"model": torch.nn.Linear(2, 2)}).attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_resume_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"outcome{rank}.txt").read_text()
        assert "ranks resumed from different epochs" in text and "[1, None]" in text, text

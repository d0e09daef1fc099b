"""DeepSpeed engine set-up: optimizer groups and the schedule (no Ray, no DeepSpeed run)."""

import pytest


def test_head_lr_gives_the_score_head_its_own_scheduled_rate():
    import torch
    from torch import nn

    from raysys.config import load_config
    from raysys.train.engine import param_groups, warmup_linear

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

    t = load_config(
        None, ["train.optim.lr=1e-4", "train.optim.head_lr=1e-2", "train.optim.warmup_ratio=0.5"]
    ).train
    groups = [g for g in param_groups(Toy(), t.optim, ("head.",)) if g["params"]]
    head = [g for g in groups if g.get("lr") == 1e-2]
    assert len(head) == 1 and sum(p.numel() for p in head[0]["params"]) == 5
    assert sum(len(g["params"]) for g in groups) == 4
    opt = torch.optim.AdamW(groups, lr=t.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(4, t.optim.warmup_ratio))
    assert sched.get_last_lr() == pytest.approx([0.5e-4, 0.5e-4, 0.5e-2])
    # Without head_lr the head trains at train.optim.lr with the body.
    t0 = load_config(None, ["train.optim.lr=1e-4"]).train
    assert [len(g["params"]) for g in param_groups(Toy(), t0.optim, ("head.",))] == [2, 2, 0]


@pytest.mark.slow
def test_cpu_comm_set_up_builds_no_op_and_ignores_a_stale_build_lock(tmp_path):
    """A build killed half-way leaves ``<ext>/lock`` behind; DeepSpeed's own
    set-up then waits on it forever. raysys's CPU set-up builds no op, so it
    neither waits on the lock nor writes anything under TORCH_EXTENSIONS_DIR."""
    import os
    import subprocess
    import sys

    ext = tmp_path / "ext"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    code = (
        "import torch\n"
        "from raysys.train.inprocess import init_single_process\n"
        "from raysys.train.engine import init_deepspeed_comm\n"
        "init_single_process(torch.device('cpu'))\n"
        "init_deepspeed_comm(False)\n"
        "import deepspeed.comm as dist\n"
        "t = torch.ones(2); dist.all_reduce(t)\n"
        "assert dist.get_world_size() == 1 and t.tolist() == [1.0, 1.0]\n"
        "print('ok')\n"
    )
    # A process group set up earlier in this pytest process (the GPU suite's CPU
    # dry run) leaves MASTER_PORT & co. in the environment, its port still bound:
    # the child must pick its own.
    dist_env = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dist_env}
    env |= {"TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert sorted(p.name for p in ext.rglob("*")) == ["deepspeed_shm_comm", "lock"]

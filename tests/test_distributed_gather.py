"""distributed.gather_shards on two real gloo ranks, including tensors with no columns."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent('''
    import torch
    import torch.distributed as tdist
    from ppo_rlhf import distributed as dist

    tdist.init_process_group("gloo")
    r = tdist.get_rank()
    # rank r holds global rows r, r + 2, r + 4 (dist.shard's order)
    rows = torch.tensor([r, r + 2, r + 4])
    x = rows[:, None] * 10 + torch.arange(3)
    assert dist.gather_shards(x).tolist() == [[10 * i + j for j in range(3)] for i in range(6)]
    mask = (rows % 3 == 0)[:, None].expand(3, 2)
    assert dist.gather_shards(mask).tolist() == [[i % 3 == 0] * 2 for i in range(6)]
    # a response batch where nobody generated a token: (B, 0) on every rank
    empty = dist.gather_shards(torch.zeros(3, 0, dtype=torch.long))
    assert empty.shape == (6, 0), empty.shape
    assert dist.gather_shards(torch.zeros(3, 0, 4)).shape == (6, 0, 4)
    tdist.destroy_process_group()
    # one file per rank: two ranks printing to one stdout may interleave their words
    open(f"{OUT}/ok{r}", "w").close()
''')


def test_gather_shards_interleaves_ranks_also_for_empty_tensors(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(f"OUT = {str(tmp_path)!r}\n" + WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
         "127.0.0.1", "--master_port", str(port), str(script)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file(), proc.stdout[-2000:]

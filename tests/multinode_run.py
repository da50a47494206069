"""Run one camjobs job on a simulated 3-node Ray cluster (head + 2 workers with 1 GPU each).

Started in its own process by test_multinode.py: ray.cluster_utils.Cluster cannot share a
process with the session's local cluster. Prints the run summary as JSON on the last line.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from camjobs.config import RunConfig
from camjobs.pipeline.job import run_job


def remove_node_once_rows_are_staged(cluster: Cluster, node, output: str) -> threading.Thread:
    """Take a worker node away (as a preempted VM goes) once the run has written some rows."""

    def watch() -> None:
        staging = Path(output) / "_staging"
        deadline = time.time() + 300
        while time.time() < deadline:
            if staging.exists() and any(staging.rglob("*.parquet")):
                cluster.remove_node(node, allow_graceful=False)
                print("removed a worker node", file=sys.stderr, flush=True)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def main(data: str, output: str, remove_node: bool = False) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Start only once both actors are up, so that a slow second start does not leave one
    # node with nothing to do.
    context.wait_for_min_actors_s = 120
    try:
        # At 128 px a model batch takes longer than decoding the next block: both actors get
        # work. (At 64 px one actor kept up with the decode tasks on its own.)
        cfg = RunConfig(
            data=data,
            output=output,
            layout="folder",
            model="resnet18",
            classes=["a", "b"],
            input_size=128,
            batch_size=2,
        )
        watcher = remove_node_once_rows_are_staged(cluster, workers[1], output) if remove_node else None
        result = run_job(cfg)
        if watcher:
            watcher.join()
        summary = dict(result.summary, worker_node_ids=[node.node_id for node in workers])
        print(json.dumps(summary, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], remove_node="--remove-node" in sys.argv[3:])

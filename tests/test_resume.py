"""A run killed with SIGKILL mid-epoch and restarted ends with the uninterrupted weights."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "resume_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(checkpoint_dir, output, seconds):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, WORKER, str(checkpoint_dir), str(output),
                             str(seconds)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_run_resumes_to_same_weights(tmp_path):
    reference = _start(tmp_path / "ref_ckpt", tmp_path / "ref.npz", 0.0)

    interrupted_dir = tmp_path / "ckpt"
    worker = _start(interrupted_dir, tmp_path / "resumed.npz", 0.3)
    deadline = time.time() + 240
    while time.time() < deadline:
        index = interrupted_dir / "chief" / "checkpoint"
        # Wait for the second checkpoint (step 10), so the kill lands mid-epoch 1.
        if index.exists() and "ckpt-2" in index.read_text():
            break
        assert worker.poll() is None, worker.stderr.read()[-3000:]
        time.sleep(0.1)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert not (tmp_path / "resumed.npz").exists()

    restarted = _start(interrupted_dir, tmp_path / "resumed.npz", 0.0)
    assert restarted.wait(timeout=300) == 0, restarted.stderr.read()[-3000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]

    expected = np.load(tmp_path / "ref.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    assert len(expected.files) == len(resumed.files)
    for name in expected.files:
        # Exact: op determinism is on, so the same batches give bit-equal updates.
        np.testing.assert_array_equal(resumed[name], expected[name])
    # The backup is deleted once training has finished.
    assert not (interrupted_dir / "chief").exists()

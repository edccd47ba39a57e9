"""enlca_jax.workdir: one run per workdir (a lock a crash releases), config.json never replaced."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from enlca_jax import workdir


class TestWorkdirLock:
    def test_second_holder_is_refused_until_the_first_ends(self, tmp_path):
        with workdir.WorkdirLock(tmp_path):
            busy = rf"in use by another training run \(pid {os.getpid()}\)"
            with pytest.raises(workdir.WorkdirBusyError, match=busy):
                with workdir.WorkdirLock(tmp_path):
                    pass
        with workdir.WorkdirLock(tmp_path):  # released on exit
            pass

    def test_a_killed_holder_leaves_no_stale_lock(self, tmp_path):
        code = (
            "import sys, time; from enlca_jax import workdir\n"
            f"lock = workdir.WorkdirLock({str(tmp_path)!r}).__enter__()\n"
            "print('locked', flush=True); time.sleep(60)\n"
        )
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout.readline().strip() == "locked"
            with pytest.raises(workdir.WorkdirBusyError, match=f"pid {process.pid}"):
                workdir.WorkdirLock(tmp_path).__enter__()
        finally:
            process.kill()
            process.wait()
        with workdir.WorkdirLock(tmp_path):  # the kernel dropped the dead process's lock
            pass


class TestRecordConfig:
    def test_written_once_then_checked(self, tmp_path, caplog):
        workdir.record_config(tmp_path, tiny.get_config(), {"w": np.zeros(2)})
        path = tmp_path / "config.json"
        first = path.read_text()
        assert json.loads(first)["config"]["batch_size"] == 4 and json.loads(first)["parameters"] == 2

        longer = tiny.get_config()
        longer.num_train_steps = 60
        with caplog.at_level(logging.WARNING, logger="enlca_jax.train"):
            workdir.record_config(tmp_path, longer, {})
        assert "config.num_train_steps: 6 -> 60" in caplog.text
        assert path.read_text() == first

        wider = tiny.get_config()
        wider.model.features, wider.batch_size = 16, 8
        changes = r"(?s)different config.*model features: 8 -> 16.*config.batch_size: 4 -> 8"
        with pytest.raises(ValueError, match=changes):
            workdir.record_config(tmp_path, wider, {})
        assert path.read_text() == first

    def test_unreadable_record(self, tmp_path):
        (tmp_path / "config.json").write_text("{not json")
        with pytest.raises(ValueError, match="config.json is unreadable"):
            workdir.record_config(tmp_path, tiny.get_config(), {})

    def test_mode_follows_the_umask(self, tmp_path):
        previous = os.umask(0o022)
        try:
            workdir.record_config(tmp_path, tiny.get_config(), {})
        finally:
            os.umask(previous)
        assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644
